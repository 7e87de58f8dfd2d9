"""The memory pre-check of --arch encdec: the cost model's parameter count (which the pre-check
uses) is the built model's, per tp rank, and a run too large for the machine is refused with one
line before it starts."""

from hypothesis import given, settings
from hypothesis import strategies as st

from minipar.config import ModelConfig, ParallelConfig
from minipar.dist.comm import run_threads
from minipar.dist.mesh import Mesh
from minipar.engine import Engine
from minipar.sim.costmodel import local_param_count
from minipar.train.checks import estimate_rank_bytes
from inproc import train


@settings(max_examples=10, deadline=None)
@given(tp=st.sampled_from([1, 2]), layers=st.integers(1, 2), vocab=st.integers(5, 13),
       tie=st.booleans(), pos=st.sampled_from(["learned", "sinusoidal"]),
       norm=st.sampled_from(["pre", "post"]), src=st.integers(2, 6), tgt=st.integers(2, 5),
       pos_bias=st.booleans())
def test_param_count_is_the_built_models_on_every_tp_rank(tp, layers, vocab, tie, pos, norm,
                                                           src, tgt, pos_bias):
    cfg = ModelConfig(vocab_size=vocab, seq_len=tgt, n_layers=layers, d_model=8, n_heads=2,
                      arch="encdec", src_len=src, tie_weights=tie, pos=pos, norm=norm,
                      pos_bias=pos_bias)

    def local(world):
        engine = Engine(cfg, ParallelConfig(tp=tp), Mesh(world, tp=tp), seed=0)
        return sum(p.data.size for p in engine.params)

    assert run_threads(local, tp) == [local_param_count(cfg, ParallelConfig(tp=tp), 0)] * tp


def test_estimate_grows_with_the_source_and_the_batch():
    cfg = ModelConfig(vocab_size=30, seq_len=8, n_layers=2, d_model=64, n_heads=4,
                      arch="encdec", src_len=16, pos="sinusoidal")
    longer = ModelConfig(**{**cfg.__dict__, "src_len": 64})
    a = estimate_rank_bytes(cfg, ParallelConfig(), 64, "float32", "adamw")
    b = estimate_rank_bytes(longer, ParallelConfig(), 64, "float32", "adamw")
    assert b["activations"] > a["activations"] and b["weights"] == a["weights"]
    assert a["weights"] == 4 * local_param_count(cfg, ParallelConfig(), 0)


def test_a_batch_too_large_is_refused_in_one_line():
    codes, out, err = train(["--arch", "encdec", "--batch-size", "50000000", "--steps", "1"])
    assert codes == [2] and "--batch-size 50000000" in err, (out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
