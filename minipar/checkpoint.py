"""Layout-independent checkpoints with atomic writes, owned by one run.

A checkpoint is a directory ``step-NNNNNN/`` holding

    model.npz      every full (unsharded) parameter, by name
    optim.npz      every full optimizer-state tensor, as "<param name>/<state>" (m, v, momentum)
    meta.json      step, optimizer step count, model config, the layout it was saved from, task,
                   seed, optimizer, the run id, the data position, and a SHA-256 of each file

Full tensors by name are what make a checkpoint independent of the layout: a run saved at
dp=2, tp=2, pp=2 resumes at dp=4 or on one rank, because every rank cuts its own shard out of the
full tensors exactly as initialisation does.

Writes are atomic: rank 0 writes into a temporary directory, fsyncs every file and the directory,
then renames it into place. A run killed while saving leaves at most a stale ``.tmp-step-*``
directory, never a half-written ``step-*``, and the next save removes it. Loading checks
``meta.json`` against a schema and every file against its checksum, so a truncated or corrupt
checkpoint is refused with one line (naming the newest intact older step, if there is one),
never loaded half-way.

A run directory belongs to one run: every step records its run's id (``run_id``), a resumed run
keeps the id, and ``--keep`` only ever deletes the run's own steps. The training command refuses
to start a fresh run in a directory that holds another run's steps (``foreign_steps``) unless
told to start over, which deletes them at its first save.
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

from minipar.config import ConfigError, ModelConfig, model_flag

STEP_DIR = re.compile(r"^step-(\d{6})$")
TMP_PREFIX = ".tmp-step-"
FORMAT = 2  # 2: run_id, task, seed and optimizer are required in meta.json
FILES = ("model.npz", "optim.npz")

# meta.json's schema: key -> (type, what it is). Checked before any value is used.
SCHEMA: dict[str, tuple[type, str]] = {
    "format": (int, "the checkpoint format"),
    "step": (int, "the training step"),
    "optimizer_steps": (int, "the optimizer's step count"),
    "run_id": (str, "the id of the run that wrote it"),
    "model": (dict, "the model configuration"),
    "layout": (dict, "the layout it was saved from"),
    "task": (str, "the task"),
    "seed": (int, "the seed"),
    "optimizer": (str, "the optimizer"),
    "dtype": (str, "the dtype"),
    "files": (dict, "a SHA-256 per file"),
}


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used: one line naming the path and what is wrong."""


class ModelMismatch(CheckpointError):
    """An intact checkpoint of another model than the run asks for (not damage: an older
    checkpoint of the same run would not fit either)."""


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


# ------------------------------------------------------------------------------------ writing
def _portable(v) -> numpy.ndarray:
    """``v`` as an array any NumPy reads: a 16-bit float (bfloat16 has no .npy type) is widened
    to float32, exactly; a run in any precision loads it and rounds to its own dtype."""
    a = numpy.asarray(v)
    if a.dtype.itemsize == 2 and a.dtype.kind in "fV":
        return a.astype(numpy.float32)
    return a


def write(run_dir: str, step: int, params: dict, optim: dict, meta: dict,
          keep: int | None = None, replace_other_runs: bool = False) -> str:
    """Write ``run_dir/step-NNNNNN`` atomically (rank 0 only); returns its path.

    ``params`` maps names to full arrays, ``optim`` maps "name/state" to full arrays; ``meta``
    must hold every ``SCHEMA`` key but format, step and files. Stale temporaries of killed
    saves are removed first. ``keep`` > 0 then deletes all but the newest ``keep`` steps of this
    run (``meta["run_id"]``); ``replace_other_runs`` deletes every other run's steps.
    """
    missing = [k for k in SCHEMA if k not in meta and k not in ("format", "step", "files")]
    if missing:
        raise ValueError(f"checkpoint meta lacks {missing}")
    os.makedirs(run_dir, exist_ok=True)
    remove_stale_temporaries(run_dir)
    final = os.path.join(run_dir, step_dir_name(step))
    tmp = tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{step:06d}-", dir=run_dir)
    try:
        files = {}
        for fname, arrays in zip(FILES, (params, optim)):
            path = os.path.join(tmp, fname)
            with open(path, "wb") as fh:
                numpy.savez(fh, **{k: _portable(v) for k, v in arrays.items()})
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
    _prune(run_dir, meta["run_id"], keep, replace_other_runs)
    return final


def remove_stale_temporaries(run_dir: str) -> list[str]:
    """Delete the ``.tmp-step-*`` directories a killed save left behind; returns their names.

    Only one run writes into a run directory (see ``foreign_steps``), and it saves from one
    rank, one step at a time, so every temporary found here is stale.
    """
    stale = sorted(n for n in os.listdir(run_dir) if n.startswith(TMP_PREFIX))
    for name in stale:
        shutil.rmtree(os.path.join(run_dir, name), ignore_errors=True)
    return stale


def _prune(run_dir: str, run_id: str, keep: int | None, replace_other_runs: bool) -> None:
    owners = step_owners(run_dir)
    own = [s for s, rid in owners.items() if rid == run_id]
    doomed = own[:-keep] if keep else []
    if replace_other_runs:
        doomed += [s for s, rid in owners.items() if rid != run_id]
    for step in doomed:
        shutil.rmtree(os.path.join(run_dir, step_dir_name(step)), ignore_errors=True)


# ------------------------------------------------------------------------------ the directory
def list_steps(run_dir: str) -> list[int]:
    """Steps of the ``step-NNNNNN`` directories in ``run_dir``, oldest first.

    Writes are atomic, so a step directory is complete unless something damaged it later;
    ``read`` finds out which.
    """
    if not os.path.isdir(run_dir):
        return []
    return sorted(int(m.group(1)) for name in os.listdir(run_dir)
                  if (m := STEP_DIR.match(name)) and os.path.isdir(os.path.join(run_dir, name)))


def _run_id_of(step_dir: str) -> str | None:
    try:
        with open(os.path.join(step_dir, "meta.json")) as fh:
            meta = json.load(fh)
    except (OSError, ValueError):
        return None
    rid = meta.get("run_id") if isinstance(meta, dict) else None
    return rid if isinstance(rid, str) else None


def step_owners(run_dir: str) -> dict[int, str | None]:
    """{step: the run id in its meta.json (None when unreadable)}, oldest first."""
    return {s: _run_id_of(os.path.join(run_dir, step_dir_name(s))) for s in list_steps(run_dir)}


def foreign_steps(run_dir: str, run_id: str | None) -> list[int]:
    """Steps in ``run_dir`` that another run wrote (all of them when ``run_id`` is None, a
    fresh run that owns nothing yet)."""
    return [s for s, rid in step_owners(run_dir).items() if run_id is None or rid != run_id]


def is_step_dir(path: str) -> bool:
    """Whether ``--resume PATH`` names one checkpoint rather than a run directory."""
    return (STEP_DIR.match(os.path.basename(os.path.normpath(path))) is not None
            or any(os.path.exists(os.path.join(path, f)) for f in ("meta.json", *FILES)))


def resolve(path: str, flag: str = "--resume") -> str:
    """A step directory from ``--resume PATH`` (or ``flag PATH``): a step directory itself, or
    a run directory (then its newest checkpoint)."""
    if not os.path.exists(path):
        raise CheckpointError(f"{flag} {path}: no such file or directory")
    if not os.path.isdir(path):
        raise CheckpointError(f"{flag} {path}: not a directory (give a run directory or one "
                              f"of its step-NNNNNN directories)")
    if is_step_dir(path):
        return path
    steps = list_steps(path)
    if not steps:
        raise CheckpointError(f"{flag} {path}: no checkpoint (step-NNNNNN/) in this directory")
    return os.path.join(path, step_dir_name(steps[-1]))


# ------------------------------------------------------------------------------------ reading
_JSON_NAMES = {dict: "an object", list: "an array", str: "a string", int: "an integer",
               float: "a number", bool: "a boolean", type(None): "null"}


def _json_kind(value) -> str:
    return _JSON_NAMES.get(type(value), type(value).__name__)


def _check_schema(meta, where: str) -> dict:
    """``meta`` if it has every SCHEMA key with the right type, else CheckpointError."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: meta.json must hold a JSON object, found "
                              f"{_json_kind(meta)} ({json.dumps(meta)[:40]})")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{where}: unknown checkpoint format {meta.get('format')!r} "
                              f"(this minipar reads format {FORMAT})")
    for key, (kind, what) in SCHEMA.items():
        value = meta.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            got = "it missing" if key not in meta else _json_kind(value)
            raise CheckpointError(f"{where}: meta.json field {key!r} ({what}) must be "
                                  f"{_json_kind(kind())}, found {got}")
    for fname in FILES:
        if not isinstance(meta["files"].get(fname), str):
            raise CheckpointError(f"{where}: meta.json field 'files' has no checksum for {fname}")
    for axis in ("dp", "tp", "pp"):
        if not isinstance(meta["layout"].get(axis), int):
            raise CheckpointError(f"{where}: meta.json field 'layout' lacks {axis!r}")
    if meta["step"] < 0 or meta["optimizer_steps"] < 0:
        raise CheckpointError(f"{where}: meta.json has a negative step")
    return meta


def read_meta(step_dir: str, where: str | None = None) -> dict:
    """The validated ``meta.json`` of one checkpoint (CheckpointError naming what is wrong)."""
    where = where or f"--resume {step_dir}"
    try:
        with open(os.path.join(step_dir, "meta.json")) as fh:
            meta = json.load(fh)
    except FileNotFoundError:
        raise CheckpointError(f"{where}: meta.json is missing") from None
    except IsADirectoryError:
        raise CheckpointError(f"{where}: meta.json is a directory") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{where}: meta.json is corrupt ({exc})") from None
    meta = _check_schema(meta, where)
    m = STEP_DIR.match(os.path.basename(os.path.normpath(step_dir)))
    if m and int(m.group(1)) != meta["step"]:
        raise CheckpointError(f"{where}: meta.json says step {meta['step']}, the directory "
                              f"name says {int(m.group(1))}")
    return meta


def verify(step_dir: str, where: str | None = None) -> dict:
    """``read_meta`` plus every file present and matching its checksum; returns the meta."""
    where = where or f"--resume {step_dir}"
    meta = read_meta(step_dir, where)
    for fname in FILES:
        path = os.path.join(step_dir, fname)
        if not os.path.isfile(path):
            raise CheckpointError(f"{where}: {fname} is missing")
        if _sha256(path) != meta["files"][fname]:
            raise CheckpointError(f"{where}: {fname} is truncated or corrupt "
                                  "(checksum mismatch)")
    return meta


def read(step_dir: str, model: ModelConfig) -> tuple[dict, dict, dict]:
    """(params, optim, meta) of a checkpoint, verified against its schema, its checksums and
    ``model``.

    Every rank reads the full tensors and later cuts its own shard; nothing is half-loaded:
    all checks pass before anything is returned.
    """
    where = f"--resume {step_dir}"
    meta = verify(step_dir, where)
    # A field added since the checkpoint was written (arch, src_len, norm) has its default.
    # Dropout is how a run trains, not what the weights are: a checkpoint resumes with any P; nor
    # is --weight-init, how they were first drawn.
    saved = {k: v for k, v in {**asdict(ModelConfig()), **meta["model"]}.items()
             if k not in ("dropout", "weight_init")}
    want = {k: v for k, v in asdict(model).items() if k not in ("dropout", "weight_init")}
    if saved != want:
        diff = [k for k, v in want.items() if saved.get(k) != v]
        then = ", ".join(model_flag(k, saved.get(k)) for k in diff)
        here = ", ".join(model_flag(k, want[k]) for k in diff)
        raise ModelMismatch(f"{where}: the checkpoint's model does not match this run's: it "
                            f"has {then}, this run {here}")
    out = []
    for fname in FILES:
        try:
            with numpy.load(os.path.join(step_dir, fname)) as data:
                out.append({k: data[k] for k in data.files})
        except Exception as exc:  # a file that matches its checksum but still fails to parse
            raise CheckpointError(f"{where}: cannot read {fname} ({exc})") from None
    return out[0], out[1], meta


def newest_intact(run_dir: str, below: int) -> str | None:
    """The newest step directory of ``run_dir`` older than step ``below`` that verifies."""
    for step in reversed([s for s in list_steps(run_dir) if s < below]):
        path = os.path.join(run_dir, step_dir_name(step))
        try:
            verify(path)
        except CheckpointError:
            continue
        return path
    return None


def load(path: str, model: ModelConfig) -> tuple[dict, dict, dict]:
    """``read(resolve(path))``; when ``path`` is a run directory whose newest checkpoint is
    damaged, the error names the newest intact older one to pass to ``--resume`` instead."""
    step_dir = resolve(path)
    try:
        return read(step_dir, model)
    except ModelMismatch:
        raise
    except CheckpointError as exc:
        if step_dir == path:  # the user named this very step: nothing to suggest
            raise
        m = STEP_DIR.match(os.path.basename(step_dir))
        older = newest_intact(path, int(m.group(1))) if m else None
        hint = (f"; the newest intact checkpoint is older: --resume {older}" if older else
                "; no older checkpoint in this directory is intact")
        raise CheckpointError(f"{exc}{hint}") from None


def load_weights(path: str, flag: str = "--init-from") -> tuple[dict, dict, str]:
    """(params, meta, step directory) of the checkpoint at ``path`` (a run directory: its
    newest), verified against its schema and checksums; the optimizer state is not read.

    Fine-tuning starts a new run from these weights, so unlike ``read`` the model need not be
    this run's: the caller compares tensor by tensor and names what differs.
    """
    step_dir = resolve(path, flag)
    where = f"{flag} {step_dir}"
    meta = verify(step_dir, where)
    try:
        with numpy.load(os.path.join(step_dir, "model.npz")) as data:
            params = {k: data[k] for k in data.files}
    except Exception as exc:  # a file that matches its checksum but still fails to parse
        raise CheckpointError(f"{where}: cannot read model.npz ({exc})") from None
    return params, meta, step_dir
