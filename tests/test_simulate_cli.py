"""``python -m minipar.simulate``: reports, JSON, search, timelines and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from minipar.simulate import main
from minipar.sim.presets import PTDP_TABLE1

REQUIRED = ("step_time_s", "params", "tflops_per_gpu", "percent_of_peak", "mfu",
            "bubble_fraction", "memory_per_gpu_bytes", "comm_bytes_per_step")


def run(capsys, *argv):
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_default_report_is_readable_and_names_the_published_number(capsys):
    rc, out, err = run(capsys)
    assert rc == 0 and err == ""
    for word in ("step time", "TFLOP/s per GPU", "MFU", "bubble", "memory per GPU",
                 "comm per step", "published"):
        assert word in out
    assert f"{PTDP_TABLE1['ptdp-145b'].measured['tflops_per_gpu']} TFLOP/s" in out


def test_json_has_the_documented_keys(capsys):
    rc, out, _ = run(capsys, "--model", "ptdp-39b", "--json")
    assert rc == 0
    data = json.loads(out)
    for key in REQUIRED:
        assert key in data
    mem = data["memory_per_gpu_bytes"]
    kinds = ("weights", "gradients", "optimizer", "activations")
    assert mem["total"] == pytest.approx(sum(mem[k] for k in kinds))
    assert set(data["comm_bytes_per_step"]) >= {"tp", "dp", "pp", "total"}
    assert data["layout"] == {**data["layout"], "dp": 32, "tp": 8, "pp": 2, "recompute": "full"}
    assert 0 < data["mfu"] < data["percent_of_peak"] / 100 < 1
    assert data["params"] == pytest.approx(39.1e9, rel=0.01)


def test_overrides_and_layout_flags(capsys):
    rc, out, _ = run(capsys, "--model", "gpt3-350m", "--layers", "8", "--d-model", "512",
                     "--heads", "8", "--seq-len", "512", "--vocab", "1000", "--gpus", "16",
                     "--tp", "2", "--pp", "2", "--virtual-stages", "2", "--microbatch-size", "2",
                     "--global-batch", "64", "--zero", "1", "--sequence-parallel",
                     "--recompute", "selective", "--hardware", "h100-sxm", "--dtype", "fp16",
                     "--json")
    assert rc == 0
    data = json.loads(out)
    lay = data["layout"]
    assert (lay["dp"], lay["tp"], lay["pp"], lay["virtual_stages"]) == (4, 2, 2, 2)
    assert (lay["schedule"], lay["microbatches"], lay["zero"]) == ("interleaved", 8, 1)
    assert data["hardware"] == "h100-sxm" and lay["dtype"] == "fp16"


@pytest.mark.parametrize("argv, text", [
    (["--model", "gpt3-175b", "--tp", "7"], "--tp 7 must divide"),
    (["--model", "gpt3-175b", "--gpus", "100", "--tp", "8"], "--gpus 100 is not divisible"),
    (["--model", "gpt3-175b", "--pp", "5"], "--layers 96 must be divisible"),
    (["--model", "gpt3-175b", "--dp", "7"], "--global-batch 1536 is not divisible"),
    (["--model", "gpt3-175b", "--dp", "2", "--gpus", "4"], "does not equal --gpus 4"),
    (["--model", "nope"], "--model must be one of"),
    (["--dtype", "fp8"], "--dtype must be one of"),
    (["--model", "ptdp-39b", "--virtual-stages", "2", "--schedule", "1f1b"], "interleaved"),
    (["--hardware", "this-machine", "--hardware-file", "/nonexistent.json"], "minipar.bench"),
    (["--search"], None),  # ptdp-145b knows its GPU count: this one must succeed
    (["--model", "gpt3-175b", "--search"], "--search needs --gpus"),
])
def test_bad_layouts_get_one_line_and_nonzero_exit(capsys, argv, text):
    if text is None:
        argv = argv + ["--top", "1"]
    rc, out, err = run(capsys, *argv)
    if text is None:
        assert rc == 0
        return
    assert rc == 2 and out == ""
    assert text in err and "Traceback" not in err and err.count("\n") == 1


def test_layout_that_does_not_fit_says_so(capsys):
    rc, out, err = run(capsys, "--model", "gpt3-175b", "--tp", "8", "--pp", "8", "--dp", "2")
    assert rc == 1 and "memory per GPU" in out
    assert "does not fit" in err and err.count("\n") == 1


def test_search_ranks_layouts_that_fit(capsys):
    rc, out, _ = run(capsys, "--model", "gpt3-13b", "--gpus", "64", "--search", "--top", "4",
                     "--json")
    assert rc == 0
    data = json.loads(out)
    ranked = data["ranked"]
    assert 1 <= len(ranked) <= 4 and data["fitting"] >= len(ranked)
    times = [r["step_time_s"] for r in ranked]
    assert times == sorted(times)
    for r in ranked:
        lay = r["layout"]
        assert lay["dp"] * lay["tp"] * lay["pp"] * lay["cp"] == 64 and r["fits"]
        assert r["memory_per_gpu_bytes"]["total"] <= 80 * 2 ** 30
    assert data["rejected"]  # some layouts are rejected, with reasons
    rc, text, _ = run(capsys, "--model", "gpt3-13b", "--gpus", "64", "--search", "--top", "3")
    assert rc == 0 and "rejected" in text and text.count("\n") >= 5


def test_search_reports_when_nothing_fits(capsys):
    rc, _, err = run(capsys, "--model", "gpt3-175b", "--gpus", "2", "--search")
    assert rc == 1 and "--gpus 2: no layout fits" in err


def test_timeline_trace_and_this_machine(capsys, tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"gemm_flops": 1e11, "blas_threads": 2}))
    png, trace = tmp_path / "t.png", tmp_path / "t.json"
    rc, out, _ = run(capsys, "--model", "gpt3-125m", "--layers", "4", "--d-model", "64",
                     "--heads", "4", "--seq-len", "32", "--vocab", "64", "--pp", "2",
                     "--global-batch", "8", "--dtype", "fp32", "--hardware", "this-machine",
                     "--hardware-file", str(bench), "--timeline", str(png),
                     "--trace", str(trace))
    assert rc == 0 and "this-machine" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    events = json.loads(trace.read_text())
    events = events["traceEvents"] if isinstance(events, dict) else events
    assert any(e.get("ph") == "X" for e in events)


def test_module_runs_as_a_command_with_examples_in_help():
    res = subprocess.run([sys.executable, "-m", "minipar.simulate", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "examples:" in res.stdout and "--search" in res.stdout


@pytest.mark.parametrize("argv, line", [
    (["--hardware", "tpu"], "argument --hardware: invalid choice: 'tpu'"),
    (["--gpus", "0"], "--gpus must be a positive integer, got 0"),
    (["--global-batch", "0"], "--global-batch must be a positive integer, got 0"),
    (["--microbatch-size", "0"], "--microbatch-size must be a positive integer, got 0"),
    (["--tp", "0"], "--tp must be a positive integer, got 0"),
    (["--pp", "0"], "--pp must be a positive integer, got 0"),
    (["--dp", "0"], "--dp must be a positive integer, got 0"),
    (["--virtual-stages", "0"], "--virtual-stages must be a positive integer, got 0"),
    (["--search", "--top", "0"], "--top must be a positive integer, got 0"),
    (["--layers", "0"], "--layers must be a positive integer, got 0"),
    (["--bucket-mb", "-1"], "--bucket-mb must be a finite number >= 0"),
    (["--model", "gpt3-125m", "--sequence-parallel"], "--sequence-parallel"),
    (["--search", "--tp", "8"], "--search chooses the layout itself: leave out --tp"),
    (["--timeline", "/"], "--timeline /: is a directory"),
    (["--trace", "/no/such/dir/t.json"], "--trace /no/such/dir/t.json: the directory"),
])
def test_zero_is_not_unset_and_usage_errors_are_one_line(capsys, argv, line):
    """A zero used to mean "unset" (the preset's value, rc 0); argparse printed all usage."""
    try:
        rc = main(argv)
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    assert rc == 2 and out == "" and err.count("\n") == 1, (rc, err)
    assert line in err and "usage:" not in err


def test_an_overridden_preset_is_not_named_as_the_preset(capsys):
    rc, out, _ = run(capsys, "--model", "ptdp-145b", "--layers", "48")
    assert rc in (0, 1) and out.startswith("ptdp-145b with --layers 48: ")
    assert "published" not in out  # the paper's number is for the unmodified model
    rc, out, _ = run(capsys, "--model", "ptdp-145b", "--layers", "80")  # the preset's own value
    assert out.startswith("ptdp-145b: ") and "published" in out


def test_search_header_explains_its_letters(capsys):
    rc, out, _ = run(capsys, "--model", "gpt3-1.3b", "--gpus", "8", "--search", "--top", "2")
    assert rc == 0
    legend = next(ln for ln in out.splitlines() if ln.startswith("v: "))
    for word in ("v: model chunks per pipeline rank", "b: sequences per microbatch",
                 "m: microbatches per step"):
        assert word in legend
