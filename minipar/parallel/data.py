"""Data parallelism: every dp rank runs the same model on its slice of the global batch, then the
gradients are summed over the dp group so that every replica takes the serial step.

Why a sum and not an average: each microbatch loss is already divided by the number of scored
tokens in the *global* batch (see ``VocabParallelCrossEntropy``), so the sum over ranks and
microbatches of the gradients is exactly the gradient of the serial mean loss.

Before the dp sync, parameters whose gradient is a partial sum over the tp group (LayerNorm and
biases in sequence-parallel regions, Korthikanti et al. 2022) are allreduced over tp.
"""

from __future__ import annotations

from minipar import backend
from minipar.nn.optim import local_grad_sq, make_optimizer


def flatten(arrays, dtype):
    """One contiguous buffer holding ``arrays`` back to back (None counts as zeros)."""
    xp = backend.xp()
    sizes = [a.size for a in arrays]
    flat = xp.empty(sum(sizes), dtype=dtype)
    offset = 0
    for a, n in zip(arrays, sizes):
        flat[offset:offset + n] = a.reshape(-1)
        offset += n
    return flat


def unflatten_into(flat, arrays) -> None:
    """Copy slices of ``flat`` back into ``arrays`` (in place)."""
    offset = 0
    for a in arrays:
        a[...] = flat[offset:offset + a.size].reshape(a.shape)
        offset += a.size


def _ensure_grads(params) -> None:
    xp = backend.xp()
    for p in params:
        if p.grad is None:
            p.grad = xp.zeros_like(p.data)


def sync_tp_partial_grads(params, tp) -> None:
    """Allreduce over tp the gradients that each tp rank holds only a partial sum of."""
    partial = [p for p in params if p.tp_partial_grad]
    if tp.size == 1 or not partial:
        return
    _ensure_grads(partial)
    flat = flatten([p.grad for p in partial], partial[0].grad.dtype)
    tp.allreduce_(flat)
    unflatten_into(flat, [p.grad for p in partial])


class DataParallel:
    """Plain data parallelism (ZeRO stage 0): one allreduce of all gradients per step."""

    zero = 0

    def __init__(self, params, mesh, optimizer: str = "adamw", lr: float = 1e-3,
                 weight_decay: float = 0.0):
        self.params = list(params)
        self.mesh = mesh
        self.optimizer = make_optimizer(optimizer, self.params, lr, weight_decay)

    def install_hooks(self, chunks) -> None:
        """Plain data parallelism syncs after backward and needs no hooks."""

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def materialize(self) -> None:
        """Make every Param hold its full (tp-local) data and gradient; ZeRO-3 gathers here."""

    def release(self) -> None:
        """Undo ``materialize`` (ZeRO-3 frees the gathered parameters again)."""

    def sync_grads(self) -> None:
        """Make every rank's gradients the gradient of the serial global-batch loss."""
        _ensure_grads(self.params)
        sync_tp_partial_grads(self.params, self.mesh.tp)
        dp = self.mesh.dp
        if dp.size > 1:
            grads = [p.grad for p in self.params]
            flat = flatten(grads, grads[0].dtype)
            dp.allreduce_(flat)
            unflatten_into(flat, grads)

    def grad_sq(self) -> float:
        """This rank's share of the global squared gradient norm (summed over the world later):
        replicas hold identical gradients, so only dp rank 0 contributes."""
        if self.mesh.dp_rank != 0:
            return 0.0
        return local_grad_sq(self.params, self.mesh.tp_rank)

    def step(self, lr: float, clip_coef: float = 1.0) -> None:
        if clip_coef != 1.0:
            for p in self.params:
                p.grad *= clip_coef
        self.optimizer.step(lr)

    def memory(self) -> dict:
        """Bytes this rank holds for parameters, gradients and optimizer state."""
        return {
            "params": sum(int(p.data.nbytes) for p in self.params),
            "grads": sum(int(p.data.nbytes) for p in self.params),
            "optimizer": self.optimizer.state_bytes(),
        }
