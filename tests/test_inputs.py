"""Never lose a run to a typo (issue 17): every bad input is one line naming the flag or the
file, before any training step (nothing on stdout: not even the banner), with exit code 2.

Each case runs ``minipar.train``'s ``main`` in this process (tests/inproc.py), which is what
makes ~50 cases cheap; tests/test_cli_fuzz.py draws combinations of them, in process and under
``mpirun``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys

import pytest

from inproc import train
from minipar import checkpoint

TINY = ["--model", "tiny", "--quiet", "--eval-every", "100"]


def _text(tmp_path, name="book.txt"):
    path = tmp_path / name
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    return str(path)


_TEMPLATE: list = []  # one checkpoint made per module run, copied by every case that needs one


@pytest.fixture(scope="module", autouse=True)
def _template_dir(tmp_path_factory):
    _TEMPLATE[:] = [tmp_path_factory.mktemp("template") / "ckpt"]


def _ckpt(tmp_path, *extra):
    """A real checkpoint of a 2-step tiny run (a copy of the module's): its run directory."""
    run_dir = tmp_path / "ckpt"
    if extra or not _TEMPLATE[0].exists():
        codes, _, err = train([*TINY, "--steps", "2", "--save", str(run_dir), *extra])
        assert codes == [0], err
        if not extra:
            shutil.copytree(run_dir, _TEMPLATE[0])
    else:
        shutil.copytree(_TEMPLATE[0], run_dir)
    return str(run_dir)


def _edit_meta(run_dir, fn):
    path = os.path.join(run_dir, "step-000002", "meta.json")
    with open(path) as fh:
        meta = json.load(fh)
    with open(path, "w") as fh:
        fh.write(fn(meta))


# (id, argv builder, the line must contain this). "{tmp}" is the test's temporary directory.
CASES = [
    # found after training before: a traceback once the run was over
    ("summary-no-dir", lambda t: ["--summary", f"{t}/nodir/x.json"],
     "--summary {tmp}/nodir/x.json: the directory {tmp}/nodir does not exist"),
    ("trace-is-dir", lambda t: ["--trace", str(t)], "--trace {tmp}: is a directory"),
    ("plot-is-file", lambda t: ["--plot", _text(t)], "--plot {tmp}/book.txt: is a file"),
    ("save-proc", lambda t: ["--save", "/proc/x"], "--save /proc/x: cannot write in /proc"),
    ("save-is-file", lambda t: ["--save", _text(t)], "--save {tmp}/book.txt: is a file"),
    ("summary-proc", lambda t: ["--summary", "/proc/x.json"], "--summary /proc/x.json: cannot"),
    # tracebacks or wrong messages before
    ("meta-list", lambda t: ["--resume", _broken(t, lambda m: "[]")],
     "meta.json must hold a JSON object, found an array ([])"),
    ("meta-files-null",
     lambda t: ["--resume", _broken(t, lambda m: json.dumps({**m, "files": None}))],
     "field 'files' (a SHA-256 per file) must be an object, found null"),
    ("adamw-as-sgd", lambda t: ["--resume", _ckpt(t), "--optimizer", "sgd"],
     "trained with --optimizer adamw, this run asks for --optimizer sgd; pass --force"),
    ("tp-negative", lambda t: ["--tp", "-1"], "--tp must be a positive integer, got -1"),
    ("pp-zero", lambda t: ["--pp", "0"], "--pp must be a positive integer, got 0"),
    ("data-dir", lambda t: ["--data", str(t)], "--data {tmp}: is a directory"),
    ("data-dev-zero", lambda t: ["--data", "/dev/zero"], "--data /dev/zero: not a regular file"),
    ("data-binary", lambda t: ["--data", sys.executable], "not UTF-8 text"),
    ("meta-deleted", lambda t: ["--resume", _no_meta(t)], "step-000002: meta.json is missing"),
    # accepted silently before, though wrong or harmful
    ("batch-2e6", lambda t: ["--batch-size", "2000000"],
     "--batch-size 2000000 (with --seq-len 16"),
    ("batch-1e9", lambda t: ["--batch-size", "1e9"], "--batch-size: invalid int value: '1e9'"),
    ("huge-model", lambda t: ["--layers", "100000", "--d-model", "4096"],
     "the model (--layers 100000, --d-model 4096"),
    ("seq-len-1000", lambda t: ["--seq-len", "1000"], "--seq-len 1000: task sort needs 16"),
    ("warmup", lambda t: ["--warmup", "-5"], "--warmup must be >= 0, got -5"),
    ("grad-clip", lambda t: ["--grad-clip", "-1"], "--grad-clip must be >= 0, got -1.0"),
    ("weight-decay", lambda t: ["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    ("threads", lambda t: ["--threads", "0"], "--threads must be a positive integer, got 0"),
    ("sp-without-tp", lambda t: ["--sequence-parallel"], "--sequence-parallel"),
    ("other-task", lambda t: ["--resume", _ckpt(t), "--task", "reverse"],
     "trained with --task sort, this run asks for --task reverse"),
    ("other-seed", lambda t: ["--resume", _ckpt(t), "--seed", "3"],
     "trained with --seed 0, this run asks for --seed 3"),
    # a run directory belongs to one run
    ("foreign-run", lambda t: ["--save", _ckpt(t)],
     "the directory holds another run's checkpoints (step 2); continue that run with --resume"),
    # more numbers
    ("lr-nan", lambda t: ["--lr", "nan"], "--lr must be a finite number"),
    ("lr-inf", lambda t: ["--lr", "inf"], "--lr must be a finite number"),
    ("lr-zero", lambda t: ["--lr", "0"], "--lr must be > 0, got 0.0"),
    ("bucket", lambda t: ["--bucket-mb", "-1"], "--bucket-mb must be >= 0"),
    ("microbatches", lambda t: ["--microbatches", "0"], "--microbatches must be a positive"),
    ("virtual", lambda t: ["--virtual-stages", "0"], "--virtual-stages must be a positive"),
    ("eval-every", lambda t: ["--eval-every", "0"], "--eval-every must be a positive"),
    ("keep", lambda t: ["--keep", "-1"], "--keep must be >= 0"),
    ("save-every", lambda t: ["--save-every", "5"], "--save-every needs --save DIR"),
    ("overwrite", lambda t: ["--overwrite"], "--overwrite needs --save DIR"),
    ("n-digits", lambda t: ["--n-digits", "0"], "--n-digits must be a positive integer"),
    ("n-digits-big", lambda t: ["--n-digits", "30"], "--n-digits: at most 18"),
    ("vocab-zero", lambda t: ["--vocab", "0"], "--vocab must be a positive integer, got 0"),
    ("layers-zero", lambda t: ["--layers", "0"], "--layers must be a positive integer, got 0"),
    ("d-model-zero", lambda t: ["--d-model", "0"], "--d-model must be a positive integer"),
    ("seed", lambda t: ["--seed", "-1"], "--seed must be >= 0, got -1"),
    ("zero", lambda t: ["--zero", "4"], "--zero must be 0, 1, 2 or 3"),
    ("dp", lambda t: ["--dp", "2"], "does not equal the number of ranks (1)"),
    ("resume-file", lambda t: ["--resume", _text(t)], "--resume {tmp}/book.txt: not a directory"),
    ("resume-done", lambda t: ["--resume", _ckpt(t), "--steps", "2"],
     "the checkpoint is at step 2, not before --steps 2"),
]


def _broken(tmp_path, edit):
    run_dir = _ckpt(tmp_path)
    _edit_meta(run_dir, edit)
    return run_dir


def _no_meta(tmp_path):
    step = os.path.join(_ckpt(tmp_path), "step-000002")
    os.remove(os.path.join(step, "meta.json"))
    return step


@pytest.mark.parametrize("build, text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_every_bad_input_is_one_line_before_training(tmp_path, build, text):
    argv = build(tmp_path)
    codes, out, err = train([*TINY, "--steps", "4", *argv])
    assert codes == [2], (out, err)
    assert out == "", out  # before any training step: not even the banner
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert text.format(tmp=tmp_path) in err, err
    assert re.search(r"--[a-z]", err), err  # names a flag


@pytest.mark.parametrize("argv", [["--save", "/proc/x"], ["--batch-size", "2000000"],
                                  ["--tp", "2", "--layers", "0"]])
def test_every_rank_stops_and_one_prints(argv):
    codes, out, err = train([*TINY, *argv], n=2)
    assert codes == [2, 2] and out == "" and err.count("\n") == 1, (codes, err)


def test_force_resumes_with_a_warning_and_a_fresh_optimizer(tmp_path):
    run_dir = _ckpt(tmp_path)
    codes, out, err = train([*TINY, "--steps", "3", "--resume", run_dir, "--seed", "1",
                             "--optimizer", "sgd", "--force"])
    assert codes == [0], err
    assert ("warning | --force: resuming a checkpoint of --seed 0, --optimizer adamw with "
            "--seed 1, --optimizer sgd") in out
    assert "warning | the sgd state starts from zero" in out and "resume  | from step 2" in out


def test_overwrite_starts_over_in_another_runs_directory(tmp_path):
    run_dir = _ckpt(tmp_path, "--save-every", "1")
    old = set(checkpoint.step_owners(run_dir).values())
    codes, _, err = train([*TINY, "--steps", "3", "--save", run_dir, "--save-every", "1",
                           "--overwrite"])
    assert codes == [0], err
    owners = checkpoint.step_owners(run_dir)
    assert list(owners) == [1, 2, 3] and len(set(owners.values())) == 1
    assert not old & set(owners.values())
    codes, _, err = train([*TINY, "--steps", "5", "--resume", run_dir, "--save", run_dir])
    assert codes == [0], err  # continuing one's own run in its directory is fine
    assert set(checkpoint.step_owners(run_dir).values()) == set(owners.values())


def test_a_damaged_step_in_the_save_directory_is_named(tmp_path):
    """Resuming an older step into a directory whose newest step is damaged: the damaged one is
    not called another run's."""
    run_dir = _ckpt(tmp_path, "--save-every", "1")
    os.remove(os.path.join(run_dir, "step-000002", "meta.json"))
    step1 = os.path.join(run_dir, "step-000001")
    codes, out, err = train([*TINY, "--steps", "3", "--resume", step1, "--save", run_dir])
    assert codes == [2] and out == ""
    assert err.strip().endswith(f"--save {run_dir}: the directory holds damaged checkpoints "
                                "(step 2); save somewhere else, or pass --overwrite to replace "
                                "them"), err
    codes, _, err = train([*TINY, "--steps", "3", "--resume", step1, "--save", run_dir,
                           "--overwrite"])
    assert codes == [0], err
    assert list(checkpoint.step_owners(run_dir)) == [1, 3]


def test_moderate_padding_is_a_warning_and_force_allows_more(tmp_path):
    codes, out, _ = train([*TINY, "--steps", "1", "--seq-len", "20"])
    assert codes == [0] and "warning | --seq-len 20: task sort needs 16" in out
    codes, out, _ = train([*TINY, "--steps", "1", "--seq-len", "40", "--force"])
    assert codes == [0] and "warning | --seq-len 40" in out
