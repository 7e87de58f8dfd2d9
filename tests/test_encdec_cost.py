"""The cost model of the encoder-decoder (``minipar.sim.encdec_cost``) against the runtime:
predicted bytes equal every rank's ``CommStats`` for dp (ZeRO 0-3, buckets) x tp (SP) x pp
(every schedule, the (x_dec, memory) pair messages), the parameter list equals the built
model's, and the parameter count and FLOPs match independent counts."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.compare import train_layout
from minipar.config import ParallelConfig
from minipar.dist.comm import run_threads
from minipar.engine import Engine
from minipar.models.encdec import build_encdec
from minipar.models.encdec_pipeline import build_encdec_chunks
from minipar.nn.module import BuildContext
from minipar.parallel.data import unit_owners
from minipar.sim import costmodel as cm
from minipar.sim import encdec_cost as ec
from minipar.sim.comm_volume import param_specs, predict_comm_bytes
from encdec_cases import encdec_batches, encdec_cfg
from test_comm_prediction import comm_problems


@st.composite
def encdec_layouts(draw, world: int | None = None) -> dict:
    """A tiny encoder-decoder (S != T), a dp x tp x pp layout and a global batch."""
    if world is None:
        tp = draw(st.sampled_from([1, 2]))
        pp = draw(st.sampled_from([1, 2, 4])) if tp == 1 else draw(st.sampled_from([1, 2]))
        dp = draw(st.sampled_from([d for d in (1, 2) if d * tp * pp <= 8]))
    else:
        tp = draw(st.sampled_from([t for t in (1, 2) if world % t == 0]))
        pp = draw(st.sampled_from([p for p in (1, 2, 4) if world % (tp * p) == 0]))
        dp = world // (tp * pp)
    schedule = draw(st.sampled_from(["1f1b", "gpipe", "interleaved", "zb-h1"]))
    v = 2 if schedule == "interleaved" and pp > 1 else 1
    m = pp * draw(st.integers(1, 2)) if schedule == "interleaved" else draw(st.integers(1, 3))
    zero = draw(st.sampled_from([0, 1, 2] if schedule == "zb-h1" else [0, 1, 2, 3]))
    bucket = 0.0
    if zero < 3 and schedule != "zb-h1":
        bucket = draw(st.sampled_from((0.0, 0.001)))
    par = ParallelConfig(dp=dp, tp=tp, pp=pp, zero=zero, bucket_mb=bucket, microbatches=m,
                         schedule=schedule, virtual_stages=v,
                         sequence_parallel=tp > 1 and draw(st.booleans()))
    layers = draw(st.sampled_from([n for n in (1, 2, 4) if (2 * n) % (pp * v) == 0]))
    cfg = encdec_cfg(n_layers=layers, d_model=8, seq_len=4, src_len=6,
                     vocab_size=draw(st.sampled_from([11, 16])),
                     tie_weights=pp == 1 and draw(st.booleans()),
                     pos=draw(st.sampled_from(["learned", "sinusoidal"])),
                     norm=draw(st.sampled_from(["pre", "post"])), pos_bias=draw(st.booleans()))
    return {"cfg": cfg, "par": par, "batch": dp * m * draw(st.integers(1, 2))}


def run(world, case: dict):
    batches = encdec_batches(case["cfg"], 2, case["batch"], seed=2)
    return train_layout(world, case["cfg"], case["par"], batches, seed=2)


NAMED = [  # pair messages inside the decoder, with tp + SP, ZeRO-3, interleaving, zb-h1
    {"cfg": encdec_cfg(n_layers=2, d_model=8, src_len=6), "batch": 4,
     "par": ParallelConfig(pp=4, schedule="1f1b", microbatches=2)},
    {"cfg": encdec_cfg(n_layers=2, d_model=8, src_len=6), "batch": 4,
     "par": ParallelConfig(tp=2, pp=2, dp=2, zero=3, microbatches=2,
                           sequence_parallel=True, schedule="gpipe")},
    {"cfg": encdec_cfg(n_layers=2, d_model=8, src_len=6), "batch": 4,
     "par": ParallelConfig(pp=2, dp=2, zero=1, microbatches=2, schedule="interleaved",
                           virtual_stages=2, bucket_mb=0.001)},
    {"cfg": encdec_cfg(n_layers=2, d_model=8, src_len=6, norm="post"), "batch": 6,
     "par": ParallelConfig(tp=2, pp=2, zero=2, microbatches=3, schedule="zb-h1",
                           sequence_parallel=True)},
]


@pytest.mark.parametrize("case", NAMED, ids=["pp4", "dp2tp2pp2-z3-sp", "interleaved", "zbh1"])
def test_named_layouts_comm_equals_prediction(case):
    results = run_threads(lambda w: run(w, case), case["par"].world)
    bad = [b for rank, r in enumerate(results) for b in comm_problems(case, rank, r)]
    assert not bad, f"{case['par']}: {bad[:4]}"


@settings(max_examples=25, deadline=None, derandomize=True)
@given(case=encdec_layouts())
def test_predicted_comm_equals_every_rank_and_group(case):
    results = run_threads(lambda w: run(w, case), case["par"].world)
    bad = [b for rank, r in enumerate(results) for b in comm_problems(case, rank, r)]
    assert not bad, f"{case['cfg']} {case['par']}: {bad[:4]}"


@settings(max_examples=25, deadline=None, derandomize=True)
@given(case=encdec_layouts())
def test_param_rows_are_the_built_models_parameters(case):
    cfg, par = case["cfg"], case["par"]
    for stage in range(par.pp):
        ctx = BuildContext(0, "float64", SimpleNamespace(size=par.tp, rank=par.tp - 1),
                           par.sequence_parallel)
        build = build_encdec_chunks if par.pp * par.virtual_stages > 1 else build_encdec
        chunks = build(cfg, ctx, par.pp, par.virtual_stages, stage)
        params = [p for c in chunks for p in c.params()]
        _, owner = unit_owners(chunks, params)
        built = [(p.name, tuple(p.data.shape), owner[id(p)], p.tp_partial_grad) for p in params]
        specs = [(s.name, s.shape, s.unit, s.tp_partial_grad)
                 for s in param_specs(cfg, par, stage)]
        assert specs == built


@pytest.mark.parametrize("pos_bias", [False, True])
def test_param_count_and_flops_by_hand(pos_bias):
    """Closed forms: per encoder layer 12h^2 + 13h (a GPT block with F = 4h), plus H S^2 with
    the position bias, per decoder layer 16h^2 + 19h (the cross-attention adds Q, K/V, out and a
    LayerNorm: 4h^2 + 6h), embeddings V h + S h and V h + T h, the encoder's LayerNorm 2h, the
    head 2h + V h."""
    cfg = encdec_cfg(n_layers=3, d_model=16, src_len=6, seq_len=4, vocab_size=11,
                     pos_bias=pos_bias)
    h, v, s, t, n, heads = 16, 11, 6, 4, 3, 4
    want = n * (12 * h * h + 13 * h) + n * (16 * h * h + 19 * h) + (v + s) * h + (v + t) * h \
        + 2 * h + 2 * h + v * h + (n * heads * s * s if pos_bias else 0)
    assert cm.param_count(cfg) == want
    built = sum(p.data.size for p in build_encdec(
        cfg, BuildContext(0, "float64", SimpleNamespace(size=1, rank=0)))[0].params())
    assert built == want
    b = 2
    enc = 24 * b * s * h * h + 4 * b * s * s * h
    dec = 24 * b * t * h * h + 4 * b * t * t * h + 4 * b * t * h * h + 4 * b * s * h * h \
        + 4 * b * t * s * h
    assert ec.model_flops(cfg, b) == 3 * (n * (enc + dec) + 2 * b * t * h * v)


def test_pair_adds_the_memory_to_every_decoder_boundary():
    """pp 4 over 2 + 2 layers: boundaries x_enc (S), memory (S), pair (T + S); the extra over
    a GPT-sized (b, T, h) stream is b h e (2(S - T) + S) per microbatch each way."""
    cfg = encdec_cfg(n_layers=2, d_model=8, src_len=6, seq_len=4)
    par = ParallelConfig(pp=4, microbatches=2)
    b, e, h = 3, 8, 8
    assert [ec.message_bytes(cfg, par, g, b, e) for g in (1, 2, 3)] == \
        [b * 6 * h * e, b * 6 * h * e, b * 10 * h * e]
    assert ec.extra_pair_bytes(cfg, par, b, e, 2) == 2 * 2 * b * h * e * (2 * (6 - 4) + 6)


@pytest.mark.parametrize("tp,sp", [(1, False), (2, False), (2, True)])
def test_layer_activation_bytes_equal_the_measured_caches(tp, sp):
    """What each encoder and decoder layer keeps after a forward (the activation meter,
    ``minipar.nn.memory``) equals ``layer_activation_bytes``, byte for byte."""
    from minipar.dist.mesh import Mesh
    from minipar.nn import memory

    cfg = encdec_cfg(n_layers=1, d_model=16, src_len=6, seq_len=4, vocab_size=11)
    (x, y), = encdec_batches(cfg, 1, 3)

    def body(world):
        engine = Engine(cfg, ParallelConfig(tp=tp, sequence_parallel=sp), Mesh(world, tp=tp),
                        dtype="float64")
        model = engine.chunks[0]
        model.forward(x, 0, y, 1.0)
        return [memory.activation_bytes(layer) for layer in (model.encoder[0],
                                                             model.decoder[0])]

    for got in run_threads(body, tp):
        assert got == [ec.layer_activation_bytes(cfg, kind, 3, tp, sp, 8)
                       for kind in ("encoder", "decoder")]


def test_simulate_command_prices_the_encoder_decoder(capsys):
    """``python -m minipar.simulate --arch encdec``: the JSON's bytes per group are the comm
    model's, the pipeline's extra over GPT-sized messages is the memory's B*S*C per microbatch
    each way at the one (encoder -> decoder) boundary of pp 2, less B*T*C; bad input is one
    line."""
    import json

    from minipar.config import replace
    from minipar.simulate import main
    from minipar.sim.presets import MODELS

    argv = ["--arch", "encdec", "--model", "gpt3-125m", "--layers", "2", "--seq-len", "64",
            "--src-len", "128", "--pp", "2", "--dp", "2", "--global-batch", "8", "--dtype", "fp32"]
    assert main(argv + ["--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    model = replace(MODELS["gpt3-125m"][0], n_layers=2, seq_len=64, arch="encdec", src_len=128)
    par = ParallelConfig(dp=2, pp=2, microbatches=4)
    want = {g: sum(v["bytes"] for v in ops.values())
            for g, ops in predict_comm_bytes(model, par, 8, 4, stage=0).items()}
    assert est["comm_bytes_per_step"] == want
    h, m = 768, 4
    assert est["pipeline_bytes_sent"] - est["pipeline_bytes_sent_gpt_sized"] == \
        2 * m * 1 * (128 - 64) * h * 4
    assert est["params"] == cm.param_count(model)
    assert main(argv + ["--json", "--pos-bias"]) == 0  # 12 heads x 128^2 per encoder layer
    assert json.loads(capsys.readouterr().out)["params"] == est["params"] + 2 * 12 * 128 * 128
    assert main(argv) == 0 and "memory pair" in capsys.readouterr().out
    assert main(argv[:-2] + ["--timeline", "x.png"]) == 2
    assert main(["--src-len", "8"]) == 2
    assert main(["--pos-bias"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["minipar.simulate: error: --timeline/--trace need the time model, which is "
                   "the GPT's: leave them out with --arch encdec",
                   "minipar.simulate: error: --src-len applies to --arch encdec",
                   "minipar.simulate: error: --pos-bias applies to --arch encdec"]
