"""CLI fuzz: hypothesis draws flag combinations, valid and invalid, for ``minipar.train`` and
``minipar.simulate``. Whatever it draws, the command must either succeed or print exactly one
error line that names a flag, with no traceback and no hang.

Most draws run in this process (``main(argv)``: milliseconds for a bad input, about a second
for a tiny valid run), serially and on a 2-rank thread world; a few run as real processes, one
serial and one under ``mpirun -n 2``, each with a timeout. About 60 draws in all.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from cli_util import REPO, env_one_thread, mpirun_path
from inproc import train
from minipar.train.cli import build_parser

TRAIN_FLAGS = {a for action in build_parser()._actions for a in action.option_strings}
SECONDS = 90  # bound on one draw, on a loaded machine (a valid tiny run takes ~1 s)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    """Files and directories the drawn flags point at (valid and not)."""
    root = tmp_path_factory.mktemp("fuzz")
    (root / "book.txt").write_text("all work and no play makes jack a dull boy. " * 200)
    (root / "prog.bin").write_bytes(bytes(range(256)) * 8)
    (root / "dir").mkdir()
    (root / "out").mkdir()  # NEW/...: paths a valid run may write
    return {"TEXT": str(root / "book.txt"), "BINARY": str(root / "prog.bin"),
            "DIR": str(root / "dir"), "NEW": str(root / "out"), "MISSING": str(root / "no/x"),
            "ROOT": str(root)}


# flag -> (values that are fine alone, values that are not); None: a switch without a value.
TRAIN_VALUES: dict[str, tuple | None] = {
    "--model": (["tiny", "default"], ["huge"]),
    "--batch-size": (["8", "16"], ["0", "-1", "2000000", "x"]),
    "--dp": (["1"], ["-1", "0", "3"]), "--tp": (["1", "2"], ["-1", "0", "3"]),
    "--pp": (["1", "2"], ["0", "4"]), "--zero": (["0", "1", "2", "3"], ["4"]),
    "--microbatches": (["1", "2"], ["0"]), "--virtual-stages": (["1"], ["0", "2"]),
    "--schedule": (["gpipe", "1f1b", "interleaved", "zb-h1"], ["zigzag"]),
    "--sequence-parallel": None, "--tie-weights": None, "--skip-nonfinite": None,
    "--pos-bias": None, "--weight-init": (["gpt2", "fan-in"], ["xavier"]),
    "--force": None, "--overwrite": None, "--bogus": None,
    "--seq-len": (["16", "20"], ["1000", "0"]), "--layers": (["2", "4"], ["0", "3", "100000"]),
    "--d-model": (["32"], ["30", "0", "4096"]), "--heads": (["2", "4"], ["3"]),
    "--warmup": (["0", "5"], ["-5"]), "--grad-clip": (["0", "1"], ["-1"]),
    "--weight-decay": (["0.1"], ["-1"]), "--lr": (["0.01"], ["nan", "inf", "0", "-1", "1e400"]),
    "--threads": (["1"], ["0"]), "--task": (["sort", "add", "reverse"], ["text", "nope"]),
    "--data": (["TEXT"], ["DIR", "/dev/zero", "BINARY", "MISSING"]),
    "--summary": (["NEW/s.json"], ["DIR", "MISSING", "/proc/x.json"]),
    "--trace": (["NEW/t.json"], ["DIR"]), "--plot": (["DIR"], ["TEXT", "/proc/x"]),
    "--save": (["NEW/ckpt"], ["/proc/x", "TEXT"]), "--resume": (["NEW/ckpt"], ["MISSING"]),
    "--optimizer": (["adamw", "sgd"], ["lion"]), "--eval-every": (["1"], ["0"]),
    "--vocab": (["300"], ["0", "5"]), "--n-digits": (["3"], ["0", "30"]),
    "--bucket-mb": (["0", "0.001"], ["-1"]), "--seed": (["0", "1"], ["-1"]),
    "--dtype": (["float64"], ["float16"]), "--keep": (["0", "2"], ["-1"]),
    "--save-every": (["1"], ["-1"]), "--dropout": (["0", "0.1"], ["1", "-0.1", "nan"]),
    "--attention": (["plain", "blockwise"], ["flash"]),
    "--recompute": (["none", "selective", "full"], ["some"]),
    "--init-from": (["NEW/ckpt"], ["MISSING", "TEXT"]),
    "--freeze": (["embed", "blocks.0,head"], ["emb", "a,,b"]),
    "--cp": (["1", "2"], ["-1", "0", "3"]), "--cp-split": (["zigzag", "contiguous"], ["ring"]),
}


def _value(draw, values: tuple, clean: bool, paths_of: dict) -> str:
    value = draw(st.sampled_from(values[0] if clean else values[0] + values[1]))
    for key, path in paths_of.items():
        value = value.replace(key, path) if value.startswith(key) else value
    return value


@st.composite
def train_argv(draw, paths_of: dict) -> list[str]:
    """Up to 6 flags; in half the draws only values that are fine alone (combinations may
    still clash), so that both refusals and real runs are common."""
    clean = draw(st.booleans())
    argv = ["--steps", draw(st.sampled_from(["1", "2"] if clean else ["1", "0", "-3"]))]
    flags = [f for f in sorted(TRAIN_VALUES) if not (clean and f == "--bogus")]
    for flag in draw(st.lists(st.sampled_from(flags), max_size=6, unique=True)):
        argv.append(flag)
        if TRAIN_VALUES[flag] is not None:
            argv.append(_value(draw, TRAIN_VALUES[flag], clean, paths_of))
    return argv


def check_outcome(codes: list[int], out: str, err: str, flags: set[str], argv) -> None:
    """Success, or one error line that names a flag; the same exit code on every rank."""
    assert len(set(codes)) == 1, (argv, codes, err)
    assert "Traceback" not in out + err, (argv, err)
    event("ran" if codes[0] == 0 else "refused")  # --hypothesis-show-statistics shows the mix
    if codes[0] == 0:
        assert err == "" and "done    |" in out, (argv, out, err)
        return
    assert codes[0] == 2, (argv, codes, err)
    lines = err.splitlines()
    assert len(lines) == 1 and "error:" in lines[0], (argv, err)
    named = set(re.findall(r"--[a-z][a-z0-9-]*", lines[0]))
    assert named & (flags | set(argv)), (argv, lines[0])  # one of the command's or the user's


def fuzz(n: int) -> settings:
    """``n`` draws, no per-draw deadline (SECONDS bounds them), fixtures shared by the draws."""
    return settings(max_examples=n, deadline=None, suppress_health_check=[
        HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@fuzz(30)
@given(data=st.data())
def test_train_fuzz_in_process(paths, data):
    argv = data.draw(train_argv(paths))
    t0 = time.monotonic()
    codes, out, err = train(argv, timeout=SECONDS)
    assert time.monotonic() - t0 < SECONDS, argv
    check_outcome(codes, out, err, TRAIN_FLAGS, argv)


@fuzz(15)
@given(data=st.data())
def test_train_fuzz_on_two_thread_ranks(paths, data):
    argv = data.draw(train_argv(paths))
    codes, out, err = train(argv, n=2, timeout=SECONDS)
    check_outcome(codes, out, err, TRAIN_FLAGS, argv)


@fuzz(3)
@given(data=st.data(), n=st.sampled_from([1, 2]))
def test_train_fuzz_as_real_processes(paths, data, n):
    """As a user runs it: ``python -m minipar.train`` alone, or each rank a process under
    ``mpirun -n 2`` (where a rank that fails alone must not leave the other hanging)."""
    argv = data.draw(train_argv(paths))
    cmd = [sys.executable, "-m", "minipar.train", *argv]
    if n == 2:
        cmd = [mpirun_path(), "-n", "2", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS, cwd=REPO,
                         env=env_one_thread())
    check_outcome([out.returncode], out.stdout, out.stderr, TRAIN_FLAGS, argv)


# -- simulate ----------------------------------------------------------------------------------

SIM_VALUES: dict[str, tuple | None] = {
    "--model": (["gpt3-125m", "gpt3-1.3b", "ptdp-39b", "gpt3-175b"], ["nope"]),
    "--gpus": (["1", "8", "64"], ["0", "-8"]), "--dp": (["1", "2", "8"], ["0"]),
    "--tp": (["1", "2", "8"], ["0", "7"]), "--pp": (["1", "2"], ["0", "5"]),
    "--virtual-stages": (["1", "2"], ["0"]),
    "--schedule": (["1f1b", "interleaved", "gpipe"], ["x"]),
    "--microbatch-size": (["1", "2"], ["0"]), "--global-batch": (["8", "64"], ["0", "7"]),
    "--zero": (["0", "1", "3"], ["9"]), "--sequence-parallel": None,
    "--recompute": (["none", "full"], ["some"]), "--bucket-mb": (["0", "25"], ["-1", "nan"]),
    "--hardware": (["a100-80gb", "h100-sxm"], ["tpu"]), "--dtype": (["bf16", "fp32"], ["fp8"]),
    "--layers": (["4"], ["0", "3"]), "--d-model": (["256"], ["0", "250"]),
    "--heads": (["4"], ["0"]), "--seq-len": (["128"], ["0"]), "--vocab": (["1000"], ["0"]),
    "--d-ff": (["0", "512"], ["-1"]), "--top": (["1", "3"], ["0"]), "--json": None,
    "--search": None, "--no-scatter-gather": None, "--bogus": None,
    "--timeline": (["NEW/t.png"], ["DIR", "MISSING"]), "--trace": (["NEW/t.json"], ["DIR"]),
}


@fuzz(25)
@given(data=st.data())
def test_simulate_fuzz(paths, data, capsys):
    from minipar.simulate import build_parser as sim_parser
    from minipar.simulate import main as simulate

    flags = {a for action in sim_parser()._actions for a in action.option_strings}
    clean = data.draw(st.booleans())
    argv = []
    for flag in data.draw(st.lists(st.sampled_from(sorted(SIM_VALUES)), max_size=6,
                                   unique=True)):
        argv.append(flag)
        if SIM_VALUES[flag] is not None:
            argv.append(_value(data.draw, SIM_VALUES[flag], clean, paths))
    if "--search" in argv and not any(f in argv for f in ("--gpus", "--global-batch")):
        argv += ["--gpus", "64"]  # the default 145B on 1536 GPUs would take seconds
    capsys.readouterr()
    t0 = time.monotonic()
    try:
        rc = simulate(argv)
    except SystemExit as exc:
        rc = exc.code
    out, err = capsys.readouterr()
    assert time.monotonic() - t0 < SECONDS, argv
    assert "Traceback" not in out + err and rc in (0, 1, 2), (argv, rc, err)
    event("ran" if rc == 0 else "refused")
    if rc == 0:
        assert err == "" and out, (argv, err)
        return
    lines = err.splitlines()
    assert len(lines) == 1 and "error:" in lines[0], (argv, err)
    assert set(re.findall(r"--[a-z][a-z0-9-]*", lines[0])) & (flags | set(argv)), (argv, err)
