"""Layout-independent checkpoints with atomic writes.

A checkpoint is a directory ``step-NNNNNN/`` holding

    model.npz      every full (unsharded) parameter, by name
    optim.npz      every full optimizer-state tensor, as "<param name>/<state>" (m, v, momentum)
    meta.json      step, optimizer step count, model config, the layout it was saved from, seed,
                   the data position, and a SHA-256 of each .npz file

Full tensors by name are what make a checkpoint independent of the layout: a run saved at
dp=2, tp=2, pp=2 resumes at dp=4 or on one rank, because every rank cuts its own shard out of the
full tensors exactly as initialisation does.

Writes are atomic: rank 0 writes into a temporary directory, fsyncs every file and the directory,
then renames it into place. A run killed while saving leaves at most a stale ``.tmp-*``
directory, never a half-written ``step-*``; loading verifies the checksums, so a truncated or
corrupt file is refused with a clear error, never loaded half-way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import asdict

import numpy

from minipar.config import ConfigError, ModelConfig

STEP_DIR = re.compile(r"^step-(\d{6})$")
FORMAT = 1


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: one line naming the path and what is wrong."""


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(run_dir: str, step: int, params: dict, optim: dict, meta: dict,
          keep: int | None = None) -> str:
    """Write ``run_dir/step-NNNNNN`` atomically (rank 0 only); returns its path.

    ``params`` maps names to full arrays, ``optim`` maps "name/state" to full arrays.
    ``keep`` > 0 deletes all but the newest ``keep`` checkpoints afterwards.
    """
    os.makedirs(run_dir, exist_ok=True)
    final = os.path.join(run_dir, step_dir_name(step))
    tmp = tempfile.mkdtemp(prefix=f".tmp-{step_dir_name(step)}-", dir=run_dir)
    try:
        files = {}
        for fname, arrays in (("model.npz", params), ("optim.npz", optim)):
            path = os.path.join(tmp, fname)
            with open(path, "wb") as fh:
                numpy.savez(fh, **{k: numpy.asarray(v) for k, v in arrays.items()})
                fh.flush()
                os.fsync(fh.fileno())
            files[fname] = _sha256(path)
        meta = {**meta, "format": FORMAT, "step": step, "files": files}
        with open(os.path.join(tmp, "meta.json"), "w") as fh:
            json.dump(meta, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_path(tmp)
        if os.path.exists(final):  # saving the same step again replaces it whole
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_path(run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep:
        for old in list_steps(run_dir)[:-keep]:
            shutil.rmtree(os.path.join(run_dir, step_dir_name(old)), ignore_errors=True)
    return final


def list_steps(run_dir: str) -> list[int]:
    """Steps of the complete checkpoints in ``run_dir``, oldest first."""
    if not os.path.isdir(run_dir):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(run_dir)
                  if (m := STEP_DIR.match(name)) and
                  os.path.isfile(os.path.join(run_dir, name, "meta.json")))


def resolve(path: str) -> str:
    """A step directory from ``--resume PATH``: a step directory itself, or a run directory
    (then its newest complete checkpoint)."""
    if not os.path.exists(path):
        raise CheckpointError(f"--resume {path}: no such file or directory")
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path
    steps = list_steps(path)
    if not steps:
        raise CheckpointError(f"--resume {path}: no checkpoint (step-NNNNNN/) in this directory")
    return os.path.join(path, step_dir_name(steps[-1]))


def read(step_dir: str, model: ModelConfig) -> tuple[dict, dict, dict]:
    """(params, optim, meta) of a checkpoint, verified against its checksums and ``model``.

    Every rank reads the full tensors and later cuts its own shard; nothing is half-loaded:
    all checks pass before anything is returned.
    """
    meta_path = os.path.join(step_dir, "meta.json")
    try:
        with open(meta_path) as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"--resume {step_dir}: meta.json is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"--resume {step_dir}: meta.json is corrupt ({exc})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"--resume {step_dir}: unknown checkpoint format "
                              f"{meta.get('format')!r} (this minipar writes {FORMAT})")
    saved = meta.get("model", {})
    if saved != asdict(model):
        diff = {k: (saved.get(k), v) for k, v in asdict(model).items() if saved.get(k) != v}
        raise CheckpointError(f"--resume {step_dir}: the checkpoint's model does not match this "
                              f"run's (saved, requested): {diff}")
    out = []
    for fname in ("model.npz", "optim.npz"):
        path = os.path.join(step_dir, fname)
        if not os.path.isfile(path):
            raise CheckpointError(f"--resume {step_dir}: {fname} is missing")
        if _sha256(path) != meta.get("files", {}).get(fname):
            raise CheckpointError(f"--resume {step_dir}: {fname} is truncated or corrupt "
                                  "(checksum mismatch)")
        try:
            with numpy.load(path) as data:
                out.append({k: data[k] for k in data.files})
        except Exception as exc:  # a file that matches its checksum but still fails to parse
            raise CheckpointError(f"--resume {step_dir}: cannot read {fname} ({exc})") from None
    return out[0], out[1], meta
