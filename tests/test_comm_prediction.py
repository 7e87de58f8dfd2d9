"""The cost model's communication equals what a real step records, exactly, for every layout.

``minipar.sim.comm_volume.predict_comm_bytes`` is compared with the ``CommStats`` of real
training steps (``minipar.compare.train_layout`` on an in-process thread world) for every rank
and every group, call for call and byte for byte, over drawn combinations of dp, tp, pp,
ZeRO 0-3, gradient buckets, microbatches, sequence parallelism, schedules and tied weights.
``tests/mpi/test_comm_prediction_mpi.py`` imports ``draw_layout`` and ``comm_problems`` to do
the same under mpirun. The prediction lays out its dp buffers from ``param_specs``; the first
test pins that list to the parameters of the built model.
"""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import example, given, settings
from hypothesis import strategies as st

from minipar.compare import random_batches, train_layout
from minipar.config import ModelConfig, ParallelConfig
from minipar.dist.comm import run_threads
from minipar.nn.module import BuildContext
from minipar.models.gpt import build_chunks
from minipar.parallel.data import unit_owners
from minipar.sim.comm_volume import param_specs, predict_comm_bytes

E = 8  # float64
STEPS = 2
SMALL_BUCKETS_MB = (0.001, 0.004)  # ~1 and ~4 KiB: several buckets even for these tiny models


@st.composite
def draw_layout(draw, world: int | None = None) -> dict:
    """A tiny model, a layout (dp x tp x pp == ``world`` when given) and a global batch."""
    if world is None:
        tp = draw(st.sampled_from([1, 2, 4]))
        pp = draw(st.sampled_from([1, 2])) if tp <= 2 else 1
        dp = draw(st.sampled_from([d for d in (1, 2, 4) if d * tp * pp <= 8]))
    else:
        tp = draw(st.sampled_from([t for t in (1, 2, 4) if world % t == 0]))
        pp = draw(st.sampled_from([p for p in (1, 2) if world % (tp * p) == 0]))
        dp = world // (tp * pp)
    schedule = draw(st.sampled_from(["1f1b", "gpipe", "interleaved", "zb-h1"]))
    v = 2 if schedule == "interleaved" else 1
    m = pp * draw(st.integers(1, 2)) if schedule == "interleaved" else draw(st.integers(1, 3))
    zero = draw(st.sampled_from([0, 1, 2] if schedule == "zb-h1" else [0, 1, 2, 3]))
    bucket = 0.0
    if zero < 3 and schedule != "zb-h1":
        bucket = draw(st.sampled_from((0.0, *SMALL_BUCKETS_MB)))
    par = ParallelConfig(dp=dp, tp=tp, pp=pp, zero=zero, bucket_mb=bucket, microbatches=m,
                         schedule=schedule, virtual_stages=v,
                         sequence_parallel=tp > 1 and draw(st.booleans()))
    cfg = ModelConfig(vocab_size=draw(st.sampled_from([11, 16])), seq_len=4,
                      n_layers=pp * v * draw(st.integers(1, 2)), d_model=8, n_heads=4,
                      tie_weights=pp * v == 1 and draw(st.booleans()),
                      pos=draw(st.sampled_from(["learned", "sinusoidal"])))
    return {"cfg": cfg, "par": par, "batch": dp * m * draw(st.integers(1, 2))}


def recorded(stats: dict) -> dict:
    """{group: {op: {"calls", "bytes"}}} of one step's ``Mesh.stats()``, empty groups left out."""
    return {group: {op: {"calls": s["calls"], "bytes": s["bytes"]} for op, s in ops.items()}
            for group, ops in stats.items() if ops}


def comm_problems(case: dict, rank: int, result) -> list[str]:
    """Where this world rank's recorded traffic differs from the prediction ([] if nowhere)."""
    par = case["par"]
    tp_rank, dp_rank, stage = rank % par.tp, rank // par.tp % par.dp, rank // (par.tp * par.dp)
    want = predict_comm_bytes(case["cfg"], par, case["batch"], E, stage=stage, dp_rank=dp_rank)
    bad = []
    for step, stats in enumerate(result.comm):
        got = recorded(stats)
        for group in sorted(set(got) | set(want)):
            if got.get(group) != want.get(group):
                bad.append(f"rank {rank} (stage {stage}, dp {dp_rank}, tp {tp_rank}) step "
                           f"{step + 1} {group}: recorded {got.get(group)} != predicted "
                           f"{want.get(group)}")
    return bad


def run(world, case: dict):
    batches = random_batches(case["cfg"], STEPS, case["batch"], seed=2)
    return train_layout(world, case["cfg"], case["par"], batches, seed=2)


def _case(batch: int, cfg_kw: dict | None = None, **par_kw) -> dict:
    shape = {"vocab_size": 11, "seq_len": 4, "n_layers": 2, "d_model": 8, "n_heads": 4}
    cfg = ModelConfig(**{**shape, **(cfg_kw or {})})
    return {"cfg": cfg, "par": ParallelConfig(**par_kw), "batch": batch}


# Cases every run checks, whatever hypothesis draws: the differences the ZeRO work found.
NAMED = [
    _case(4, dp=2, tp=2, zero=1, bucket_mb=0.001, sequence_parallel=True),  # shard of partials
    _case(8, {"tie_weights": True}, dp=4, zero=3, microbatches=2),  # tied head, one gather
    _case(4, dp=2, pp=2, zero=2, microbatches=2, bucket_mb=0.004),  # buckets per stage
    _case(8, dp=2, tp=2, pp=2, zero=3, microbatches=2, sequence_parallel=True,
          schedule="gpipe"),
    _case(4, {"n_layers": 4}, dp=2, pp=2, zero=1, microbatches=2, schedule="interleaved",
          virtual_stages=2, bucket_mb=0.001),
    _case(6, dp=2, tp=2, zero=2, microbatches=3, schedule="zb-h1", sequence_parallel=True),
]


@settings(max_examples=50, deadline=None, derandomize=True)
@given(case=draw_layout())
@example(case=NAMED[0])
@example(case=NAMED[1])
@example(case=NAMED[3])
def test_predicted_comm_equals_every_rank_and_group_of_real_steps(case):
    results = run_threads(lambda w: run(w, case), case["par"].world)
    bad = [b for rank, r in enumerate(results) for b in comm_problems(case, rank, r)]
    assert not bad, f"{case}: {bad[:4]}"


def test_named_layouts():
    for case in NAMED[2:]:
        results = run_threads(lambda w, c=case: run(w, c), case["par"].world)
        bad = [b for rank, r in enumerate(results) for b in comm_problems(case, rank, r)]
        assert not bad, f"{case}: {bad[:4]}"


@settings(max_examples=25, deadline=None, derandomize=True)
@given(case=draw_layout())
def test_param_specs_are_the_built_models_parameters(case):
    """Names, tp-local shapes, tp-partial flags, order and owner units of every stage's
    parameters, as ``Engine`` builds them (a stand-in tp group: building communicates
    nothing)."""
    cfg, par = case["cfg"], case["par"]
    for stage in range(par.pp):
        tp = SimpleNamespace(size=par.tp, rank=par.tp - 1)
        ctx = BuildContext(0, "float64", tp, par.sequence_parallel)
        chunks = build_chunks(cfg, ctx, par.pp, par.virtual_stages, stage)
        params = [p for c in chunks for p in c.params()]
        _, owner = unit_owners(chunks, params)
        built = [(p.name, tuple(p.data.shape), owner[id(p)], p.tp_partial_grad) for p in params]
        specs = [(s.name, s.shape, s.unit, s.tp_partial_grad)
                 for s in param_specs(cfg, par, stage)]
        assert specs == built


def test_partial_gradients_split_over_dp_shards_under_zero():
    """Under ZeRO with SP the dp ranks' tp allreduces of partial gradients differ in size and
    together cover every partial element once (so the prediction needs the dp rank)."""
    from minipar.sim.comm_volume import partial_elements

    cfg = ModelConfig(vocab_size=11, seq_len=4, n_layers=2, d_model=8, n_heads=4)
    for zero in (1, 2, 3):
        par = ParallelConfig(dp=4, tp=2, zero=zero, sequence_parallel=True)
        shards = [partial_elements(cfg, par, 0, r, E) for r in range(4)]
        whole = partial_elements(cfg, ParallelConfig(dp=4, tp=2, sequence_parallel=True), 0)
        assert sum(shards) == whole and len(set(shards)) > 1, (zero, shards, whole)
