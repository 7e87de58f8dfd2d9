"""Activation recomputation and the blockwise attention kernel in the model.

Recomputation changes no number: losses, gradients and updated weights are identical, bit for
bit, with --recompute none, selective and full, serially and in tp/sp/pp/dp layouts (thread
world; ``tests/mpi/test_recompute_mpi.py`` under mpirun). The blockwise kernel equals the plain
one to rounding in every layout. What a block keeps for backward, measured by the one meter
(``minipar.nn.memory``), equals ``costmodel.block_activation_terms`` tensor by tensor for every
kernel x recompute x tp x sp; the forward FLOPs a step runs, counted by the kernels, are the
model's plus exactly what recomputation reruns.
"""

import numpy as np
import pytest

from minipar.compare import mismatches, random_batches, serial_reference, train_layout
from minipar.config import RECOMPUTE_MODES, ConfigError, ModelConfig, ParallelConfig, replace
from minipar.dist.comm import local_comm, run_threads
from minipar.nn import blockwise
from minipar.sim import costmodel as cm
from minipar.sim.activations import measure_block_activations

CFG = ModelConfig(vocab_size=11, seq_len=8, n_layers=2, d_model=16, n_heads=4)
MINIPAR = dict(value_bytes=8, dropout=False, layernorm_rstd=True)  # float64, no dropout

LAYOUTS = [
    ParallelConfig(),
    ParallelConfig(tp=2),
    ParallelConfig(tp=2, sequence_parallel=True),
    ParallelConfig(pp=2, schedule="1f1b", microbatches=2),
    ParallelConfig(dp=2, zero=3),
    ParallelConfig(pp=2, schedule="zb-h1", microbatches=2),
    ParallelConfig(dp=2, tp=2, sequence_parallel=True, zero=1, bucket_mb=0.001),
]


def _train(par: ParallelConfig, batches):
    if par.world == 1:
        return train_layout(local_comm(), CFG, par, batches, seed=3)
    return run_threads(lambda w: train_layout(w, CFG, par, batches, seed=3), par.world)[0]


def _identical(a, b) -> list[str]:
    """Every loss, gradient and weight the same bits, or what differs."""
    bad = [] if a.losses == b.losses else [f"losses {a.losses} != {b.losses}"]
    for kind in ("params", "grads"):
        mine, theirs = getattr(a, kind), getattr(b, kind)
        bad += [f"{kind} {n}" for n in mine if not np.array_equal(mine[n], theirs[n])]
    return bad


@pytest.mark.parametrize("attention", ["plain", "blockwise"])
@pytest.mark.parametrize("par", LAYOUTS, ids=lambda p: f"dp{p.dp}tp{p.tp}pp{p.pp}"
                         f"{'sp' if p.sequence_parallel else ''}z{p.zero}{p.schedule}")
def test_recomputation_changes_no_number(par, attention):
    batches = random_batches(CFG, 2, 4 * par.dp, seed=1)
    runs = {rc: _train(replace(par, attention=attention, recompute=rc), batches)
            for rc in RECOMPUTE_MODES}
    for rc in ("selective", "full"):
        assert not _identical(runs[rc], runs["none"]), (rc, _identical(runs[rc], runs["none"]))
    serial = serial_reference(CFG, batches, seed=3)  # plain kernel, no recomputation
    assert not mismatches(runs["full"], serial, rtol=1e-9)


def test_blockwise_training_equals_plain_with_several_blocks():
    """A sequence longer than one block: the causal skipping and the online softmax in the
    whole model, against the plain kernel, serially and under tp + sp + pp."""
    cfg = replace(CFG, seq_len=12)
    batches = random_batches(cfg, 2, 4, seed=2)
    old = blockwise.BLOCK
    try:
        blockwise.BLOCK = 5  # 3 blocks of 5, 5 and 2 tokens
        for par in (ParallelConfig(), ParallelConfig(tp=2, pp=2, sequence_parallel=True,
                                                     microbatches=2)):
            bw = replace(par, attention="blockwise")
            got = run_threads(lambda w: train_layout(w, cfg, bw, batches, seed=4), bw.world)[0]
            assert not mismatches(got, serial_reference(cfg, batches, seed=4), rtol=1e-9)
    finally:
        blockwise.BLOCK = old


@pytest.mark.parametrize("attention", ["plain", "blockwise"])
@pytest.mark.parametrize("recompute", RECOMPUTE_MODES)
@pytest.mark.parametrize("tp, sp", [(1, False), (2, False), (2, True), (4, False), (4, True)])
def test_block_keeps_the_formula_tensor_by_tensor(attention, recompute, tp, sp):
    want = cm.block_activation_terms(CFG, 3, tp, sp, recompute, attention=attention, **MINIPAR)
    for got in measure_block_activations(CFG, tp, sp, rows=3, recompute=recompute,
                                         attention=attention):
        assert got == want


def test_activation_memory_per_head_is_quadratic_plain_and_linear_blockwise():
    """Doubling T doubles what the blockwise core keeps, and the plain core's T^2 term grows 4x
    (the core is the attn entry less its 3 s h / t of Q, K, V)."""
    def core(attention, t):
        cfg = replace(CFG, seq_len=t)
        got = measure_block_activations(cfg, 1, False, rows=1, attention=attention)[0]["attn"]
        return got - 8 * 3 * t * cfg.d_model

    heads = CFG.n_heads
    assert [core("plain", t) for t in (8, 16, 32)] == [8 * heads * t * t for t in (8, 16, 32)]
    assert [core("blockwise", t) for t in (8, 16, 32)] == [8 * heads * t for t in (8, 16, 32)]


@pytest.mark.parametrize("attention", ["plain", "blockwise"])
def test_forward_flops_counted_are_the_model_and_what_recomputation_reruns(attention):
    """Serial step, batch B: forward FLOPs = layers x layer forward + logits, the plain kernel
    counting the full (T, T) products as ``layer_forward_flops`` does, the blockwise one its
    causal blocks; full recomputation reruns every block's forward, selective the core."""
    from minipar.dist.mesh import Mesh
    from minipar.engine import Engine

    cfg = replace(CFG, seq_len=16)
    b, (x, y) = 4, random_batches(cfg, 1, 4, seed=0)[0]
    s, h, a = cfg.seq_len, cfg.d_model, cfg.n_heads
    plain_core = 4 * b * s * s * h
    core = plain_core if attention == "plain" else b * a * blockwise.pair_flops(s, h // a)
    layer = cm.layer_forward_flops(cfg, b) - plain_core + core
    model = cfg.n_layers * layer + cm.logit_forward_flops(cfg, b)
    extra = {"none": 0, "selective": cfg.n_layers * core, "full": cfg.n_layers * layer}
    for rc in RECOMPUTE_MODES:
        par = ParallelConfig(attention=attention, recompute=rc)
        engine = Engine(cfg, par, Mesh.serial(), seed=0, dtype="float64")
        engine.train_step(x, y, int((y >= 0).sum()))
        assert engine.forward_flops == (model + extra[rc], extra[rc]), rc


def test_full_recomputation_keeps_one_block_input_per_block_in_a_pipeline():
    """The meter on a whole engine: with --recompute full the peak activations of a serial
    step are one input per block (plus the embedding's and head's own), far below none's."""
    from minipar.dist.mesh import Mesh
    from minipar.engine import Engine

    x, y = random_batches(CFG, 1, 4, seed=0)[0]
    peaks = {}
    for rc in RECOMPUTE_MODES:
        engine = Engine(CFG, ParallelConfig(recompute=rc), Mesh.serial(), seed=0,
                        dtype="float64")
        engine.train_step(x, y, int((y >= 0).sum()))
        peaks[rc] = engine.peak_activation_bytes
    per_block = {rc: cm.activation_bytes_per_layer(CFG, 4, 1, False, rc, **MINIPAR)
                 for rc in RECOMPUTE_MODES}
    outside = peaks["none"] - CFG.n_layers * per_block["none"]  # embedding and head
    for rc in RECOMPUTE_MODES:
        assert peaks[rc] == outside + CFG.n_layers * per_block[rc], rc


@pytest.mark.parametrize("field, value, flag", [("recompute", "some", "--recompute"),
                                                ("attention", "flash", "--attention")])
def test_bad_values_name_the_flag(field, value, flag):
    with pytest.raises(ConfigError, match=f"^{flag} must be one of"):
        replace(ParallelConfig(), **{field: value}).validate()


def test_simulator_and_runtime_agree_on_the_recompute_names():
    from minipar.simulate import build_parser
    from minipar.train.cli import build_parser as train_parser

    def choices(parser, flag):
        return tuple(next(a for a in parser._actions if flag in a.option_strings).choices)

    assert choices(build_parser(), "--recompute") == RECOMPUTE_MODES == cm.RECOMPUTE
    assert choices(train_parser(), "--recompute") == RECOMPUTE_MODES


def test_train_command_runs_every_mode_with_the_same_losses(tmp_path):
    """``python -m minipar.train`` (in-process, 2 thread ranks, tp 2 + SP): --recompute gives
    the same losses to the bit, --attention blockwise to rounding; the last lines say what was
    kept and rerun; a bad value is one line naming the flag, and no step runs."""
    import json

    from inproc import train

    base = ["--steps", "3", "--eval-every", "3", "--dtype", "float64", "--quiet", "--tp", "2",
            "--sequence-parallel", "--batch-size", "8"]
    losses = {}
    for attention in ("plain", "blockwise"):
        for rc in RECOMPUTE_MODES:
            summary = tmp_path / f"{attention}-{rc}.json"
            codes, out, err = train([*base, "--attention", attention, "--recompute", rc,
                                     "--summary", str(summary)], n=2)
            assert codes == [0, 0], err
            run = json.loads(summary.read_text())
            assert run["layout"]["recompute"] == rc
            losses[attention, rc] = run["losses"]
            if (attention, rc) != ("plain", "none"):
                assert f"{attention} attention, recompute {rc}" in out
            assert (run["forward_flops"]["recomputed"] > 0) == (rc != "none")
    for attention in ("plain", "blockwise"):
        assert losses[attention, "selective"] == losses[attention, "none"]
        assert losses[attention, "full"] == losses[attention, "none"]
    np.testing.assert_allclose(losses["blockwise", "none"], losses["plain", "none"], rtol=1e-12)
    for flag, bad in (("--recompute", "some"), ("--attention", "flash"),
                      ("--recompute", "full --mode local-sgd")):
        codes, out, err = train([flag, *bad.split()], n=2)
        assert codes == [2, 2] and out == ""
        assert len(err.strip().splitlines()) == 1 and flag in err, err


@pytest.mark.parametrize("par", LAYOUTS[:4], ids=lambda p: f"dp{p.dp}tp{p.tp}pp{p.pp}"
                         f"{'sp' if p.sequence_parallel else ''}")
def test_recomputation_with_dropout_redraws_the_same_masks(par):
    """A rerun forward must draw the masks it drew the first time (they are addressed by
    step, site and element, not drawn in sequence), so recomputation still changes no number."""
    cfg = replace(CFG, dropout=0.3)
    batches = random_batches(cfg, 2, 4 * par.dp, seed=1)

    def train(p, model):
        if p.world == 1:
            return train_layout(local_comm(), model, p, batches, seed=3)
        return run_threads(lambda w: train_layout(w, model, p, batches, seed=3), p.world)[0]

    runs = {rc: train(replace(par, recompute=rc), cfg) for rc in RECOMPUTE_MODES}
    for rc in ("selective", "full"):
        assert not _identical(runs[rc], runs["none"]), (rc, _identical(runs[rc], runs["none"]))
    assert runs["none"].losses != train(par, CFG).losses  # the masks really dropped something
