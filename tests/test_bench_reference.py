"""``python -m minipar.bench --reference torch`` and ``--contention``: what needs no timing.

PyTorch is an optional extra, so its path is checked with a stand-in for torch's step (the
comparison, the interleaving, the first-loss check) and, without torch, by the one line the
command prints; timings are never asserted. The busy process of ``--contention`` is checked to
run during the measured steps and to be gone after.
"""

import os
import sys

import numpy as np
import pytest

from minipar.bench import contention, reference
from minipar.bench import step as bench


class Args:
    model, batch_size, dtype, steps = "tiny", 2, "float64", 2


def test_comparison_by_hand():
    cmp = reference.comparison({"step_s": 2.0}, {"step_s": 3.0}, tokens=1000,
                               flops_per_token=1e6, peak=1e9)
    assert cmp["speedup"] == 1.5  # minipar's tokens/s over PyTorch's
    assert cmp["minipar"] == {"step_s": 2.0, "tokens_per_s": 500.0, "fraction_of_peak": 0.5}
    assert cmp["torch"]["fraction_of_peak"] == pytest.approx(1 / 3)
    text = reference.format_comparison(cmp, 2, "2.x")
    assert "1.50x" in text and "50%" in text and "33%" in text


def test_without_torch_one_line_and_minipar_alone(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    assert reference.load_torch() is None
    assert bench.reference_torch(Args, peak=1e9) is None
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "PyTorch is not installed" in out[0]


def test_reference_interleaves_steps_and_checks_the_first_loss(monkeypatch):
    """A stand-in torch step reports minipar's own first loss (times ``factor``): the bench
    alternates the two step by step, compares them, and refuses a different first loss."""
    calls, first = [], {}
    real_call = bench.MiniparStep.__call__

    def minipar_call(self):
        calls.append("minipar")
        seconds, loss = real_call(self)
        first.setdefault("loss", loss)
        return seconds, loss

    class FakeTorchStep:
        factor = 1.0

        def __init__(self, torch, cfg, weights, batch, dtype, threads):
            assert "blocks.0.attn.qkv.w" in weights  # minipar's initial weights reach it

        def __call__(self):
            calls.append("torch")
            return 0.5, first["loss"] * self.factor

    monkeypatch.setattr(reference, "load_torch", lambda: type("torch", (), {"__version__": "x"}))
    monkeypatch.setattr(reference, "TorchStep", FakeTorchStep)
    monkeypatch.setattr(bench.MiniparStep, "__call__", minipar_call)
    out = bench.reference_torch(Args, peak=1e9)
    assert calls == ["minipar", "torch"] * 4  # 2 warm-up + 2 timed steps, interleaved
    assert out["torch"]["step_s"] == 0.5
    assert out["speedup"] == pytest.approx(0.5 / out["minipar"]["step_s"])
    assert abs(first["loss"] - np.log(16)) < 0.5  # untrained: about ln V, V = 16 (tiny)
    FakeTorchStep.factor = 1.01
    first.clear()
    with pytest.raises(RuntimeError, match="not the same model"):
        bench.reference_torch(Args, peak=1e9)


def test_contention_interleaves_paused_and_running_busy_process(monkeypatch):
    """Steps alternate: the busy process is stopped for one, running for the next (read from
    /proc), and it is gone after; the slowdown is the ratio of the medians."""
    spawned = []
    real = contention.busy_process

    def spy(seconds):
        spawned.append(real(seconds))
        return spawned[-1]

    def state():
        with open(f"/proc/{spawned[0].pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0]  # R/S running, T stopped

    monkeypatch.setattr(contention, "busy_process", spy)
    seen = []

    def step():
        seen.append(state())
        return (2.0 if seen[-1] == "T" else 3.0), 0.0

    out = contention.measure_contention(step, n=3, warmup=1, seconds=30)
    assert seen == ["T", "R"] * 4
    assert spawned[0].poll() is not None  # killed once the steps are measured
    assert out["alone_s"] == 2.0 and out["busy_s"] == 3.0 and out["slowdown"] == 1.5
    assert "1.50x slower" in contention.format_contention(out)


def test_scaling_ratios_and_table_by_hand():
    from minipar.bench import comm

    tps = {"1 rank, 1 thread": 100.0, "dp=2": 190.0, "1 rank, 2 threads": 180.0,
           "tp=2": 153.0, "pp=2": 162.0}
    r = comm.scaling_ratios(tps)
    assert r["speedup"] == pytest.approx(1.9)
    assert r["efficiency"] == {"tp=2": pytest.approx(0.85), "pp=2": pytest.approx(0.9)}
    scale = {**r, "layouts": {k: {"tokens_per_s": v} for k, v in tps.items()}}
    text = comm.scaling_text(scale)
    assert "speedup 1.90x" in text and "efficiency 0.85" in text and "efficiency 0.90" in text
    assert [ln.split()[0] for ln in text.splitlines()[1:]] == ["1", "dp=2", "1", "tp=2", "pp=2"]


def test_scaling_trains_the_preset_shapes_on_a_generated_text(tmp_path):
    """--scaling's default task is next-byte prediction at the preset's own sequence length and
    vocabulary (what ``python -m minipar.bench`` times), on a file the text task accepts."""
    from types import SimpleNamespace

    from minipar.bench import comm
    from minipar.tasks import TextTask

    flags = comm._scaling_task(SimpleNamespace(task="text", model="small"), str(tmp_path))
    assert flags[2:] == ["--seq-len", 256, "--vocab", 4096]  # the small preset's shapes
    path = flags[1]
    assert os.path.getsize(path) == 100_000
    task = TextTask(path, seed=0, seq_len=256)
    assert sum(len(x) for x, _ in task.eval_batches(64)) == 5_000 // 257  # a short final eval
    assert comm._scaling_task(SimpleNamespace(task="sort", model="small"), str(tmp_path)) == [
        "--task", "sort"]
