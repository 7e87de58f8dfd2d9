"""Zero-bubble's B/W split: a chunk's weight-gradient GEMMs, postponed (Qi et al. 2023).

A linear layer's backward is two GEMMs: dx = dy W^T, which the previous layer (or stage) waits
for, and dW = x^T dy, which nobody waits for. Zero-bubble schedules run the first as the B pass
and move the second to a later W pass that fills what would be a pipeline bubble.

Every linear of ``minipar.parallel.tensor`` ends its backward with ``self.weight_grads(x, dy)``.
While a chunk runs a deferred backward (``collect``), this module stands in for that call on
each linear of the chunk: it keeps the pair (x, dy) under the microbatch instead, and ``run(mb)``
makes the calls later. The pair holds activations only, never a weight, so a postponed W pass
keeps no (ZeRO-3 gathered) parameter alive. The layers know nothing of this.

``DeferredWeightGrads`` is a ``Module`` owned by the chunk, so the activation meters that walk a
chunk's modules find what it keeps (``_pending``) next to the layers' caches.
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

from minipar.nn.module import Module, walk
from minipar.parallel.tensor import ColumnParallelLinear, RowParallelLinear, VocabParallelHead

# The layers whose backward ends with ``self.weight_grads(x, dy)``.
LINEARS = (ColumnParallelLinear, RowParallelLinear, VocabParallelHead)


def linears(module: Module) -> list[Module]:
    """Every linear layer in ``module``, in walk order."""
    return [m for m in walk(module) if isinstance(m, LINEARS)]


class DeferredWeightGrads(Module):
    """Keeps each deferred microbatch's weight-gradient work until its W pass."""

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict = {}  # mb -> [(layer's weight_grads, x, dy), ...] in backward order

    @contextmanager
    def collect(self, chunk: Module, mb):
        """Within the block, the linears of ``chunk`` keep their dW work for ``run(mb)``."""
        layers = linears(chunk)
        kept = self._pending.setdefault(mb, [])
        for layer in layers:
            # An instance attribute shadows the class's method for this backward only.
            layer.weight_grads = partial(_keep, kept, layer.weight_grads)
        try:
            yield
        finally:
            for layer in layers:
                del layer.weight_grads
            if not kept:  # nothing deferred: the microbatch holds nothing here
                del self._pending[mb]

    def run(self, mb) -> None:
        """The W pass of microbatch ``mb``: every kept dW = x^T dy, accumulated now."""
        for weight_grads, x, dy in self._pending.pop(mb, []):
            weight_grads(x, dy)


def _keep(kept: list, weight_grads, x, dy) -> None:
    kept.append((weight_grads, x, dy))
