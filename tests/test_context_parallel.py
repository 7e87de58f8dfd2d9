"""Context parallelism (``--cp``): ring attention and every cp layout against the serial run.

The ring kernel (``minipar.parallel.context``) is checked against the plain attention kernel
on the whole sequence and against central differences of that plain forward in float64 (an
independent check of its backward). Every cp layout (cp alone, composed with dp, tp + sp and
pp, both cuts, recomputation none/selective/full, both kernel flags) trains to the serial run's
losses, gradients and updated weights on the thread world; ``tests/mpi/test_cp_mpi.py`` does
the same under mpirun.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.compare import mismatches, random_batches, serial_reference, train_layout
from minipar.config import ConfigError, ModelConfig, ParallelConfig, replace
from minipar.dist.comm import run_threads
from minipar.dist.mesh import Mesh
from minipar.nn import functional as F
from minipar.parallel import context
from on_device import down, up
from test_comm_prediction import comm_problems, run

CFG = ModelConfig(vocab_size=11, seq_len=16, n_layers=2, d_model=16, n_heads=4)


# ------------------------------------------------------------------------------ the sequence cut
@pytest.mark.parametrize("split", ["zigzag", "contiguous"])
@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_every_token_on_exactly_one_rank(cp, split):
    t = 4 * cp
    idx = np.concatenate([context.token_indices(t, cp, r, split) for r in range(cp)])
    assert sorted(idx.tolist()) == list(range(t))


def test_zigzag_is_balanced_and_contiguous_is_not():
    """Hand count: zig-zag rank r meets key chunks <= r and <= 2cp-1-r, (r+1) + (2cp-r) =
    2cp+1 pairs; contiguous rank r meets r+1 blocks, so the last rank does cp x the first."""
    for cp in (2, 4, 8):
        assert context.pair_counts(16 * cp, cp, "zigzag") == [2 * cp + 1] * cp
        assert context.pair_counts(16 * cp, cp, "contiguous") == list(range(1, cp + 1))
    t, d = 64, 8  # FLOPs: every rank's total equals the plain kernel's full T x T products
    for split in ("zigzag", "contiguous"):
        per = [context.ring_flops(t, d, 4, r, split) for r in range(4)]
        diag = 4 * t * t * d  # the plain kernel computes all T^2 pairs, then masks
        assert sum(per) < diag
    zz = [context.ring_flops(t, d, 4, r, "zigzag") for r in range(4)]
    assert max(zz) == min(zz)


# ------------------------------------------------------------------------------ the ring kernel
def _ring_run(q, k, v, dy, cp, split, masks=None):
    """q, k, v, dy (n, T, D) whole -> y, dq, dk, dv (n, T, D) reassembled from every rank;
    ``masks`` (a dropout MaskSource, or None for no dropout) gives every tile its mask."""
    t, n = q.shape[1], q.shape[0]

    def rank(comm):
        ring = context.Ring(comm, split, t)
        idx = context.token_indices(t, cp, comm.rank, split)
        qs, ks, vs, dys = up(tuple(np.ascontiguousarray(a[:, idx]) for a in (q, k, v, dy)))
        drop = None if masks is None else masks.tiles("r", 0, n, 0, n, t)
        y, lse = ring.forward(qs, ks, vs, drop)
        delta = (dys * y).sum(-1, keepdims=True)
        return idx, down(y), down(ring.backward(qs, ks, vs, dys, lse, delta, drop))

    out = [np.zeros_like(q) for _ in range(4)]
    for idx, y, grads in run_threads(rank, cp):
        for o, part in zip(out, (y, *grads)):
            o[:, idx] = part
    return out


@settings(max_examples=12, deadline=None)
@given(cp=st.sampled_from([2, 3, 4]), split=st.sampled_from(["zigzag", "contiguous"]),
       chunk=st.integers(1, 3), n=st.integers(1, 3), d=st.sampled_from([2, 4]),
       seed=st.integers(0, 10_000))
def test_ring_equals_plain_attention_and_its_gradient(cp, split, chunk, n, d, seed):
    check_ring_equals_plain(cp, split, chunk, n, d, seed)


def check_ring_equals_plain(cp, split, chunk, n, d, seed, masks=None):
    """The ring's output and gradients reassembled from every rank == the plain kernel on the
    whole sequence; with ``masks`` (a dropout MaskSource), the plain kernel takes the whole
    serial mask of site "r" and the ring each tile's slice of it."""
    t = 2 * cp * chunk
    rng = np.random.default_rng(seed)
    q, k, v, dy = (rng.normal(size=(n, t, d)) for _ in range(4))
    keep, p = (None, 0.0) if masks is None else (masks.keep("r", 0, (1, n, t, t)), masks.p)
    y_ref, cache = F.attention_fwd(*up((q[None], k[None], v[None])), keep, p)  # (1, n, T, D)
    y_ref, grads_ref = down(y_ref), down(F.attention_bwd(up(dy[None]), cache))
    y, dq, dk, dv = _ring_run(q, k, v, dy, cp, split, masks)
    np.testing.assert_allclose(y, y_ref[0], rtol=1e-12, atol=1e-12)
    for got, ref in zip((dq, dk, dv), grads_ref):
        np.testing.assert_allclose(got, ref[0], rtol=1e-10, atol=1e-12)


def test_ring_gradient_against_central_differences():
    """d/dx sum(dy * attention(q, k, v)) by central differences of the plain forward: a check
    that does not trust any backward kernel."""
    rng = np.random.default_rng(5)
    n, t, d, cp = 2, 8, 3, 2
    q, k, v, dy = (rng.normal(size=(n, t, d)) for _ in range(4))
    _, dq, dk, dv = _ring_run(q, k, v, dy, cp, "zigzag")

    def f(q_, k_, v_):
        return float((down(F.attention_fwd(*up((q_[None], k_[None], v_[None])))[0])[0]
                      * dy).sum())

    eps = 1e-6
    for which, grad in enumerate((dq, dk, dv)):
        for pos in [(0, 0, 0), (1, 3, 2), (0, 7, 1), (1, 5, 0)]:
            args = [q.copy(), k.copy(), v.copy()]
            args[which][pos] += eps
            hi = f(*args)
            args[which][pos] -= 2 * eps
            lo = f(*args)
            assert grad[pos] == pytest.approx((hi - lo) / (2 * eps), rel=1e-6, abs=1e-8)


def test_ring_moves_the_predicted_bytes():
    """Forward: cp - 1 hops of the stacked K/V; backward: cp - 1 of K/V and cp of dK/dV."""
    n, t, d, cp = 2, 8, 4, 4
    rng = np.random.default_rng(0)
    q, k, v, dy = (rng.normal(size=(n, t, d)) for _ in range(4))

    def rank(comm):
        ring = context.Ring(comm, "zigzag", t)
        idx = context.token_indices(t, cp, comm.rank, "zigzag")
        qs, ks, vs, dys = up(tuple(np.ascontiguousarray(a[:, idx]) for a in (q, k, v, dy)))
        y, lse = ring.forward(qs, ks, vs)
        fwd = comm.stats.as_dict()
        ring.backward(qs, ks, vs, dys, lse, (dys * y).sum(-1, keepdims=True))
        return fwd, comm.stats.as_dict()

    block = 2 * n * (t // cp) * d * 8  # stacked K and V of one rank, float64
    for fwd, total in run_threads(rank, cp):
        assert fwd["send"]["bytes"] == fwd["recv"]["bytes"] == (cp - 1) * block
        assert total["send"]["bytes"] == (cp - 1) * block + (cp - 1) * block + cp * block
        assert total["send"]["calls"] == total["recv"]["calls"] == 3 * cp - 2


# ------------------------------------------------------------------------ the mesh and the config
def test_mesh_coordinates_and_groups():
    def rank(world):
        m = Mesh(world, dp=2, pp=1, tp=2, cp=2)
        return (world.rank, m.dp_rank, m.cp_rank, m.tp_rank, m.rank_of(m.dp_rank, 0, m.tp_rank,
                                                                        m.cp_rank),
                m.cp.size, m.grad.size, m.grad.rank)

    for r, dp, cp, tp, back, cps, gs, gr in run_threads(rank, 8):
        assert r == back == (dp * 2 + cp) * 2 + tp
        assert (cps, gs, gr) == (2, 4, dp * 2 + cp)


@pytest.mark.parametrize("par, seq, needle", [
    (ParallelConfig(cp=4), 12, "--cp 4 with --cp-split zigzag needs --seq-len (12) divisible by 8"),
    (ParallelConfig(cp=3, cp_split="contiguous"), 16, "divisible by 3"),
    (ParallelConfig(cp=2, cp_split="ring"), 16, "--cp-split must be one of"),
    (ParallelConfig(cp=0), 16, "--cp must be a positive integer"),
    (ParallelConfig(cp=4, tp=4, sequence_parallel=True), 24, "--tp 4 to divide the 6 tokens"),
])
def test_bad_cp_layouts_are_one_line(par, seq, needle):
    with pytest.raises(ConfigError, match=None) as err:
        par.validate(replace(CFG, seq_len=seq, n_heads=4))
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_world_size_error_names_cp():
    with pytest.raises(ConfigError, match="--cp 2"):
        ParallelConfig(dp=2, cp=2).validate(CFG, world_size=2)


# -------------------------------------------------------------------- training equals the serial
def _check(par: ParallelConfig, cfg: ModelConfig = CFG, steps: int = 2, seed: int = 3):
    batches = random_batches(cfg, steps, 2 * par.dp * par.microbatches, seed=seed)
    got = run_threads(lambda w: train_layout(w, cfg, par, batches, seed=seed), par.world)[0]
    ref = serial_reference(cfg, batches, seed=seed)
    bad = mismatches(got, ref, rtol=1e-9)
    assert not bad, (par, bad[:4])
    return got


LAYOUTS = [
    ParallelConfig(cp=2),
    ParallelConfig(cp=4),
    ParallelConfig(cp=2, cp_split="contiguous"),
    ParallelConfig(cp=4, cp_split="contiguous", attention="blockwise"),
    ParallelConfig(cp=2, dp=2),
    ParallelConfig(cp=2, dp=2, zero=1),
    ParallelConfig(cp=2, dp=2, zero=3),
    ParallelConfig(cp=2, tp=2),
    ParallelConfig(cp=2, tp=2, sequence_parallel=True),
    ParallelConfig(cp=2, pp=2, microbatches=2),
    ParallelConfig(cp=2, pp=2, microbatches=2, schedule="zb-h1"),
    ParallelConfig(cp=2, recompute="selective"),
    ParallelConfig(cp=2, recompute="full", cp_split="contiguous"),
    ParallelConfig(cp=2, dp=2, tp=2, sequence_parallel=True, recompute="full"),
]


@pytest.mark.parametrize("par", LAYOUTS, ids=lambda p: f"dp{p.dp}cp{p.cp}tp{p.tp}pp{p.pp}"
                         f"{'sp' if p.sequence_parallel else ''}z{p.zero}-{p.cp_split}-"
                         f"{p.recompute}-{p.attention}")
def test_cp_layout_equals_serial(par):
    _check(par)


@settings(max_examples=25, deadline=None)
@given(cp=st.sampled_from([2, 4]), dp=st.sampled_from([1, 2]), tp=st.sampled_from([1, 2]),
       pp=st.sampled_from([1, 2]), sp=st.booleans(),
       split=st.sampled_from(["zigzag", "contiguous"]),
       recompute=st.sampled_from(["none", "selective", "full"]),
       attention=st.sampled_from(["plain", "blockwise"]), zero=st.sampled_from([0, 1, 3]),
       seed=st.integers(0, 1000))
def test_drawn_cp_layouts_equal_serial(cp, dp, tp, pp, sp, split, recompute, attention, zero,
                                       seed):
    if dp * tp * pp * cp > 8:
        dp = 1
    if dp * tp * pp * cp > 8:
        pp = 1
    par = ParallelConfig(cp=cp, dp=dp, tp=tp, pp=pp, sequence_parallel=sp and tp > 1,
                         cp_split=split, recompute=recompute, attention=attention,
                         zero=zero if dp > 1 else 0, microbatches=2 if pp > 1 else 1)
    _check(par, steps=1, seed=seed)


def test_cp_with_4d_mesh():
    """dp x cp x pp x tp all two: 16 ranks, every axis at once."""
    _check(ParallelConfig(dp=2, cp=2, pp=2, tp=2, sequence_parallel=True, microbatches=2),
           steps=1)


def test_evaluation_under_cp_equals_serial():
    from minipar.engine import Engine

    batches = random_batches(CFG, 1, 4, seed=9)

    def run(world, par):
        mesh = Mesh(world, dp=par.dp, pp=par.pp, tp=par.tp, cp=par.cp)
        engine = Engine(CFG, par, mesh, seed=1, dtype="float64")
        return engine.evaluate(batches)

    ref = run_threads(lambda w: run(w, ParallelConfig()), 1)[0]
    for par in (ParallelConfig(cp=2), ParallelConfig(cp=2, dp=2, cp_split="contiguous")):
        got = run_threads(lambda w: run(w, par), par.world)[0]
        for key in ref:
            assert got[key] == pytest.approx(ref[key], rel=1e-12), (par, key)


# -------------------------------------------------------------- predicted bytes == CommStats
@settings(max_examples=20, deadline=None, derandomize=True)
@given(cp=st.sampled_from([2, 4]), dp=st.sampled_from([1, 2]), tp=st.sampled_from([1, 2]),
       pp=st.sampled_from([1, 2]), sp=st.booleans(), zero=st.sampled_from([0, 1, 2, 3]),
       bucket=st.sampled_from([0.0, 0.001]), m=st.integers(1, 2),
       recompute=st.sampled_from(["none", "selective", "full"]),
       split=st.sampled_from(["zigzag", "contiguous"]))
def test_predicted_cp_bytes_equal_commstats(cp, dp, tp, pp, sp, zero, bucket, m, recompute,
                                            split):
    """``predict_comm_bytes`` (its "cp" ring and "dpcp" gradient group included) against what
    every rank of real cp steps records, group by group, call for call."""
    while dp * tp * pp * cp > 8:
        dp, pp = (1, pp) if dp > 1 else (dp, 1)
    par = ParallelConfig(dp=dp, cp=cp, tp=tp, pp=pp, sequence_parallel=sp and tp > 1,
                         zero=zero, bucket_mb=bucket if zero < 3 else 0.0, microbatches=m,
                         recompute=recompute, cp_split=split)
    cfg = ModelConfig(vocab_size=11, seq_len=2 * cp * 2, n_layers=2, d_model=8, n_heads=4)
    case = {"cfg": cfg, "par": par, "batch": dp * m}
    results = run_threads(lambda w: run(w, case), par.world)
    bad = [b for rank, r in enumerate(results) for b in comm_problems(case, rank, r)]
    assert not bad, f"{par}: {bad[:4]}"


# ------------------------------------------------------------------------------ the command
@pytest.mark.parametrize("argv, n, needle", [
    (["--cp", "3"], 1, "--cp 3"),
    (["--cp", "2", "--seq-len", "18", "--force"], 2, "--cp 2 with --cp-split zigzag needs"),
    (["--cp", "0"], 1, "--cp must be"),
    (["--cp-split", "ring"], 1, "--cp-split"),
    (["--cp", "2", "--mode", "local-sgd"], 2, "--cp"),
])
def test_bad_cp_flags_are_one_line_on_every_rank(argv, n, needle):
    from inproc import train

    codes, out, err = train(["--quiet", "--steps", "1", *argv], n=n)
    assert set(codes) == {2}, (codes, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


def test_cp_run_banner_and_resume_in_another_layout(tmp_path):
    """Train at cp 2 and save; resume at dp 2 (and serially): the same losses as an unbroken
    serial run, and a banner that shows the activations per rank falling with cp."""
    from inproc import train

    book = tmp_path / "book.txt"
    book.write_text("It was the best of times, it was the worst of times. " * 300)
    common = ["--task", "text", "--data", str(book), "--seq-len", "32", "--batch-size", "4",
              "--quiet", "--dtype", "float64", "--eval-every", "100", "--layers", "2"]

    def losses(path):
        import json
        return json.loads(path.read_text())["losses"]

    codes, out, err = train([*common, "--steps", "4", "--cp", "2", "--save", str(tmp_path / "r"),
                             "--save-every", "2", "--summary", str(tmp_path / "a.json")], n=2)
    assert codes == [0, 0], err
    assert "context | cp 2 (zigzag), ring attention: 16 of 32 tokens per rank" in out
    assert "(cp 1, blockwise:" in out and "2.00x)" in out
    step2 = tmp_path / "r" / "step-000002"
    codes, out, err = train([*common, "--steps", "4", "--dp", "2", "--resume", str(step2),
                             "--summary", str(tmp_path / "b.json")], n=2)
    assert codes == [0, 0], err
    codes, _, err = train([*common, "--steps", "4", "--summary", str(tmp_path / "s.json")])
    assert codes == [0], err
    serial, cp_run, resumed = (losses(tmp_path / f) for f in ("s.json", "a.json", "b.json"))
    np.testing.assert_allclose(cp_run, serial, rtol=1e-9)
    np.testing.assert_allclose(resumed, serial[2:], rtol=1e-9)


# ------------------------------------------------------------------- activations per rank, measured
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
@pytest.mark.parametrize("cp, tp, sp", [(2, 1, False), (4, 1, False), (2, 2, False),
                                        (2, 2, True)])
def test_measured_block_activations_equal_the_formula_at_s_over_cp(cp, tp, sp, recompute):
    """What each rank's block keeps, tensor by tensor, equals ``block_activation_terms`` for a
    sequence s/cp long with the blockwise kernel's log-sum-exp, and cp times less than cp 1."""
    from minipar.sim import costmodel as cm
    from minipar.sim.activations import measure_block_activations

    cfg = replace(CFG, seq_len=32)
    want = cm.block_activation_terms(cfg, 3, tp, sp, recompute, value_bytes=8, dropout=False,
                                     layernorm_rstd=True, cp=cp)
    for got in measure_block_activations(cfg, tp, sp, rows=3, recompute=recompute, cp=cp):
        assert got == want
    one = cm.block_activation_terms(cfg, 3, tp, sp, recompute, value_bytes=8, dropout=False,
                                    layernorm_rstd=True, attention="blockwise")
    assert sum(one.values()) == cp * sum(want.values())


# ------------------------------------------------------------------------------- the simulator
def test_simulator_reports_the_ring_bytes_and_searches_cp_for_long_sequences(capsys):
    """``minipar.simulate --cp``: the ring's bytes sent per step are ``comm_volume``'s (the
    runtime's, by the tests above), activations fall with cp, and --search tries cp > 1 only
    for sequences long enough (``CP_MIN_TOKENS`` per rank)."""
    import json

    from minipar import simulate
    from minipar.sim import comm_volume as cv

    base = ["--model", "gpt3-125m", "--layers", "4", "--seq-len", "8192", "--global-batch",
            "8", "--json"]
    out = {}
    for cp in (1, 2, 4):
        for rc in ("none", "selective", "full"):
            assert simulate.main([*base, "--gpus", "4", "--cp", str(cp), "--recompute", rc]) == 0
            out[cp, rc] = json.loads(capsys.readouterr().out)
    model = replace(simulate.MODELS["gpt3-125m"][0], n_layers=4, seq_len=8192)
    for cp in (2, 4):
        par = ParallelConfig(dp=4 // cp, cp=cp, microbatches=8 // (4 // cp), recompute="full")
        want = cv.predict_comm_bytes(model, par, 8, 2)["cp"]["send"]["bytes"]
        assert out[cp, "full"]["comm_bytes_per_step"]["cp"] == want
        for rc in ("none", "selective", "full"):
            acts = [out[c, rc]["memory_per_gpu_bytes"]["activations"] for c in (1, cp)]
            assert acts[1] < acts[0]
    assert simulate.main(["--model", "gpt3-13b", "--seq-len", "32768", "--gpus", "64",
                          "--global-batch", "64", "--search", "--json", "--top", "50"]) == 0
    ranked = json.loads(capsys.readouterr().out)["ranked"]
    assert any(r["layout"]["cp"] > 1 for r in ranked)
    assert simulate.main(["--model", "gpt3-13b", "--gpus", "64", "--search", "--json"]) == 0
    assert all(r["layout"]["cp"] == 1 for r in json.loads(capsys.readouterr().out)["ranked"])


def test_simulator_bad_cp_is_one_line(capsys):
    from minipar import simulate

    assert simulate.main(["--model", "gpt3-125m", "--seq-len", "1000", "--cp", "3",
                          "--gpus", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--cp 3" in err


@pytest.mark.parametrize("argv, needle", [
    (["--cp", "2", "--arch", "encdec", "--task", "translate"], "--cp > 1 with --arch encdec"),
])
def test_cp_refuses_what_it_does_not_support_in_one_line(argv, needle):
    from inproc import train

    codes, _, err = train(["--quiet", "--steps", "1", *argv], n=2)
    assert set(codes) == {2}, (codes, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err


# ---------------------------------------------------------- the ring as data, and the checker
class _Recording:
    """A cp Comm that records ("send", dest, tag) at isend and ("recv", source, tag) at the
    wait of an irecv: the order ``Ring`` really makes its calls."""

    def __init__(self, comm, log):
        self._comm, self._log = comm, log

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def isend(self, x, dest, tag=0):
        self._log.append(("send", dest, tag))
        return self._comm.isend(x, dest, tag)

    def irecv(self, shape, dtype, source, tag=0):
        req = self._comm.irecv(shape, dtype, source, tag)
        log = self._log

        class _Waits:
            def wait(self):
                log.append(("recv", source, tag))
                return req.wait()
        return _Waits()


@pytest.mark.parametrize("cp", [2, 3, 4])
def test_ring_program_is_what_the_ring_does_and_the_checker_proves_it(cp):
    from minipar.parallel.program_checks import DeadlockError, check_messages

    n, t, d = 2, 2 * cp * 2, 3
    rng = np.random.default_rng(1)
    q, k, v, dy = (rng.normal(size=(n, t, d)) for _ in range(4))

    def rank(comm):
        log: list = []
        ring = context.Ring(_Recording(comm, log), "zigzag", t)
        idx = context.token_indices(t, cp, comm.rank, "zigzag")
        qs, ks, vs, dys = up(tuple(np.ascontiguousarray(a[:, idx]) for a in (q, k, v, dy)))
        y, lse = ring.forward(qs, ks, vs)
        ring.backward(qs, ks, vs, dys, lse, (dys * y).sum(-1, keepdims=True))
        return log

    assert run_threads(rank, cp) == context.ring_program(cp)
    assert check_messages(context.ring_program(cp)) == cp * (3 * cp - 2)
    assert check_messages(context.ring_program(cp, "full")) == cp * (4 * cp - 3)
    broken = context.ring_program(cp)
    broken[0] = [c for c in broken[0] if c[0] == "recv"] + [c for c in broken[0]
                                                             if c[0] == "send"]
    with pytest.raises(DeadlockError):  # every receive before any send: rank 1 never hears
        check_messages(broken)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("par", [ParallelConfig(cp=2), ParallelConfig(cp=4, cp_split="contiguous"),
                                 ParallelConfig(cp=2, dp=2, tp=2, sequence_parallel=True,
                                                zero=1)],
                         ids=lambda p: f"dp{p.dp}cp{p.cp}tp{p.tp}")
def test_cp_under_16bit_precision_equals_serial_within_the_stated_tolerance(precision, par):
    """--precision composes with --cp: one step within the precision tests' tolerance of the
    serial run in the same precision (the ring sums in another order)."""
    import precision_cases as cases

    run_threads(lambda w: cases.check_within_tolerance(w, cases.TINY, par, precision),
                par.world)
