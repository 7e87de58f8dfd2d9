"""Mixed-precision checks shared by the thread-world tests (tests/test_precision.py) and the
mpirun tests (tests/mpi/test_precision_mpi.py): each is a collective over ``world``.

Where the reduction order is the same as the serial run's, a 16-bit layout must equal the serial
run in the same precision bit for bit (``rtol=0``): pipeline stages only move activations, and
ZeRO-1/2/3 sum the same 16-bit gradients in the same rank order as plain data parallelism.
(Clipping is off there: the global norm is a sum of squares taken per stage or per shard, in
fp32, so its last bits depend on the layout, and so would a clipped step's.) Where
it is not (tensor parallelism sums rounded 16-bit partial products over tp; data parallelism
rounds each rank's gradient before the sum, the serial run rounds once), the first step's loss
and gradients agree within ``TOLERANCE``: a few units of the format's last place (eps: bf16
2^-8, fp16 2^-11) relative to each tensor's largest entry. Later steps are not compared there:
AdamW turns a last-place difference of a near-zero gradient into a whole lr-sized step.
"""

from __future__ import annotations

import numpy

from minipar.compare import mismatches, random_batches, serial_reference, train_layout
from minipar.config import ModelConfig, ParallelConfig
from minipar.dist.assertions import collective_assert
from minipar.dist.comm import local_comm
from minipar.dist.mesh import Mesh
from minipar.engine import Engine
from minipar.nn.precision import schedule
from minipar.sim.comm_volume import model_state_bytes, predict_comm_bytes
from minipar.tasks import IGNORE

EPS = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}
TOLERANCE = {name: 16 * eps for name, eps in EPS.items()}  # relative to the tensor's max
TINY = ModelConfig(vocab_size=11, seq_len=8, n_layers=2, d_model=16, n_heads=2)


def check_same_order_bitwise(world, cfg, par, precision, steps=2, seed=0) -> None:
    """``par`` (pipeline, or ZeRO beside plain dp) equals the reference bit for bit: the serial
    run with the same microbatches (pp), or plain dp of the same size (ZeRO)."""
    batches = random_batches(cfg, steps, par.dp * par.microbatches, seed=seed)
    result = train_layout(world, cfg, par, batches, seed=seed, precision=precision,
                          grad_clip=0.0)
    ref_par = ParallelConfig(microbatches=par.microbatches) if par.dp == 1 else \
        ParallelConfig(dp=par.dp, microbatches=par.microbatches)
    reference = _reference(world, cfg, ref_par, batches, seed, precision)
    bad = mismatches(result, reference, rtol=0.0)
    collective_assert(world, not bad, f"{precision} {par}: {bad[:3]}")


def _reference(world, cfg, ref_par, batches, seed, precision):
    """The reference run: serial (locally on every rank), or plain dp on the same world."""
    if ref_par.world == 1:
        return train_layout(local_comm(), cfg, ref_par, batches, seed=seed, precision=precision,
                            grad_clip=0.0)
    return train_layout(world, cfg, ref_par, batches, seed=seed, precision=precision,
                        grad_clip=0.0)


def check_within_tolerance(world, cfg, par, precision, seed=0) -> None:
    """One step of ``par`` against the serial run in the same precision: loss and gradients
    within ``TOLERANCE`` (different reduction order)."""
    batches = random_batches(cfg, 1, par.dp * par.microbatches, seed=seed)
    result = train_layout(world, cfg, par, batches, seed=seed, precision=precision)
    reference = serial_reference(cfg, batches, seed=seed, precision=precision)
    result.params, reference.params = {}, {}  # see the module doc
    bad = mismatches(result, reference, rtol=TOLERANCE[precision])
    collective_assert(world, not bad, f"{precision} {par}: {bad[:3]}")


def check_memory_and_bytes(world, cfg, par, precision, batch=8) -> None:
    """Engine.memory() equals the cost model's model_state_bytes, and one step's CommStats the
    predicted bytes, on every rank."""
    mesh = Mesh(world, par.dp, par.pp, par.tp)
    engine = Engine(cfg, par, mesh, precision=precision)
    ids = numpy.random.default_rng(0).integers(0, cfg.vocab_size, (batch, cfg.seq_len))
    lo, hi = batch * mesh.dp_rank // par.dp, batch * (mesh.dp_rank + 1) // par.dp
    mesh.reset_stats()  # under mpirun the world is shared with the tests before
    engine.train_step(ids[lo:hi], ids[lo:hi], float(batch * cfg.seq_len))
    got = {g: {op: {"calls": d["calls"], "bytes": d["bytes"]}
               for op, d in getattr(mesh, g).stats.as_dict().items()}
           for g in ("world", "dp", "pp", "tp")}
    got = {g: ops for g, ops in got.items() if ops}
    want = predict_comm_bytes(cfg, par, batch, 4, stage=mesh.pp_rank, dp_rank=mesh.dp_rank,
                              precision=precision)
    mem = {k: v for k, v in engine.memory().items() if k != "activations_peak"}
    formula = model_state_bytes(cfg, par, mesh.pp_rank, precision, dp_rank=mesh.dp_rank)
    collective_assert(world, got == want, f"{precision} {par}: bytes {got} != {want}")
    collective_assert(world, mem == formula, f"{precision} {par}: memory {mem} != {formula}")


def check_forced_overflow(world, cfg, par) -> None:
    """fp16: a step run with a huge loss scale overflows; every rank skips it (weights
    unchanged), the scale halves; from scale 1 with a window of 2, two clean steps double it."""
    mesh = Mesh(world, par.dp, par.pp, par.tp)
    engine = Engine(cfg, par, mesh, precision="fp16", loss_scale=1.0, loss_scale_window=2,
                    lr=1e-2)
    batches = random_batches(cfg, 6, par.dp * par.microbatches, seed=3)
    rows = len(batches[0][0]) // par.dp
    seen = []
    for i, (x, y) in enumerate(batches):
        if i == 2:
            # 2^40 times the loss: dlogits alone exceed fp16's largest value (65504)
            engine.scaler.scale = 2.0 ** 40
        before = engine.full_params()
        lo = mesh.dp_rank * rows
        r = engine.train_step(x[lo:lo + rows], y[lo:lo + rows], int((y != IGNORE).sum()))
        after = engine.full_params()
        same = all(numpy.array_equal(before[k], after[k]) for k in before)
        seen.append((r.loss_scale, r.skipped, same))
    # Hand-computed: scale 1, clean, clean (-> 2), forced 2^40 overflows (-> 2^39), and so on.
    assert seen[0][:2] == (1.0, False) and seen[1][:2] == (1.0, False)
    assert seen[2] == (2.0 ** 40, True, True), seen[2]
    assert seen[3][0] == 2.0 ** 39
    used = [s for s, _, _ in seen[2:]]
    outcomes = [not skipped for _, skipped, _ in seen[2:]]
    assert [s for s, _ in schedule(outcomes, 2.0 ** 40, 2)] == used
    assert all(same == skipped for _, skipped, same in seen)  # skipped <=> weights unchanged
    everyone = world.allgather_obj(seen)
    collective_assert(world, all(s == everyone[0] for s in everyone),
                      f"ranks disagree on the loss-scale schedule: {everyone}")
