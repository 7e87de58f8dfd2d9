"""The training CLI as a user meets it: help, errors that name the flag, a short real run."""

import json
import re

import pytest

from cli_util import run
from inproc import train
from minipar.train.cli import EXAMPLES, build_parser

TRAIN = ["-m", "minipar.train", "--quiet"]


def test_help_lists_flags_and_examples():
    out = run(["-m", "minipar.train", "--help"])
    assert out.returncode == 0
    for flag in ("--dp", "--tp", "--pp", "--zero", "--schedule", "--save", "--resume",
                 "--summary", "examples:"):
        assert flag in out.stdout
    for cmd, _ in EXAMPLES:  # the examples the next test runs are the ones printed
        assert f"  {cmd}\n" in out.stdout


def test_every_flag_has_help():
    for action in build_parser()._actions:
        assert action.help and len(action.help) > 10, action.option_strings


def test_every_help_example_runs(tmp_path):
    """Each example of --help, as printed, for 2 steps: ranks as a thread world in-process."""
    book = tmp_path / "book.txt"
    book.write_text("It was the best of times, it was the worst of times. " * 300)
    for cmd, _ in EXAMPLES:
        words = cmd.split()
        n = int(words[2]) if words[0] == "mpirun" else 1
        argv = [str(book) if w == "book.txt" else w for w in words[words.index("-m") + 2:]]
        codes, out, err = train([*argv, "--steps", "2", "--eval-every", "2", "--quiet"], n=n)
        assert codes == [0] * n, (cmd, err)
        assert "done    | 2 steps" in out and err == "", (cmd, out, err)
        if "--task text" in cmd:  # a learner sees what the model writes
            assert re.search(r"sample  \| '.+' -> '.+'", out), out


@pytest.mark.parametrize("args, flag", [
    (["--task", "nope"], "--task"),
    (["--task", "text", "--data", "/no/such/file.txt"], "--data"),
    (["--d-model", "30", "--heads", "4"], "--heads"),
    (["--batch-size", "0"], "--batch-size"),
    (["--layers", "-1"], "--layers"),
    (["--steps", "0"], "--steps"),
    (["--tp", "3"], "--tp"),
    (["--pp", "3"], "--pp"),
    (["--zero", "7"], "--zero"),
    (["--schedule", "zigzag"], "--schedule"),
    (["--model", "huge"], "--model"),
    (["--dp", "2"], "--dp"),  # 2 x 1 x 1 does not equal one rank
    (["--resume", "/no/such/run"], "--resume"),
])
def test_bad_input_is_one_line_naming_the_flag(args, flag):
    out = run([*TRAIN, *args])
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert flag in lines[0] and "Traceback" not in out.stderr


def test_bad_layout_under_mpirun_fails_once_and_fast():
    out = run([*TRAIN, "--dp", "1", "--tp", "1", "--pp", "1"], n=2, timeout=60)
    assert out.returncode != 0
    errors = [ln for ln in out.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and "does not equal the number of ranks (2)" in errors[0]


@pytest.mark.parametrize("args, message", [
    (["--pp", "2", "--layers", "3"], "--layers 3 must be divisible by --pp"),
    (["--tp", "2", "--heads", "3", "--d-model", "48"], "--tp 2 must divide the number of heads"),
])
def test_layout_errors_under_mpirun_name_the_flag(args, message):
    out = run([*TRAIN, *args], n=2, timeout=60)
    assert out.returncode != 0
    errors = [ln for ln in out.stderr.splitlines() if "error" in ln]
    assert len(errors) == 1 and message in errors[0], out.stderr


def test_short_run_writes_a_summary(tmp_path):
    path = tmp_path / "s.json"
    out = run([*TRAIN, "--steps", "12", "--eval-every", "6", "--summary", str(path)])
    assert out.returncode == 0, out.stderr
    summary = json.loads(path.read_text())
    for key in ("layout", "steps", "losses", "final_loss", "eval_accuracy", "tokens_per_s",
                "params", "wall_s", "comm", "memory"):
        assert key in summary
    assert summary["layout"] == {**summary["layout"], "dp": 1, "tp": 1, "pp": 1, "world": 1}
    assert len(summary["losses"]) == 12 and summary["losses"][-1] < summary["losses"][0]
    assert "done" in out.stdout and "held-out exact match" in out.stdout


def test_data_parallel_run_equals_serial_run(tmp_path):
    """The README's main command at 4 ranks gives the serial losses (float64)."""
    args = [*TRAIN, "--steps", "4", "--eval-every", "4", "--dtype", "float64"]
    serial, parallel = tmp_path / "1.json", tmp_path / "4.json"
    assert run([*args, "--summary", str(serial)]).returncode == 0
    out = run([*args, "--summary", str(parallel)], n=4, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "all ranks do data parallelism" in out.stdout
    a, b = json.loads(serial.read_text()), json.loads(parallel.read_text())
    assert b["layout"]["dp"] == 4
    assert b["losses"] == pytest.approx(a["losses"], rel=1e-12)
    assert b["comm"]["dp"]["allreduce"]["calls"] == 4
