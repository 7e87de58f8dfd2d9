"""Fine-tuning (``--init-from``, ``--freeze``): exact weights at step 0, parallel == serial, frozen
parameters bit for bit fixed, and one line for every bad input.

A checkpoint is written by the real command (``python -m minipar.train --save``, in-process on a
thread world) in one layout, then loaded into a fresh run of another layout, on other batches,
from another seed. Every case checks: the weights before the first step are exactly the saved
ones; losses, gradients and updated weights equal the serial fine-tuning run of the same batches
(rtol 1e-9, float64); frozen parameters are bit for bit the saved ones after every step, have
no gradient, and every other parameter has moved. A closed form (a fresh AdamW's first step is
lr * g / (|g| + eps); SGD's is lr * clip * g, with the clip factor from the trained parameters'
norm alone) checks the fresh optimizer and the norm independently of the serial run.
``tests/mpi/test_finetune_mpi.py`` imports the helpers to run the same properties under mpirun.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from cli_util import run
from inproc import train
from minipar import checkpoint
from minipar.compare import mismatches, random_batches, serial_reference, train_layout
from minipar.config import ConfigError, ModelConfig, ParallelConfig
from minipar.dist.comm import run_threads
from minipar.nn.module import matches_prefix
from minipar.train.cli import build_parser, prepare

# The model the command builds for --model tiny on a digit task (what PRETRAIN saves).
CFG = ModelConfig(vocab_size=11, seq_len=16, n_layers=2, d_model=32, n_heads=4)
PRETRAIN = ["--model", "tiny", "--task", "sort", "--dtype", "float64", "--steps", "2",
            "--quiet", "--eval-every", "100", "--seed", "3"]
BATCH, STEPS, RTOL = 8, 3, 1e-9

# (layout the checkpoint is saved in, ranks), (layout fine-tuning runs in), frozen prefixes.
CASES = [
    ((["--dp", "2", "--zero", "3"], 2), ParallelConfig(tp=2, sequence_parallel=True),
     ("blocks.0",)),
    ((["--tp", "2", "--pp", "2", "--microbatches", "2"], 4), ParallelConfig(dp=2, zero=2),
     ("embed", "blocks.0")),
    (([], 1), ParallelConfig(pp=2, microbatches=2), ("pos", "embed", "blocks.0")),  # a stage
    (((["--pp", "2"]), 2), ParallelConfig(dp=2, zero=3), ("blocks.1", "head")),  # all frozen
    ((["--dp", "2", "--zero", "1"], 2), ParallelConfig(dp=2, zero=1, bucket_mb=0.001),
     ("blocks.0.attn",)),
    ((["--dp", "2", "--zero", "2"], 2), ParallelConfig(dp=2, bucket_mb=0.001), ()),
    ((["--tp", "2"], 2), ParallelConfig(pp=2, schedule="zb-h1", microbatches=2),
     ("blocks.1.mlp", "ln_f")),
    (([], 1), ParallelConfig(dp=2, tp=2, zero=1), ()),
]


def saved_checkpoint(directory: str, argv: list[str], n: int) -> str:
    """Pre-train 2 steps with the command in layout ``argv`` on ``n`` thread ranks, saving to
    ``directory``; returns the step directory."""
    codes, _, err = train([*PRETRAIN, *argv, "--save", directory], n=n)
    assert codes == [0] * n, err
    return checkpoint.resolve(directory)


def fine_tune(world, par: ParallelConfig, init: dict, freeze: tuple, **kw):
    """Fine-tuning on other batches and another seed than the pre-training's."""
    batches = random_batches(CFG, STEPS, BATCH, seed=11)
    return train_layout(world, CFG, par, batches, init=init, freeze=freeze, **kw)


def serial_fine_tune(init: dict, freeze: tuple, **kw):
    return serial_reference(CFG, random_batches(CFG, STEPS, BATCH, seed=11), init=init,
                            freeze=freeze, **kw)


def frozen_names(names, freeze: tuple) -> set[str]:
    return {n for n in names if any(matches_prefix(n, f) for f in freeze)}


def check_fine_tuned(result, reference, saved: dict, freeze: tuple) -> list[str]:
    """What every case must satisfy, as human-readable failures (empty: all good)."""
    bad = []
    if sorted(result.initial) != sorted(saved):
        bad.append(f"names at step 0 differ: {sorted(set(result.initial) ^ set(saved))}")
    bad += [f"step 0: {n} is not the saved tensor" for n in saved
            if not np.array_equal(result.initial.get(n), saved[n])]
    bad += mismatches(result, reference, RTOL)
    frozen = frozen_names(saved, freeze)
    bad += [f"frozen {n} changed" for n in frozen if not np.array_equal(result.params[n],
                                                                         saved[n])]
    bad += [f"frozen {n} has a gradient" for n in frozen if n in result.grads]
    bad += [f"trained {n} did not move" for n in set(saved) - frozen
            if np.array_equal(result.params[n], saved[n])]
    return bad


@pytest.mark.parametrize("save, par, freeze", CASES)
def test_init_from_any_layout_equals_serial_fine_tuning(tmp_path, save, par, freeze):
    step_dir = saved_checkpoint(str(tmp_path / "pre"), *save)
    saved, meta, _ = checkpoint.load_weights(step_dir)
    reference = serial_fine_tune(saved, freeze)
    results = run_threads(lambda w: fine_tune(w, par, saved, freeze), par.world)
    for rank, result in enumerate(results):
        bad = check_fine_tuned(result, reference, saved, freeze)
        assert not bad, f"rank {rank}, saved as {save}, fine-tuned as {par}: {bad[:4]}"


@pytest.mark.parametrize("optimizer, par, freeze", [
    ("adamw", ParallelConfig(dp=2, zero=3), ("embed", "blocks.1.attn")),
    ("sgd", ParallelConfig(tp=2, pp=2), ("pos", "blocks.0")),
    ("sgd", ParallelConfig(dp=2, zero=2), ("blocks.1", "head")),
])
def test_first_fine_tuning_step_is_the_closed_form(tmp_path, optimizer, par, freeze):
    """The first step from a checkpoint, written out by hand: a fresh optimizer at step 1 and a
    norm over the trained parameters only (SGD: clipping active, a frozen gradient in the norm
    would change the factor). The gradient comes from an unfrozen serial run at the saved
    weights; freezing must not change the others' gradients."""
    saved, _, _ = checkpoint.load_weights(saved_checkpoint(str(tmp_path / "pre"), [], 1))
    lr, clip_to = 1e-2, (0.0 if optimizer == "adamw" else 0.05)
    one = random_batches(CFG, 1, BATCH, seed=11)
    grads = serial_reference(CFG, one, init=saved, optimizer=optimizer, lr=lr,
                             weight_decay=0.0, grad_clip=0.0).grads  # unclipped, at the saved
    results = run_threads(lambda w: train_layout(
        w, CFG, par, one, init=saved, freeze=freeze, optimizer=optimizer, lr=lr,
        weight_decay=0.0, grad_clip=clip_to), par.world)
    frozen = frozen_names(saved, freeze)
    trained = sorted(set(saved) - frozen)
    norm = np.sqrt(sum(float((grads[n] ** 2).sum()) for n in trained))
    for name in trained:
        g = grads[name]
        if optimizer == "adamw":  # m = (1 - b1) g, v = (1 - b2) g^2, both bias-corrected
            expected = saved[name] - lr * g / (np.abs(g) + 1e-8)
        else:
            assert norm > clip_to  # the case must clip
            expected = saved[name] - lr * (clip_to / (norm + 1e-6)) * g
        np.testing.assert_allclose(results[0].params[name], expected, rtol=1e-9, atol=1e-12,
                                   err_msg=name)
    for name in frozen:
        assert np.array_equal(results[0].params[name], saved[name]), name


# -- the command ------------------------------------------------------------------------------

FT = ["--model", "tiny", "--task", "reverse", "--dtype", "float64", "--steps", "4", "--quiet",
      "--eval-every", "100"]


def losses(path) -> list[float]:
    return json.loads(open(path).read())["losses"]


def test_command_fine_tunes_like_the_serial_command_and_resumes_frozen(tmp_path):
    """--init-from through the command: a ZeRO-3 run equals the serial one step for step; its
    checkpoint records --freeze, resuming it with the same --freeze continues the same losses,
    with another --freeze is refused."""
    step_dir = saved_checkpoint(str(tmp_path / "pre"), ["--tp", "2"], 2)
    common = [*FT, "--init-from", step_dir, "--freeze", "embed,blocks.0"]
    serial, parallel = tmp_path / "serial.json", tmp_path / "par.json"
    codes, out, err = train([*common, "--summary", str(serial)])
    assert codes == [0], err
    assert "init    | weights of" in out and "fresh optimizer, step 0" in out
    assert "freeze  | embed,blocks.0: 13 of 29 tensors" in out
    codes, _, err = train([*common, "--dp", "2", "--zero", "3", "--summary", str(parallel),
                           "--save", str(tmp_path / "ft"), "--save-every", "2"], n=2)
    assert codes == [0, 0], err
    np.testing.assert_allclose(losses(parallel), losses(serial), rtol=1e-9)
    # Resume the fine-tuning run at step 2 (its own checkpoint, with no optimizer state for
    # the frozen parameters): the same losses as the uninterrupted run.
    first = os.path.join(tmp_path, "ft", "step-000002")
    assert json.load(open(os.path.join(first, "meta.json")))["freeze"] == ["embed", "blocks.0"]
    resumed = tmp_path / "resumed.json"
    codes, _, err = train([*FT, "--resume", first, "--freeze", "embed,blocks.0", "--tp", "2",
                           "--summary", str(resumed)], n=2)
    assert codes == [0, 0], err
    np.testing.assert_allclose(losses(resumed), losses(serial)[2:], rtol=1e-9)
    codes, _, err = train([*FT, "--resume", first, "--freeze", "embed"])
    assert codes == [2] and "--freeze" in err and len(err.strip().splitlines()) == 1, err


def test_command_under_mpirun_equals_the_serial_command(tmp_path):
    """Real processes: saved by 2 ranks at ZeRO-2, fine-tuned by 4 ranks at dp 2 x pp 2."""
    pre = tmp_path / "pre"
    out = run(["-m", "minipar.train", *PRETRAIN, "--dp", "2", "--zero", "2", "--save", str(pre)],
              n=2)
    assert out.returncode == 0, out.stderr
    common = [*FT, "--init-from", str(pre), "--freeze", "pos,blocks.1.mlp"]
    serial, parallel = tmp_path / "serial.json", tmp_path / "par.json"
    codes, _, err = train([*common, "--summary", str(serial)])
    assert codes == [0], err
    out = run(["-m", "minipar.train", *common, "--dp", "2", "--pp", "2", "--microbatches", "2",
               "--summary", str(parallel)], n=4)
    assert out.returncode == 0, out.stderr
    np.testing.assert_allclose(losses(parallel), losses(serial), rtol=1e-9)


# -- bad input: one line, on every rank, before any collective ---------------------------------

@pytest.fixture(scope="module")
def pre(tmp_path_factory) -> str:
    """A checkpoint of the tiny model pre-trained on sort with a 13-token vocabulary."""
    return saved_checkpoint(str(tmp_path_factory.mktemp("pre")), ["--vocab", "13"], 1)


def _damaged(pre: str, tmp: str, what: str) -> str:
    """A copy of ``pre`` with model.npz truncated or meta.json missing."""
    import shutil

    copy = os.path.join(tmp, "step-000002")
    shutil.copytree(pre, copy)
    if what == "truncated":
        with open(os.path.join(copy, "model.npz"), "r+b") as fh:
            fh.truncate(100)
    else:
        os.remove(os.path.join(copy, "meta.json"))
    return copy


@pytest.mark.parametrize("argv, expected", [
    (["--init-from", "/no/such/run"], ["--init-from /no/such/run", "no such file"]),
    (["--init-from", "{damaged:truncated}"], ["--init-from", "model.npz is truncated"]),
    (["--init-from", "{damaged:meta}"], ["--init-from", "meta.json is missing"]),
    (["--init-from", "{pre}"],  # the task's 11 tokens, the checkpoint's 13
     ["--init-from", "embed.w", "(13, 32)", "(11, 32)", "--vocab 13"]),
    (["--init-from", "{pre}", "--task", "add", "--seq-len", "16", "--vocab", "16"],
     ["embed.w", "(13, 32)", "(16, 32)", "--vocab 13 to embed"]),
    (["--init-from", "{pre}", "--data", "{text}", "--seq-len", "16"],
     ["embed.w", "(13, 32)", "(256, 32)", "this task needs 256 tokens"]),
    (["--init-from", "{pre}", "--vocab", "13", "--seq-len", "20"],
     ["tensor pos", "(16, 32)", "(20, 32)", "--seq-len 16"]),
    (["--init-from", "{pre}", "--vocab", "13", "--d-model", "64"],
     ["(16, 32)", "(16, 64)", "--d-model 32"]),
    (["--init-from", "{pre}", "--vocab", "13", "--layers", "4"],
     ["blocks.2.ln1.g", "lacks", "--layers 2"]),
    (["--init-from", "{pre}", "--vocab", "13", "--heads", "2"], ["--heads 4", "--heads 2"]),
    (["--freeze", "emb"], ["--freeze emb", "pos, embed, blocks.0-1, ln_f, head"]),
    (["--freeze", "blocks.0,,head"], ["--freeze", "empty name"]),
    (["--freeze", "pos,embed,blocks,ln_f,head"], ["--freeze", "nothing would train"]),
    (["--init-from", "{pre}", "--resume", "{pre}"], ["--init-from", "--resume", "give one"]),
    (["--init-from", "{pre}", "--mode", "local-sgd"], ["--init-from", "--mode sync"]),
])
def test_bad_fine_tuning_input_is_one_line(tmp_path, pre, argv, expected):
    text = tmp_path / "book.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    argv = [pre if a == "{pre}" else str(text) if a == "{text}" else
            _damaged(pre, str(tmp_path), a[len("{damaged:"):-1])
            if a.startswith("{damaged:") else a for a in argv]
    full = ["--model", "tiny", "--steps", "2", "--quiet", *argv]
    # The check path alone, as every rank runs it: no world, so certainly no collective.
    with pytest.raises(ConfigError) as caught:
        prepare(build_parser().parse_args(full), 2, 2)
    for fragment in expected:
        assert fragment in str(caught.value), (fragment, str(caught.value))
    # The whole command on 2 thread ranks: every rank exits 2, one line, no training step.
    codes, out, err = train(full, n=2)
    assert codes == [2, 2] and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err and "done" not in out and str(caught.value) in err


def test_a_wider_checkpoint_vocabulary_fits_with_vocab(pre):
    """The documented way across a vocabulary difference: --vocab N embeds the task's tokens in
    the checkpoint's larger vocabulary."""
    codes, out, err = train(["--model", "tiny", "--steps", "2", "--quiet", "--init-from", pre,
                             "--vocab", "13", "--task", "reverse"])
    assert codes == [0], err
    assert "task sort, step 2" in out


# -- what freezing saves -----------------------------------------------------------------------

def _numel(names, shapes) -> int:
    return sum(int(np.prod(shapes[n])) for n in names)


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_frozen_parameters_have_no_gradient_state_or_traffic(zero):
    """Frozen parameters get no gradient buffer, no optimizer state and no dp traffic: the bytes
    are those of the trained elements alone (8-byte float64; ZeRO pads to a multiple of dp)."""
    from minipar.dist.mesh import Mesh
    from minipar.engine import Engine
    from minipar.train.finetune import model_shapes

    freeze = ("embed", "blocks.0")
    shapes = model_shapes(CFG)
    trained = _numel(set(shapes) - frozen_names(shapes, freeze), shapes)
    total = _numel(shapes, shapes)
    padded = -(-trained // 2) * 2
    x, y = random_batches(CFG, 1, BATCH, seed=11)[0]

    def rank(world):
        mesh = Mesh(world, dp=2, pp=1, tp=1)
        engine = Engine(CFG, ParallelConfig(dp=2, zero=zero), mesh, dtype="float64",
                        freeze=freeze)
        mesh.reset_stats()
        engine.train_step(x[mesh.dp_rank * 4:][:4], y[mesh.dp_rank * 4:][:4],
                          int((y >= 0).sum()), lr=1e-2)
        return engine, mesh.stats()["dp"]

    (engine, dp), _ = run_threads(rank, 2)
    assert all(p.grad is None for p in engine.frozen) and engine.frozen
    mem = engine.memory()
    shard = trained if zero == 0 else padded // 2
    assert mem["optimizer"] == 2 * 8 * shard  # AdamW's m and v
    assert mem["grads"] == 8 * (shard if zero == 2 else trained if zero == 0 else padded)
    assert mem["params"] == 8 * ((trained if zero == 0 else padded) + (total - trained))
    if zero == 0:
        assert dp == {"allreduce": {**dp["allreduce"], "calls": 1, "bytes": 8 * trained}}
    else:
        assert dp["reduce_scatter"]["bytes"] == 8 * padded, dp
        assert dp["allgather"]["bytes"] == 8 * padded, dp
