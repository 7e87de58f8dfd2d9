"""Data parallelism and ZeRO 1/2/3 equal the serial run; bytes and memory equal the theory.

Each drawn layout trains a few float64 steps on an in-process thread world and is compared with
the serial run of the same global batches (losses per step, full gradients and parameters after
the last step, rtol 1e-9). The dp group's traffic of every step must equal, call for call and
byte for byte, the accounting stated in ``minipar.parallel.zero`` (written out again here from
the cost model's parameter counts, not from the implementation). ``tests/mpi/`` imports
``draw_case``, ``check_rank`` and ``expected_memory`` to run the same properties under mpirun.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from minipar.compare import mismatches, random_batches, serial_reference, train_layout
from minipar.config import ConfigError, ModelConfig, ParallelConfig
from minipar.dist.comm import local_comm, run_threads
from minipar.dist.mesh import Mesh
from minipar.engine import Engine
from minipar.models.gpt import build_chunks
from minipar.nn.module import BuildContext
from minipar.sim.comm_volume import predict_comm_bytes
from minipar.sim.costmodel import units

E = 8  # float64
BATCH, STEPS, RTOL = 8, 2, 1e-9
SMALL_BUCKET_MB = 0.001  # ~1 KiB: several buckets even for the tiniest model
MIB = 2 ** 20


# -- the theory, from parameter counts ------------------------------------------------------------

def unit_params(cfg: ModelConfig, par: ParallelConfig, stage: int) -> list[int]:
    """Elements of each unit (embedding, blocks, head) one rank of ``stage`` holds."""
    return [u.params for chunk in units(cfg, par, stage) for u in chunk]


def padded(n: int, dp: int) -> int:
    return -(-n // dp) * dp


def _op(calls: int, nbytes: int, wire: int) -> dict:
    return {"calls": calls, "bytes": nbytes, "wire_bytes": wire}


def expected_dp_comm(cfg: ModelConfig, par: ParallelConfig, stage: int) -> dict:
    """One step's dp-group CommStats totals by op (ring accounting, see minipar.dist.comm)."""
    p = par.dp
    if p == 1:
        return {}
    sizes = unit_params(cfg, par, stage)
    psi = sum(sizes)
    if par.zero == 0:
        total = psi * E
        calls = 1 if par.bucket_mb == 0 else math.ceil(total / (par.bucket_mb * MIB))
        return {"allreduce": _op(calls, total, 2 * (p - 1) * total // p)}
    if par.zero in (1, 2):
        flat = padded(psi, p) * E
        rs_calls = 1 if par.bucket_mb == 0 else min(padded(psi, p) // p,
                                                     math.ceil(flat / (par.bucket_mb * MIB)))
        return {"reduce_scatter": _op(rs_calls, flat, (p - 1) * flat // p),
                "allgather": _op(1, flat, (p - 1) * flat // p)}
    m = par.microbatches
    flat = sum(padded(n, p) for n in sizes) * E
    return {"allgather": _op(2 * m * len(sizes), 2 * m * flat, 2 * m * (p - 1) * flat // p),
            "reduce_scatter": _op(m * len(sizes), m * flat, m * (p - 1) * flat // p)}


def expected_memory(cfg: ModelConfig, par: ParallelConfig, stage: int, optimizer: str) -> dict:
    """The ZeRO paper's per-rank model states (section 5.1) with this layout's exact padding."""
    k = 2 if optimizer == "adamw" else 1
    sizes = unit_params(cfg, par, stage)
    psi, dp = sum(sizes), par.dp
    if par.zero == 0:
        return {"params": psi * E, "grads": psi * E, "optimizer": k * psi * E}
    if par.zero in (1, 2):
        full = padded(psi, dp)
        grads = full if par.zero == 1 else full // dp
        return {"params": full * E, "grads": grads * E, "optimizer": k * full // dp * E}
    shard = sum(padded(n, dp) // dp for n in sizes)
    return {"params": shard * E, "grads": shard * E, "optimizer": k * shard * E}


# -- drawn layouts ---------------------------------------------------------------------------------

@st.composite
def draw_case(draw, world: int | None = None) -> dict:
    """A model, a layout (dp x tp x pp == ``world`` when given) and an optimizer."""
    if world is None:
        dp = draw(st.sampled_from([1, 2, 4]))
        tp = draw(st.sampled_from([1, 2])) if dp <= 2 else 1
        pp = draw(st.sampled_from([1, 2])) if dp * tp <= 2 else 1
    else:
        tp = draw(st.sampled_from([1, 2]))
        pp = draw(st.sampled_from([1, 2])) if world // tp >= 2 else 1
        dp = world // (tp * pp)
    zero = draw(st.sampled_from([0, 1, 2, 3]))
    bucket = 0.0 if zero == 3 else draw(st.sampled_from([0.0, SMALL_BUCKET_MB]))
    par = ParallelConfig(dp=dp, tp=tp, pp=pp, zero=zero, bucket_mb=bucket,
                         microbatches=draw(st.sampled_from([1, 2])),
                         sequence_parallel=tp > 1 and draw(st.booleans()),
                         schedule=draw(st.sampled_from(["1f1b", "gpipe"])))
    cfg = ModelConfig(vocab_size=draw(st.sampled_from([11, 16])), seq_len=4,
                      n_layers=draw(st.sampled_from([2, 4])),
                      d_model=draw(st.sampled_from([8, 16])), n_heads=2,
                      tie_weights=pp == 1 and draw(st.booleans()),
                      pos=draw(st.sampled_from(["learned", "sinusoidal"])))
    return {"cfg": cfg, "par": par, "optimizer": draw(st.sampled_from(["adamw", "sgd"]))}


def run_case(world, case: dict, batches):
    """Train the case on ``world`` (collective); weight decay high enough to matter."""
    return train_layout(world, case["cfg"], case["par"], batches, optimizer=case["optimizer"],
                        weight_decay=0.1)


def check_rank(case: dict, rank: int, result, reference) -> list[str]:
    """Why this rank's run is not the serial run or its traffic not the theory ([] if fine)."""
    cfg, par = case["cfg"], case["par"]
    stage = rank // (par.dp * par.tp)
    bad = mismatches(result, reference, RTOL)
    want = expected_dp_comm(cfg, par, stage)
    for step, stats in enumerate(result.comm):
        got = stats.get("dp", {})
        got = {op: {k: s[k] for k in ("calls", "bytes", "wire_bytes")} for op, s in got.items()}
        if got != want:
            bad.append(f"step {step + 1} dp traffic {got} != theory {want}")
    if par.zero == 0 or par.bucket_mb == 0:  # the cost model agrees with the theory there
        predicted = predict_comm_bytes(cfg, par, BATCH, E, stage).get("dp", {})
        mine = {op: {"calls": s["calls"], "bytes": s["bytes"]} for op, s in want.items()}
        if predicted != mine:
            bad.append(f"cost model {predicted} != theory {mine}")
    return bad


CASE_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                         suppress_health_check=list(HealthCheck))


def _case(cfg_kw: dict, optimizer: str = "adamw", **par_kw) -> dict:
    cfg = ModelConfig(vocab_size=11, seq_len=4, n_layers=2, d_model=8, n_heads=2, **cfg_kw)
    return {"cfg": cfg, "par": ParallelConfig(**par_kw), "optimizer": optimizer}


@CASE_SETTINGS
@given(case=draw_case())
@example(case=_case({}, dp=2, tp=2, zero=3, microbatches=2, sequence_parallel=True))
@example(case=_case({"tie_weights": True}, "sgd", dp=4, zero=3, microbatches=2))
@example(case=_case({}, "sgd", dp=2, tp=2, zero=2, bucket_mb=SMALL_BUCKET_MB))
@example(case=_case({}, dp=4, zero=0, microbatches=2, bucket_mb=SMALL_BUCKET_MB))
@example(case=_case({}, dp=2, pp=2, zero=1, microbatches=2, bucket_mb=SMALL_BUCKET_MB))
def test_data_parallel_equals_serial_and_moves_the_theoretical_bytes(case):
    batches = random_batches(case["cfg"], STEPS, BATCH, seed=3)
    reference = serial_reference(case["cfg"], batches, optimizer=case["optimizer"],
                                 weight_decay=0.1)
    results = run_threads(lambda w: run_case(w, case, batches), case["par"].world)
    for rank, result in enumerate(results):
        assert check_rank(case, rank, result, reference) == [], f"rank {rank}"


# -- memory ---------------------------------------------------------------------------------------

MEM_CFG = ModelConfig(vocab_size=13, seq_len=4, n_layers=2, d_model=8, n_heads=2)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
@pytest.mark.parametrize("dp,tp", [(1, 1), (2, 1), (4, 1), (2, 2)])
def test_memory_equals_the_zero_formulas(dp, tp, zero, optimizer):
    par = ParallelConfig(dp=dp, tp=tp, zero=zero)
    batches = random_batches(MEM_CFG, 1, BATCH, seed=0)

    def job(world):
        mesh = Mesh(world, dp=dp, tp=tp)
        engine = Engine(MEM_CFG, par, mesh, dtype="float64", optimizer=optimizer)
        before = engine.dp.memory()
        rows = BATCH // dp
        x, y = batches[0]
        engine.train_step(x[mesh.dp_rank * rows:][:rows], y[mesh.dp_rank * rows:][:rows],
                          float((y >= 0).sum()))
        return before, engine.dp.memory()

    want = expected_memory(MEM_CFG, par, 0, optimizer)
    for before, after in run_threads(job, dp * tp):
        assert before == want and after == want


# -- what happens when ---------------------------------------------------------------------------

def _engine(world, cfg, par, **kw):
    mesh = Mesh(world, dp=par.dp, tp=par.tp, pp=par.pp)
    return mesh, Engine(cfg, par, mesh, dtype="float64", **kw)


@pytest.mark.parametrize("told", [False, True])
@pytest.mark.parametrize("zero", [0, 1, 2])
def test_buckets_launch_during_the_last_microbatch_backward(zero, told):
    """From the step the microbatch count is known (told, or learned in step 1), every bucket
    starts inside the last microbatch's backward, none in sync_grads."""
    cfg = ModelConfig(vocab_size=11, seq_len=4, n_layers=2, d_model=8, n_heads=2)
    par = ParallelConfig(dp=2, zero=zero, microbatches=2, bucket_mb=SMALL_BUCKET_MB)
    batches = random_batches(cfg, 2, BATCH, seed=1)

    def job(world):
        mesh, engine = _engine(world, cfg, par)
        # The engine tells the strategy the count; without it the first step learns it.
        engine.dp.microbatches = par.microbatches if told else None
        where = {"mb": None, "sync": False}
        launches = []
        op_name = "iallreduce_" if zero == 0 else "reduce_scatter"
        launch = getattr(mesh.dp, op_name)

        def spy(*a, **k):
            launches.append((len(done), where["sync"], where["mb"]))
            return launch(*a, **k)
        setattr(mesh.dp, op_name, spy)
        chunk = engine.chunks[0]
        backward, sync = chunk.backward, engine.dp.sync_grads

        def traced_backward(dy=None, mb=0, **k):
            where["mb"] = mb
            try:
                return backward(dy, mb, **k)
            finally:
                where["mb"] = None

        def traced_sync():
            where["sync"] = True
            sync()
            where["sync"] = False
        chunk.backward, engine.dp.sync_grads = traced_backward, traced_sync
        done = []
        for x, y in batches:
            engine.train_step(x[:4] if mesh.dp_rank == 0 else x[4:],
                              y[:4] if mesh.dp_rank == 0 else y[4:], float((y >= 0).sum()))
            done.append(1)
        return launches, len(engine.dp.layout.segments)

    for launches, n_buckets in run_threads(job, 2):
        assert n_buckets > 2
        step1 = [(s, mb) for k, s, mb in launches if k == 0]
        step2 = [(s, mb) for k, s, mb in launches if k == 1]
        assert len(step1) == len(step2) == n_buckets
        assert step2 == [(False, 1)] * n_buckets  # overlapped, in the last microbatch
        assert step1 == ([(False, 1)] * n_buckets if told else [(True, None)] * n_buckets)


def test_zero3_holds_only_the_running_unit():
    cfg = ModelConfig(vocab_size=11, seq_len=4, n_layers=2, d_model=8, n_heads=2,
                      tie_weights=True)
    par = ParallelConfig(dp=2, zero=3)
    (x, y), = random_batches(cfg, 1, BATCH, seed=2)

    def job(world):
        mesh, engine = _engine(world, cfg, par)
        blocks = engine.chunks[0].blocks
        seen = []
        for i, block in enumerate(blocks):
            def traced(h, mb=0, block=block, i=i, forward=block.forward):
                others = [p for b in blocks if b is not block for p in b.params()]
                seen.append(all(p.data is not None for p in block.params())
                            and all(p.data is None for p in others))
                return forward(h, mb)
            block.forward = traced
        engine.train_step(x[:4] if mesh.dp_rank == 0 else x[4:],
                          y[:4] if mesh.dp_rank == 0 else y[4:], float((y >= 0).sum()))
        freed = all(p.data is None and p.grad is None for p in engine.params)
        full = engine.full_params()
        again = all(p.data is None and p.grad is None for p in engine.params)
        return seen, freed, again, sorted(full)

    for seen, freed, again, names in run_threads(job, 2):
        assert seen == [True, True] and freed and again
        assert "embed.w" in names and not any(n.startswith("head.w") for n in names)


@pytest.mark.parametrize("par", [
    ParallelConfig(dp=2, microbatches=2),
    ParallelConfig(dp=2, microbatches=2, bucket_mb=SMALL_BUCKET_MB),
    ParallelConfig(dp=2, zero=1),
    ParallelConfig(dp=2, zero=2, microbatches=2, bucket_mb=SMALL_BUCKET_MB),
    ParallelConfig(dp=2, zero=3, microbatches=2),
    ParallelConfig(dp=2, tp=2, zero=1, sequence_parallel=True),
], ids=["dp", "buckets", "zero1", "zero2-buckets", "zero3", "zero1-tp-sp"])
def test_step_clips_to_the_global_norm(par):
    """One SGD step equals p - lr c g with g, its norm and c = max / (norm + 1e-6) computed
    here from one serial forward and backward of the model's chunk, no engine involved."""
    cfg = ModelConfig(vocab_size=11, seq_len=4, n_layers=2, d_model=8, n_heads=2)
    (x, y), = random_batches(cfg, 1, BATCH, seed=5)
    scored = float((y >= 0).sum())
    chunk = build_chunks(cfg, BuildContext(0, "float64", local_comm()))[0]
    start = {p.name: p.data.copy() for p in chunk.params()}
    chunk.forward(x, 0, y, scored)
    chunk.backward(None, 0)
    grads = {p.name: p.grad for p in chunk.params()}
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    max_norm, lr = norm / 4, 0.1
    clip = max_norm / (norm + 1e-6)

    def job(world):
        mesh, engine = _engine(world, cfg, par, optimizer="sgd", lr=lr, grad_clip=max_norm)
        rows = BATCH // par.dp
        lo = mesh.dp_rank * rows
        return engine.train_step(x[lo:lo + rows], y[lo:lo + rows], scored), engine.full_params()

    for result, params in run_threads(job, par.world):
        assert result.grad_norm == pytest.approx(norm, rel=RTOL)
        assert result.clip == pytest.approx(clip, rel=RTOL) and not result.skipped
        for name, p0 in start.items():
            assert _relative_error(params[name], p0 - lr * clip * grads[name]) < RTOL, name


def _relative_error(a, b) -> float:
    """Largest difference relative to the tensor's largest entry (as compare.mismatches)."""
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_checkpoint_state_is_layout_independent(zero):
    """Sharded optimizer state gathers to the serial one; loading it into ZeRO continues the
    serial run exactly."""
    cfg = ModelConfig(vocab_size=11, seq_len=4, n_layers=2, d_model=8, n_heads=2)
    batches = random_batches(cfg, 3, BATCH, seed=4)

    def train(world, par, state=None, steps=batches):
        mesh, engine = _engine(world, cfg, par, lr=1e-2, weight_decay=0.1)
        if state is not None:
            engine.load_full_state(*state)
        rows = BATCH // par.dp
        for x, y in steps:
            lo = mesh.dp_rank * rows
            engine.train_step(x[lo:lo + rows], y[lo:lo + rows], float((y >= 0).sum()))
        return (engine.full_params(), engine.full_optimizer_state(), engine.optimizer_steps())

    serial = run_threads(lambda w: train(w, ParallelConfig(), steps=batches[:2]), 1)[0]
    sharded = run_threads(lambda w: train(w, ParallelConfig(dp=2, zero=zero),
                                          steps=batches[:2]), 2)
    for params, optim, steps in sharded:
        assert steps == serial[2] == 2 and sorted(optim) == sorted(serial[1])
        for name, ref in {**serial[0], **serial[1]}.items():
            assert _relative_error({**params, **optim}[name], ref) < RTOL, name
    final = run_threads(lambda w: train(w, ParallelConfig(), steps=batches), 1)[0][0]
    resumed = run_threads(lambda w: train(w, ParallelConfig(dp=2, zero=zero), serial,
                                          batches[2:]), 2)
    for params, _, steps in resumed:
        assert steps == 3
        for name, ref in final.items():
            assert _relative_error(params[name], ref) < RTOL, name


@pytest.mark.parametrize("kw,words", [
    (dict(zero=3, schedule="zb-h1"), ["zb-h1", "--zero 3"]),
    (dict(bucket_mb=1.0, schedule="zb-h1"), ["zb-h1", "--bucket-mb"]),
    (dict(zero=3, bucket_mb=1.0), ["--bucket-mb", "--zero 3"]),
])
def test_incompatible_options_are_config_errors(kw, words):
    with pytest.raises(ConfigError) as err:
        ParallelConfig(dp=2, **kw).validate()
    assert all(w in str(err.value) for w in words)
