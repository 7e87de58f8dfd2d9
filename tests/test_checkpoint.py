"""Checkpoints: layout-independent, exact on resume, atomic, and refused when damaged."""

import json
import os
from dataclasses import asdict

import numpy as np
import pytest

from cli_util import run
from inproc import train
from minipar import checkpoint
from minipar.config import ModelConfig

TRAIN = ["-m", "minipar.train", "--quiet", "--dtype", "float64", "--model", "tiny",
         "--eval-every", "100"]


def losses(path):
    return json.loads(path.read_text())["losses"]


@pytest.mark.parametrize("save_layout, resume_layout, n_save, n_resume, rtol, real", [
    ([], [], 1, 1, 1e-12, False),  # same layout, serial
    (["--tp", "2", "--pp", "2", "--dp", "1", "--microbatches", "2", "--zero", "0"],
     ["--dp", "2"], 4, 2, 1e-9, True),  # as processes under mpirun
    (["--dp", "2"], [], 2, 1, 1e-9, False),
    (["--dp", "2", "--tp", "2", "--zero", "3"], ["--dp", "2", "--zero", "2"], 4, 2, 1e-9, False),
])
def test_resume_continues_the_uninterrupted_losses(tmp_path, save_layout, resume_layout,
                                                   n_save, n_resume, rtol, real):
    """Ranks are processes under mpirun in one case, a thread world in this process in the
    others (the same command, much cheaper)."""
    full, first, second = tmp_path / "full.json", tmp_path / "a.json", tmp_path / "b.json"
    ckpt = tmp_path / "run"

    def command(argv, n):
        if real:
            out = run([*TRAIN, *argv], n=None if n == 1 else n)
            return out.returncode, out.stdout, out.stderr
        codes, out, err = train([*TRAIN[2:], *argv], n=n)
        return max(codes), out, err

    assert command(["--steps", "6", "--summary", str(full)], 1)[0] == 0
    rc, _, err = command([*save_layout, "--steps", "3", "--save", str(ckpt), "--summary",
                          str(first)], n_save)
    assert rc == 0, err
    assert checkpoint.list_steps(str(ckpt)) == [3]
    rc, out, err = command([*resume_layout, "--steps", "6", "--resume", str(ckpt), "--summary",
                            str(second)], n_resume)
    assert rc == 0, err
    assert "resume  | from step 3" in out
    np.testing.assert_allclose(losses(first) + losses(second), losses(full), rtol=rtol)


def _meta(cfg, step, run_id="run-a"):
    return {"model": asdict(cfg), "optimizer_steps": step, "run_id": run_id, "task": "sort",
            "seed": 0, "optimizer": "adamw", "dtype": "float64",
            "layout": {"dp": 1, "tp": 1, "pp": 1}}


def _write(run_dir, step, value=1.0, run_id="run-a", keep=2, **kw):
    cfg = ModelConfig()
    params = {"w": np.full((2, 3), value)}
    return checkpoint.write(str(run_dir), step, params, {"w/m": np.zeros((2, 3))},
                            _meta(cfg, step, run_id), keep=keep, **kw), cfg


def test_keep_newest_and_resolve(tmp_path):
    for step in (1, 2, 3):
        _write(tmp_path, step)
    assert checkpoint.list_steps(str(tmp_path)) == [2, 3]
    assert checkpoint.resolve(str(tmp_path)).endswith("step-000003")
    one = os.path.join(tmp_path, "step-000002")
    assert checkpoint.resolve(one) == one


def test_a_crash_while_saving_leaves_the_last_good_checkpoint(tmp_path, monkeypatch):
    _, cfg = _write(tmp_path, 1, value=1.0)

    def crash(*args, **kw):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path, 2, value=2.0)
    monkeypatch.undo()
    # A kill -9 cannot clean up: leave a stale temporary directory like it would.
    os.makedirs(os.path.join(tmp_path, ".tmp-step-000002-x"))
    assert checkpoint.list_steps(str(tmp_path)) == [1]
    params, _, meta = checkpoint.read(checkpoint.resolve(str(tmp_path)), cfg)
    assert meta["step"] == 1 and (params["w"] == 1.0).all()


def test_truncated_or_mismatched_checkpoints_are_refused(tmp_path):
    path, cfg = _write(tmp_path, 1)
    other = ModelConfig(d_model=128)
    with pytest.raises(checkpoint.CheckpointError, match="does not match"):
        checkpoint.read(path, other)
    model = os.path.join(path, "model.npz")
    with open(model, "r+b") as fh:
        fh.truncate(os.path.getsize(model) // 2)
    with pytest.raises(checkpoint.CheckpointError, match="truncated or corrupt"):
        checkpoint.read(path, cfg)
    os.remove(model)
    with pytest.raises(checkpoint.CheckpointError, match="model.npz is missing"):
        checkpoint.read(path, cfg)


def test_cli_refuses_a_checkpoint_of_another_model(tmp_path):
    ckpt = tmp_path / "run"
    assert run([*TRAIN, "--steps", "2", "--save", str(ckpt)]).returncode == 0
    out = run([*TRAIN, "--steps", "4", "--d-model", "64", "--resume", str(ckpt)])
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr
    # the flags that differ, as the user types them; not taken for damage (no "intact" hint)
    assert lines[0].endswith("does not match this run's: it has --d-model 32, this run "
                             "--d-model 64"), lines


# -- a kill with no clean-up, a damaged directory, a directory of another run ---------------------

KILLED_WHILE_WRITING_META = """
import json, os, signal, sys
import numpy as np
from minipar import checkpoint

meta = json.loads(sys.argv[2])
checkpoint.write(sys.argv[1], 1, {"w": np.ones((2, 3))}, {"w/m": np.zeros((2, 3))}, meta)

def dump_half_then_die(obj, fh, **kw):  # SIGKILL: no exception handler, no clean-up runs
    text = json.dumps(obj, **kw)
    fh.write(text[: len(text) // 2])
    fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)

json.dump = dump_half_then_die
checkpoint.write(sys.argv[1], 2, {"w": np.full((2, 3), 2.0)}, {"w/m": np.zeros((2, 3))}, meta)
"""


def test_a_kill_while_writing_meta_json_leaves_the_last_good_checkpoint(tmp_path):
    """A checkpoint written in place would leave step-000002 with half a meta.json here."""
    import subprocess
    import sys

    script, run_dir = tmp_path / "die.py", tmp_path / "run"
    script.write_text(KILLED_WHILE_WRITING_META)
    cfg = ModelConfig()
    proc = subprocess.run([sys.executable, str(script), str(run_dir), json.dumps(_meta(cfg, 1))],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr  # really killed, mid-write
    names = sorted(os.listdir(run_dir))  # "." sorts first
    assert len(names) == 2 and names[0].startswith(".tmp-step-000002-"), names
    assert names[1] == "step-000001"
    params, _, meta = checkpoint.load(str(run_dir), cfg)
    assert meta["step"] == 1 and (params["w"] == 1.0).all()
    _write(run_dir, 3)  # the next save removes the stale temporary
    assert sorted(os.listdir(run_dir)) == ["step-000001", "step-000003"]


@pytest.mark.parametrize("content, message", [
    ("[]", "meta.json must hold a JSON object, found an array ([])"),
    ("{not json", "meta.json is corrupt"),
    (None, "meta.json is missing"),
    ("files-null", "field 'files' (a SHA-256 per file) must be an object, found null"),
    ("no-run-id",
     "field 'run_id' (the id of the run that wrote it) must be a string, found it missing"),
    ("format-1", "unknown checkpoint format 1"),
])
def test_meta_json_is_checked_as_a_schema(tmp_path, content, message):
    path, cfg = _write(tmp_path, 1)
    meta_path = os.path.join(path, "meta.json")
    meta = json.loads(open(meta_path).read())
    if content is None:
        os.remove(meta_path)
    else:
        edits = {"files-null": {"files": None}, "format-1": {"format": 1}}
        if content in edits:
            content = json.dumps({**meta, **edits[content]})
        elif content == "no-run-id":
            content = json.dumps({k: v for k, v in meta.items() if k != "run_id"})
        with open(meta_path, "w") as fh:
            fh.write(content)
    for where in (path, str(tmp_path)):  # the step named, or its run directory
        with pytest.raises(checkpoint.CheckpointError) as info:
            checkpoint.load(where, cfg)
        assert message in str(info.value) and str(info.value).startswith(f"--resume {path}")


def test_a_damaged_newest_checkpoint_names_the_newest_intact_one(tmp_path):
    for step in (1, 2, 3):
        path, cfg = _write(tmp_path, step, keep=0)
    with open(os.path.join(tmp_path, "step-000002", "optim.npz"), "ab") as fh:
        fh.write(b"junk")
    model = os.path.join(path, "model.npz")
    with open(model, "r+b") as fh:
        fh.truncate(10)
    with pytest.raises(checkpoint.CheckpointError) as info:
        checkpoint.load(str(tmp_path), cfg)
    msg = str(info.value)
    assert "step-000003: model.npz is truncated or corrupt" in msg
    assert msg.endswith(f"the newest intact checkpoint is older: --resume "
                        f"{os.path.join(tmp_path, 'step-000001')}")
    with pytest.raises(checkpoint.CheckpointError) as info:  # named explicitly: no hint
        checkpoint.load(path, cfg)
    assert "intact" not in str(info.value)


def test_keep_deletes_only_this_runs_steps(tmp_path):
    for step in (20, 40, 60):
        _write(tmp_path, step, run_id="old", keep=3)
    for step in (10, 30, 50, 70):
        _write(tmp_path, step, run_id="new", keep=2)
    owners = checkpoint.step_owners(str(tmp_path))
    assert owners == {20: "old", 40: "old", 50: "new", 60: "old", 70: "new"}
    assert checkpoint.foreign_steps(str(tmp_path), "new") == [20, 40, 60]
    assert checkpoint.foreign_steps(str(tmp_path), None) == [20, 40, 50, 60, 70]
    _write(tmp_path, 80, run_id="new", keep=2, replace_other_runs=True)
    assert checkpoint.list_steps(str(tmp_path)) == [70, 80]


def test_fp16_resume_keeps_the_dynamic_loss_scale(tmp_path):
    """The loss scale is optimizer state: a resumed fp16 run must continue the doubling
    schedule where it stopped (window 2: 1024 -> 2048 after step 2 -> 4096 after step 4 -> 8192
    after step 6), not restart it from --loss-scale."""
    base = ["--quiet", "--model", "tiny", "--steps", "6", "--precision", "fp16",
            "--loss-scale", "1024", "--loss-scale-window", "2", "--eval-every", "100"]
    full, second, ckpt = tmp_path / "full.json", tmp_path / "b.json", tmp_path / "run"
    assert train([*base, "--summary", str(full)], n=1)[0] == [0]
    first = [*base[:4], "3", *base[5:], "--save", str(ckpt)]
    assert train(first, n=1)[0] == [0]
    codes, _, err = train([*base, "--resume", str(ckpt), "--summary", str(second)], n=1)
    assert codes == [0], err
    done, resumed = (json.loads(p.read_text()) for p in (full, second))
    assert done["loss_scale"] == resumed["loss_scale"] == 1024 * 2 ** 3
    assert done["overflow_skips"] == resumed["overflow_skips"] == 0
