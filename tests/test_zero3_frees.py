"""ZeRO-3 really frees a unit's gathered weights between its passes (Rajbhandari et al. 2019).

A unit's parameters are gathered before its forward, freed after it, gathered again before its
backward and freed after that. That only saves memory if nothing else keeps the gathered buffer
alive: layer caches must hold activations, never weights. The test watches every gathered
buffer with a weak reference and, after every hook of every unit, requires that exactly the
segments ZeRO-3 itself holds (``_live``) are alive. A cache that kept a weight would keep its
whole unit alive until the unit's backward, and the activation meter (``minipar.nn.memory``)
would count it as activation memory; so the measured activation peak under ZeRO-3 must equal
ZeRO-0's.

The linear layers (``minipar.parallel.tensor``) read their weight from the Param in backward,
and ``LayerNorm`` (``minipar.nn.module``) its gain: one cached gain, a view of the gathered
unit, would keep the whole unit alive.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest

from minipar.compare import random_batches
from minipar.config import ModelConfig, ParallelConfig, replace
from minipar.tasks import IGNORE
from minipar.dist.comm import local_comm, run_threads
from minipar.dist.mesh import Mesh
from minipar.engine import Engine
from minipar.nn.memory import arrays_in, held, owner
from minipar.nn.module import BuildContext, walk
from minipar.models.gpt import build_chunks
from minipar.nn.module import Hooks
from minipar.parallel.deferral import LINEARS
from on_device import down, up

BATCH = 8


class Watch(Hooks):
    """Runs ZeRO-3's hooks, then checks which gathered buffers are still alive."""

    def __init__(self, inner: Hooks, zero3, gathered: dict, problems: list):
        self.inner, self.zero3, self.gathered, self.problems = inner, zero3, gathered, problems

    def _check(self, when: str, unit) -> None:
        alive = {k: ref() for k, ref in self.gathered.items() if ref() is not None}
        live = {k for k, n in enumerate(self.zero3._live) if n > 0}
        if set(alive) != live:
            self.problems["unit"].append(
                f"after {when} of {type(unit).__name__}: gathered segments {sorted(alive)} "
                f"alive, ZeRO-3 holds {sorted(live)}")
        buffers = {id(b) for b in alive.values()}
        for m in walk(unit):
            if isinstance(m, LINEARS) and any(
                    id(owner(a)) in buffers for a in arrays_in([kept for _, kept, _ in held(m)])):
                self.problems["linear"].append(f"after {when}: {type(m).__name__} of "
                                               f"{type(unit).__name__} caches a weight")

    def pre_forward(self, unit, mb):
        self.inner.pre_forward(unit, mb)
        self._check("pre_forward", unit)

    def post_forward(self, unit, mb):
        self.inner.post_forward(unit, mb)
        self._check("post_forward", unit)

    def pre_backward(self, unit, mb):
        self.inner.pre_backward(unit, mb)
        self._check("pre_backward", unit)

    def post_backward(self, unit, mb):
        self.inner.post_backward(unit, mb)
        self._check("post_backward", unit)


def _train(world, cfg: ModelConfig, par: ParallelConfig, watch: bool):
    """Two steps on ``world``; (problems seen by the watch by kind, activation peak)."""
    mesh = Mesh(world, dp=par.dp, pp=par.pp, tp=par.tp)
    engine = Engine(cfg, par, mesh, dtype="float64")
    problems: dict[str, list] = {"unit": [], "linear": []}
    if watch:
        zero3, gathered = engine.dp, {}
        gather = zero3._gather_slice

        def spy(shard, k):
            full = gather(shard, k)
            gathered[k] = weakref.ref(owner(full))  # the buffer, not a view of it
            return full
        zero3._gather_slice = spy
        for chunk in engine.chunks:
            chunk.hooks = Watch(chunk.hooks, zero3, gathered, problems)
    rows = BATCH // par.dp
    for x, y in random_batches(cfg, 2, BATCH, seed=4):
        lo = mesh.dp_rank * rows
        engine.train_step(x[lo:lo + rows], y[lo:lo + rows], float((y != IGNORE).sum()))
    return problems, engine.memory()["activations_peak"]


LAYOUTS = [
    ({}, ParallelConfig(dp=2, zero=3, microbatches=2)),
    ({"tie_weights": True}, ParallelConfig(dp=2, zero=3, microbatches=2)),
    ({}, ParallelConfig(dp=2, tp=2, zero=3, sequence_parallel=True, microbatches=2)),
    ({}, ParallelConfig(dp=2, pp=2, zero=3, microbatches=4, schedule="interleaved",
                        virtual_stages=2)),
]


def _cfg(cfg_kw: dict) -> ModelConfig:
    return replace(ModelConfig(vocab_size=11, seq_len=4, n_layers=4, d_model=8, n_heads=2),
                   **cfg_kw)


IDS = ["plain", "tied", "tp-sp", "interleaved"]


@pytest.mark.parametrize("cfg_kw,par", LAYOUTS, ids=IDS)
def test_linear_caches_hold_no_gathered_weight_under_zero3(cfg_kw, par):
    """Every column/row-parallel linear and the (tied) LM head cache activations only."""
    results = run_threads(lambda w: _train(w, _cfg(cfg_kw), par, watch=True), par.world)
    for rank, (problems, _) in enumerate(results):
        assert problems["linear"] == [], f"rank {rank}: {problems['linear'][:3]}"


@pytest.mark.parametrize("cfg_kw,par", LAYOUTS, ids=IDS)
def test_zero3_frees_gathered_weights_and_keeps_the_activation_peak(cfg_kw, par):
    cfg = _cfg(cfg_kw)
    zero3 = run_threads(lambda w: _train(w, cfg, par, watch=True), par.world)
    plain = run_threads(lambda w: _train(w, cfg, replace(par, zero=0), watch=False), par.world)
    for rank, ((problems, peak3), (_, peak0)) in enumerate(zip(zero3, plain)):
        assert problems["unit"] == [], f"rank {rank}: {problems['unit'][:3]}"
        assert peak3 == peak0 > 0, f"rank {rank}: activation peak {peak3} under ZeRO-3, " \
                                   f"{peak0} under ZeRO-0"


def test_deferred_weight_pass_keeps_no_weight():
    """Zero-bubble's deferred W pass keeps (dy, x) per linear, never the weight, and still
    produces the same weight gradients as the undeferred backward."""
    cfg = _cfg({"tie_weights": True})
    ctx = BuildContext(0, "float64", local_comm())
    x, y = random_batches(cfg, 1, 2, seed=1)[0]
    n = float((y != IGNORE).sum())
    x, y = up((x, y))
    grads = []
    for defer in (False, True):
        chunk = build_chunks(cfg, ctx)[0]
        chunk.forward(x, 0, y, n)
        chunk.backward(None, 0, defer_weight_grads=defer)
        layers = [m for m in walk(chunk) if isinstance(m, LINEARS)]
        if defer:
            weights = {id(owner(p.data)) for p in chunk.params()}
            assert len(chunk.deferred._pending[0]) == len(layers)
            kept = list(arrays_in([kept for _, kept, _ in held(chunk.deferred)]))
            assert kept and not any(id(owner(a)) in weights for a in kept)
            chunk.backward_weights(0)
        grads.append({p.name: down(p.grad) for p in chunk.params()})
    for name, g in grads[0].items():
        np.testing.assert_array_equal(grads[1][name], g, err_msg=name)
