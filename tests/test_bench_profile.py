"""``python -m minipar.bench --profile``: the kernel timers count what a step calls, by hand."""

from __future__ import annotations

from minipar.bench import profile
from minipar.bench.step import MiniparStep
from minipar.config import MODEL_PRESETS
from minipar.nn import functional as F
from minipar.nn import optim


def test_profile_counts_each_kernel_call_of_a_step_once():
    cfg = MODEL_PRESETS["tiny"]
    layers = cfg.n_layers
    step = MiniparStep("tiny", 2, "float32")
    originals = (F.linear_fwd, F.mha_fwd, optim.adamw_update)
    prof = profile.profile_step(step, n=2, warmup=1)
    calls = {k: v["calls"] for k, v in prof["kernels"].items()}
    # per step: 4 linear layers a block (qkv, proj, fc, proj) and the head
    assert calls["linear_fwd"] == calls["linear_bwd_input"] == 4 * layers + 1
    assert calls["mha_fwd"] == calls["mha_bwd"] == layers
    assert "attention_fwd" not in calls  # inside mha_fwd: counted there, once
    assert calls["layernorm_fwd"] == 2 * layers + 1  # two a block and the final one
    assert calls["adamw_update"] == len(step.engine.params)
    assert calls["vocab_cross_entropy_fwd"] == calls["vocab_cross_entropy_bwd"] == 1
    spent = sum(k["s"] for k in prof["kernels"].values())
    assert 0 < spent <= prof["step_s"] and abs(spent + prof["other_s"] - prof["step_s"]) < 1e-9
    assert (F.linear_fwd, F.mha_fwd, optim.adamw_update) == originals  # restored
    text = profile.format_profile(prof)
    assert "linear_fwd" in text and "other" in text
