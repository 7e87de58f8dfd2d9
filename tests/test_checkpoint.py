"""Checkpoints: layout-independent, exact on resume, atomic, and refused when damaged."""

import json
import os

import numpy as np
import pytest

from cli_util import run
from minipar import checkpoint
from minipar.config import ModelConfig

TRAIN = ["-m", "minipar.train", "--quiet", "--dtype", "float64", "--model", "tiny",
         "--eval-every", "100"]


def losses(path):
    return json.loads(path.read_text())["losses"]


@pytest.mark.parametrize("save_layout, resume_layout, n_save, n_resume, rtol", [
    ([], [], None, None, 1e-12),  # same layout, serial
    (["--tp", "2", "--pp", "2", "--dp", "1", "--microbatches", "2", "--zero", "0"],
     ["--dp", "2"], 4, 2, 1e-9),
    (["--dp", "2"], [], 2, None, 1e-9),
    (["--dp", "2", "--tp", "2", "--zero", "3"], ["--dp", "2", "--zero", "2"], 4, 2, 1e-9),
])
def test_resume_continues_the_uninterrupted_losses(tmp_path, save_layout, resume_layout,
                                                   n_save, n_resume, rtol):
    full, first, second = tmp_path / "full.json", tmp_path / "a.json", tmp_path / "b.json"
    ckpt = tmp_path / "run"
    assert run([*TRAIN, "--steps", "6", "--summary", str(full)]).returncode == 0
    out = run([*TRAIN, *save_layout, "--steps", "3", "--save", str(ckpt), "--summary",
               str(first)], n=n_save)
    assert out.returncode == 0, out.stderr
    assert checkpoint.list_steps(str(ckpt)) == [3]
    out = run([*TRAIN, *resume_layout, "--steps", "6", "--resume", str(ckpt), "--summary",
               str(second)], n=n_resume)
    assert out.returncode == 0, out.stderr
    assert "resume  | from step 3" in out.stdout
    np.testing.assert_allclose(losses(first) + losses(second), losses(full), rtol=rtol)


def _write(run_dir, step, value=1.0):
    cfg = ModelConfig()
    params = {"w": np.full((2, 3), value)}
    meta = {"model": __import__("dataclasses").asdict(cfg), "optimizer_steps": step}
    return checkpoint.write(str(run_dir), step, params, {"w/m": np.zeros((2, 3))}, meta,
                            keep=2), cfg


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
    assert "does not match" in out.stderr and "Traceback" not in out.stderr
