"""Pipeline load balancing (``--partition``): any split of the blocks trains exactly as the serial
run; ``balanced`` is the best split and matches hand-computed answers; the runtime, the partition
report, the communication prediction and the simulator all use the same split; checkpoints move
between splits; bad values are one line naming the flag."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from inproc import train
from test_comm_prediction import comm_problems
from test_comm_prediction import run as comm_run

from minipar.compare import layout_mismatches
from minipar.config import SCHEDULE_NAMES, ConfigError, ModelConfig, ParallelConfig
from minipar.dist.comm import local_comm, run_threads
from minipar.models.gpt import build_chunks
from minipar.nn.module import BuildContext
from minipar.parallel.schedules import Bwd, Fwd
from minipar.sim.costmodel import Workload, model_flops, param_count, units
from minipar.sim.hardware import A100_80GB
from minipar.sim.partition import (
    balanced_blocks,
    partition,
    resolve_partition,
    unit_flops,
)
from minipar.sim.timing import instruction_costs
from minipar.train.cli import build_parser, make_configs


@st.composite
def compositions(draw, total: int, parts: int) -> tuple[int, ...]:
    """``total`` split into ``parts`` counts, each >= 1 (a ``--partition N,N,...``)."""
    cuts = sorted(draw(st.sets(st.integers(1, total - 1), min_size=parts - 1,
                               max_size=parts - 1))) if parts > 1 else []
    return tuple(b - a for a, b in zip((0, *cuts), (*cuts, total)))


@st.composite
def partitioned_layouts(draw):
    """(ModelConfig, ParallelConfig with a drawn --partition, rows per microbatch): every
    schedule, interleaved with 2 chunks per stage, pp 2 or 4, sometimes beside dp or tp."""
    pp = draw(st.sampled_from([2, 4]))
    tp = draw(st.sampled_from([1, 2])) if pp == 2 else 1
    dp = draw(st.sampled_from([1, 2])) if pp * tp == 2 else 1
    schedule = draw(st.sampled_from(SCHEDULE_NAMES))
    v = draw(st.integers(1, 2)) if schedule == "interleaved" else 1
    m = pp * draw(st.integers(1, 2)) if schedule == "interleaved" else draw(st.integers(1, 4))
    layers = pp * v + draw(st.integers(0, 3))
    cfg = ModelConfig(vocab_size=draw(st.integers(6, 40)), seq_len=4, n_layers=layers,
                      d_model=8, n_heads=2, pos=draw(st.sampled_from(["learned", "sinusoidal"])))
    zero = draw(st.sampled_from([0, 1, 2] if schedule == "zb-h1" else [0, 1, 2, 3])) * (dp > 1)
    par = ParallelConfig(dp=dp, tp=tp, pp=pp, schedule=schedule, microbatches=m,
                         virtual_stages=v, zero=zero,
                         sequence_parallel=tp > 1 and draw(st.booleans()),
                         partition=draw(compositions(layers, pp * v)))
    return cfg, par, draw(st.integers(1, 2))


@settings(max_examples=25, deadline=None)
@given(partitioned_layouts(), st.integers(0, 2**16))
def test_every_partition_equals_serial(layout, seed):
    """Losses, gradients and updated weights equal the serial run's, for any split."""
    cfg, par, rows = layout
    assert layout_mismatches(cfg, par, rows, seed) == {}, par


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_each_stage_builds_the_blocks_its_partition_names(data):
    """The built chunks, the partition report and the cost model's units agree block by block;
    the report's per-stage parameters are the built ones."""
    pp, v = data.draw(st.sampled_from([1, 2, 3])), data.draw(st.integers(1, 2))
    layers = pp * v + data.draw(st.integers(0, 4))
    cfg = ModelConfig(vocab_size=data.draw(st.integers(4, 64)), seq_len=4, n_layers=layers,
                      d_model=8, n_heads=2)
    blocks = data.draw(compositions(layers, pp * v))
    report = partition(cfg, pp, v, blocks)
    assert report.blocks == list(blocks)
    ctx = BuildContext(0, "float64", local_comm(), False)
    for s in range(pp):
        built = build_chunks(cfg, ctx, pp, v, s, blocks)
        par = ParallelConfig(pp=pp, virtual_stages=v, partition=blocks)
        for chunk, cost, unit in zip(built, report.stage_chunks(s), units(cfg, par, s)):
            n = sum(u.kind == "block" for u in unit)
            assert len(chunk.blocks) == blocks[chunk.spec.index] == cost.n_layers == n
        assert report.stage_params(s) == sum(int(np.prod(p.full_shape))
                                             for c in built for p in c.params())
    assert sum(report.stage_params(s) for s in range(pp)) == param_count(cfg)
    assert sum(report.stage_flops(s) for s in range(pp)) == pytest.approx(model_flops(cfg, 1))
    assert report.lines()[0].startswith(f"split   | --partition {','.join(map(str, blocks))}")


@settings(max_examples=15, deadline=None, derandomize=True)
@given(partitioned_layouts())
def test_predicted_comm_equals_commstats_under_any_partition(layout):
    """``sim.comm_volume`` predicts every rank's recorded bytes, call by call, for any split."""
    cfg, par, rows = layout
    case = {"cfg": cfg, "par": par, "batch": par.dp * par.microbatches * rows}
    results = run_threads(lambda w: comm_run(w, case), par.world)
    bad = [b for rank, r in enumerate(results) for b in comm_problems(case, rank, r)]
    assert not bad, f"{par}: {bad[:4]}"


# ------------------------------------------------------------------------------ balanced
def head_heavy(layers: int) -> ModelConfig:
    """A model whose head costs exactly two blocks' FLOPs: with d_model h = 8, seq s = 4 and a
    4h MLP, a block's forward is 24 s h^2 + 4 s^2 h = 6656 FLOPs and the head's 2 s h V, so
    V = 24 h + 4 s = 208 makes the head 13312 = 2 blocks."""
    return ModelConfig(vocab_size=208, seq_len=4, n_layers=layers, d_model=8, n_heads=2)


def test_the_head_heavy_model_is_what_the_hand_computation_says():
    emb, block, head = unit_flops(head_heavy(6))
    assert (emb, block, head) == (0.0, 3 * 6656.0, 3 * 13312.0)


@pytest.mark.parametrize("layers, pp, v, expected", [
    # Stage costs in blocks [k, 6 - k + 2]: k = 4 gives [4, 4], every other k a stage of 5.
    (6, 2, 1, [4, 2]),
    # [a, b, c + 2] with a + b + c = 7: a max of 3 needs c = 1 and a = b = 3.
    (7, 3, 1, [3, 3, 1]),
    # Equal [2, 2] costs [2, 4]: [3, 1] costs [3, 3].
    (4, 2, 1, [3, 1]),
    # Interleaved, 8 blocks over 2 stages of 2 chunks: stage totals [5, 3] cost [5, 5]; stage 0
    # deals its 5 as 3 + 2 (chunks 0 and 2), stage 1 its 3 as 2 + 1 (the head's chunk 3 last).
    (8, 2, 2, [3, 2, 2, 1]),
])
def test_balanced_split_of_hand_computable_cases(layers, pp, v, expected):
    cfg = head_heavy(layers)
    assert balanced_blocks(cfg, pp, v) == expected
    assert resolve_partition("balanced", cfg, pp, v) == tuple(expected)
    assert partition(cfg, pp, v, tuple(expected)).imbalance == pytest.approx(1.0)


@st.composite
def models(draw, max_layers=7):
    return ModelConfig(vocab_size=draw(st.integers(4, 400)), seq_len=draw(st.integers(2, 16)),
                       n_layers=draw(st.integers(1, max_layers)),
                       d_model=draw(st.sampled_from([4, 8, 12])), n_heads=2)


@settings(max_examples=30, deadline=None)
@given(models(), st.data())
def test_balanced_is_the_best_split_with_interleaving_too(cfg, data):
    """No split into pp x v chunks of >= 1 block has a slower stage less slow (brute force)."""
    v = data.draw(st.integers(1, 2))
    pp = data.draw(st.integers(1, cfg.n_layers // v)) if cfg.n_layers >= v else None
    if pp is None:
        return
    n_chunks = pp * v
    best = balanced_blocks(cfg, pp, v)
    assert sum(best) == cfg.n_layers and min(best) >= 1 and len(best) == n_chunks

    def slowest(blocks):
        r = partition(cfg, pp, v, tuple(blocks))
        return max(r.stage_flops(s) for s in range(pp))

    n = cfg.n_layers
    splits = [[b - a for a, b in zip((0, *cuts), (*cuts, n))]
              for cuts in itertools.combinations(range(1, n), n_chunks - 1)]
    assert slowest(best) == pytest.approx(min(slowest(c) for c in splits), rel=1e-12)


# ---------------------------------------------------------------- one split everywhere
def test_the_simulator_prices_each_chunk_by_its_blocks():
    """The simulator's pass costs follow the split: moving one block from the last stage to
    the first adds one block's forward + backward to stage 0 and takes the same from stage 1."""
    cfg = head_heavy(6)
    work = Workload(global_batch=4, microbatch_size=1, recompute="none", dtype="fp32",
                    scatter_gather=False, dropout=False)

    def stage_costs(blocks):
        par = ParallelConfig(pp=2, microbatches=4, partition=blocks)
        cost, _, _, _ = instruction_costs(cfg, par, work, A100_80GB)
        return [cost(s, Fwd(0, 0)) + cost(s, Bwd(0, 0)) for s in range(2)]

    equal, moved, twice = stage_costs(()), stage_costs((4, 2)), stage_costs((5, 1))
    block = moved[0] - equal[0]
    assert block > 0
    assert equal[1] - moved[1] == pytest.approx(block)
    assert twice[0] - moved[0] == pytest.approx(block)
    assert moved[1] - twice[1] == pytest.approx(block)


# ---------------------------------------------------------------------------- bad input
def _args(*argv):
    return build_parser(printing=False).parse_args(list(argv))


@pytest.mark.parametrize("argv, message", [
    (["--pp", "2", "--layers", "4", "--partition", "3,x"], "--partition '3,x': expected"),
    (["--pp", "2", "--layers", "4", "--partition", "2,1,1"], "one block count per virtual"),
    (["--pp", "2", "--layers", "4", "--partition", "4,0"], "at least 1 block"),
    (["--pp", "2", "--layers", "4", "--partition", "2,3"], "sum to 5, the model has --layers 4"),
    (["--pp", "2", "--layers", "4", "--partition=-1,5"], "at least 1 block"),
    (["--pp", "2", "--layers", "4", "--partition", "uneven"], "expected equal, balanced"),
    (["--pp", "2", "--layers", "1", "--partition", "balanced"], "need at least 2 layers"),
    (["--pp", "2", "--layers", "4", "--virtual-stages", "2", "--schedule", "interleaved",
      "--microbatches", "2", "--partition", "1,3"], "--pp x --virtual-stages = 2 x 2 = 4"),
])
def test_bad_partitions_are_one_line_naming_the_flag(argv, message):
    with pytest.raises(ConfigError) as info:
        make_configs(_args(*argv), world=2)  # the checks every rank runs before any collective
    assert "--partition" in str(info.value) and message in str(info.value)
    assert "\n" not in str(info.value)


def test_a_bad_partition_stops_every_rank_with_one_line():
    codes, out, err = train(["--pp", "2", "--layers", "4", "--partition", "2,3", "--steps", "2"],
                            n=2)
    assert codes == [2, 2] and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "--partition 2,3" in lines[0], err


def test_async_modes_refuse_a_partition():
    with pytest.raises(ConfigError, match="--partition"):
        make_configs(_args("--mode", "local-sgd", "--partition", "balanced"), world=2)


def test_a_checkpoint_saved_under_one_split_resumes_under_another(tmp_path):
    """Checkpoints hold full tensors by name: a run saved with blocks 2,1 per stage continues
    with 1,2, with the losses of the uninterrupted run."""
    base = ["--quiet", "--dtype", "float64", "--model", "tiny", "--layers", "3",
            "--eval-every", "100"]
    full, first, second = tmp_path / "f.json", tmp_path / "a.json", tmp_path / "b.json"
    assert train([*base, "--steps", "6", "--summary", str(full)], n=1)[0] == [0]  # serial
    base += ["--pp", "2", "--microbatches", "2"]
    codes, _, err = train([*base, "--partition", "2,1", "--steps", "3", "--save",
                           str(tmp_path / "run"), "--summary", str(first)], n=2)
    assert codes == [0, 0], err
    codes, out, err = train([*base, "--partition", "1,2", "--steps", "6", "--resume",
                             str(tmp_path / "run"), "--summary", str(second)], n=2)
    assert codes == [0, 0], err
    assert "--partition 1,2 (explicit)" in out

    def losses(p):
        return json.loads(p.read_text())["losses"]

    np.testing.assert_allclose(losses(first) + losses(second), losses(full), rtol=1e-9)
    assert json.loads(first.read_text())["layout"]["partition"] == [2, 1]


def test_banner_shows_the_chosen_split():
    codes, out, _ = train(["--model", "tiny", "--layers", "3", "--pp", "2", "--steps", "1",
                           "--quiet", "--partition", "balanced"], n=2)
    assert codes == [0, 0]
    assert "split   | --partition " in out and "(balanced)" in out


def test_simulate_cli_takes_the_same_partition(capsys):
    """``python -m minipar.simulate --partition``: the split shows in the layout and moves the
    predicted step; a bad one is one line naming the flag."""
    from minipar.simulate import main as simulate

    base = ["--model", "gpt3-125m", "--layers", "8", "--vocab", "200000", "--pp", "2",
            "--gpus", "2", "--global-batch", "16", "--json"]
    assert simulate(base) == 0
    equal = json.loads(capsys.readouterr().out)
    assert simulate([*base, "--partition", "balanced"]) == 0
    balanced = json.loads(capsys.readouterr().out)
    assert equal["layout"]["partition"] == [] and balanced["layout"]["partition"] == [7, 1]
    assert balanced["step_time_s"] < equal["step_time_s"]
    assert simulate([*base, "--partition", "4,3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--partition 4,3: the counts sum to 7" in err[0]
