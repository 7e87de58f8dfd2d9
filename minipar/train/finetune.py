"""Fine-tuning from a checkpoint: ``--init-from CHECKPOINT`` and ``--freeze NAMES``.

Pre-training and fine-tuning are the same training loop; only the start differs. ``--resume``
continues a run: its weights, its optimizer state, its step and learning-rate schedule.
``--init-from`` starts a NEW run (possibly on another task) from a checkpoint's weights alone:
the optimizer state is zero, the step counter and the warmup + cosine schedule start at 0. The
checkpoint may come from any layout and ZeRO stage, because checkpoints hold full tensors by name
(``minipar.checkpoint``); every rank cuts its own shard out of them, as initialisation does.

``--freeze embed,blocks.0`` keeps every parameter under those dotted prefixes fixed
(``Param.frozen``): its gradient is dropped as the backward produces it, and the data-parallel
strategy never sees it, so it gets no gradient buffer, no gradient collective and no optimizer
state, and the gradient norm that clipping uses counts the trained parameters only. Every rank
keeps a frozen parameter whole, also under ZeRO (which shards only what is trained): the
weights are equal on every rank because nothing ever changes them. The backward still runs the
frozen weights' dW kernels (their result is dropped): skipping them would need every layer to
know about freezing, for a saving of at most a third of a frozen layer's backward.

The vocabulary: the model is built from this run's flags, as without ``--init-from``, and must
match the checkpoint tensor for tensor. A different vocabulary is refused with one line naming
the tensor and both shapes; a digit task fits a checkpoint with a larger vocabulary by passing
``--vocab`` (the extra rows are tokens the task never uses). Nothing is silently re-initialised.

Everything here runs on every rank before any collective (from ``cli.prepare``).
"""

from __future__ import annotations

import math

from minipar.config import ConfigError, ModelConfig, model_flag

# The ModelConfig fields that change tensor shapes, named in the hint of a mismatch line.
SHAPE_FIELDS = ("vocab_size", "seq_len", "n_layers", "d_model", "n_heads", "tie_weights",
                "pos_bias")


def parse_freeze(text: str | None) -> tuple[str, ...]:
    """``--freeze "embed, blocks.0"`` -> ("embed", "blocks.0"); None -> ()."""
    if text is None:
        return ()
    names = tuple(n.strip() for n in text.split(","))
    if not all(names):
        raise ConfigError(f"--freeze {text!r}: an empty name; give comma-separated parameter "
                          "prefixes, e.g. --freeze embed,blocks.0")
    return names


def model_shapes(cfg: ModelConfig, dtype: str = "float32") -> dict[str, tuple]:
    """{parameter name: full shape} of the model ``cfg`` builds, in the model's order (builds
    the serial model once on this rank: the shapes come from the one model code)."""
    from minipar.dist.threads import local_comm
    from minipar.models.gpt import build_chunks
    from minipar.nn.module import BuildContext

    chunks = build_chunks(cfg, BuildContext(0, dtype, local_comm()), 1, 1, 0)
    return {p.name: p.full_shape for c in chunks for p in c.params()}


def top_level_names(names) -> str:
    """"pos, embed, blocks.0-1, ln_f, head": the prefixes ``--freeze`` can name first."""
    seen: dict[str, list[int]] = {}
    for name in names:
        parts = name.split(".")
        if len(parts) > 2 and parts[1].isdigit():  # a numbered list of units: blocks.N
            seen.setdefault(parts[0], []).append(int(parts[1]))
        else:
            seen.setdefault(parts[0], [])
    return ", ".join(f"{k}.{min(v)}-{max(v)}" if v else k for k, v in seen.items())


def check_freeze(prefixes: tuple[str, ...], names) -> list[str]:
    """The parameter names ``prefixes`` freeze; ConfigError for a prefix that matches none, or
    when nothing would be left to train."""
    from minipar.nn.module import matches_prefix

    names = list(names)
    for prefix in prefixes:
        if not any(matches_prefix(n, prefix) for n in names):
            raise ConfigError(f"--freeze {prefix}: no parameter is named {prefix} or starts with "
                              f"{prefix}.; the top-level names are {top_level_names(names)}")
    frozen = [n for n in names if any(matches_prefix(n, f) for f in prefixes)]
    if prefixes and len(frozen) == len(names):
        raise ConfigError(f"--freeze {','.join(prefixes)} freezes every parameter: nothing "
                          "would train")
    return frozen


def _saved_with(saved: dict, cfg: ModelConfig) -> str:
    """"the checkpoint has --vocab 256, --seq-len 64; this run --vocab 11, --seq-len 16"."""
    now = {k: v for k, v in vars(cfg).items()}
    diff = [k for k in SHAPE_FIELDS if k in saved and saved[k] != now.get(k)]
    if not diff:
        return ""
    then = ", ".join(model_flag(k, saved[k]) for k in diff)
    here = ", ".join(model_flag(k, now[k]) for k in diff)
    return f" (the checkpoint's model has {then}; this run's {here})"


def check_shapes(where: str, params: dict, meta: dict, shapes: dict, cfg: ModelConfig,
                 task_vocab: int) -> None:
    """Every tensor the model needs is in the checkpoint with its shape, and nothing else is;
    else ConfigError naming the first tensor that differs and both shapes."""
    saved_cfg = meta["model"]
    hint = _saved_with(saved_cfg, cfg)
    if saved_cfg.get("vocab_size", task_vocab) < task_vocab:
        hint += (f"; this task needs {task_vocab} tokens, more than the checkpoint's "
                 f"{saved_cfg['vocab_size']}")
    elif saved_cfg.get("vocab_size") != cfg.vocab_size:
        hint += f"; pass --vocab {saved_cfg['vocab_size']} to embed this task's tokens in it"
    for name, shape in shapes.items():
        if name not in params:
            raise ConfigError(f"{where}: the model needs tensor {name} {shape}, which the "
                              f"checkpoint lacks{hint}")
        if tuple(params[name].shape) != tuple(shape):
            raise ConfigError(f"{where}: tensor {name} has shape {tuple(params[name].shape)} in "
                              f"the checkpoint, this model needs {tuple(shape)}{hint}")
    extra = [n for n in params if n not in shapes]
    if extra:
        raise ConfigError(f"{where}: the checkpoint holds tensor {extra[0]} "
                          f"{tuple(params[extra[0]].shape)}, which this model lacks{hint}")
    if saved_cfg.get("n_heads") != cfg.n_heads:  # same shapes, another model
        raise ConfigError(f"{where}: the checkpoint's model has --heads {saved_cfg.get('n_heads')}"
                          f", this run's --heads {cfg.n_heads} (same tensors, split otherwise)")


def prepare_init(args, cfg: ModelConfig, task) -> tuple[tuple | None, tuple[str, ...], list]:
    """((params, meta, step dir) of ``--init-from`` or None, the ``--freeze`` prefixes, banner
    lines); ConfigError (one line naming the flag) on the first problem."""
    from minipar import checkpoint

    freeze = parse_freeze(args.freeze)
    if not args.init_from and not freeze:
        return None, (), []
    if args.init_from and args.resume:
        raise ConfigError("--init-from starts a new run from a checkpoint's weights, --resume "
                          "continues a run (weights, optimizer, step): give one of them (resume "
                          "an interrupted fine-tuning run from its own --save directory)")
    flag = "--init-from" if args.init_from else "--freeze"
    if args.mode != "sync":
        raise ConfigError(f"{flag} applies to --mode sync, not --mode {args.mode}")
    shapes = model_shapes(cfg, args.dtype)
    frozen = check_freeze(freeze, shapes)
    lines = []
    if frozen:
        n = sum(math.prod(shapes[k]) for k in frozen)
        total = sum(math.prod(s) for s in shapes.values())
        lines.append(f"freeze  | {','.join(freeze)}: {len(frozen)} of {len(shapes)} tensors, "
                     f"{n:,} of {total:,} parameters fixed (no update, no optimizer state, no "
                     "gradient sync)")
    if not args.init_from:
        return None, freeze, lines
    params, meta, step_dir = checkpoint.load_weights(args.init_from)
    check_shapes(f"--init-from {step_dir}", params, meta, shapes, cfg, task.vocab_size)
    lay = meta["layout"]
    lines.insert(0, f"init    | weights of {step_dir} (task {meta['task']}, step {meta['step']},"
                    f" saved with dp={lay['dp']}, tp={lay['tp']}, pp={lay['pp']}, "
                    f"zero={lay.get('zero', 0)}); fresh optimizer, step 0")
    return (params, meta, step_dir), freeze, lines


def check_resume_freeze(args, meta: dict) -> None:
    """A resumed run freezes what the run it continues froze: the optimizer state of the
    checkpoint exists for exactly the parameters that were trained."""
    saved, now = tuple(meta.get("freeze", ())), parse_freeze(args.freeze)
    if saved != now:
        said = f"--freeze {','.join(saved)}" if saved else "no --freeze"
        asked = f"--freeze {','.join(now)}" if now else "no --freeze"
        raise ConfigError(f"--resume {args.resume}: the checkpoint was trained with {said}, this "
                          f"run asks for {asked}; give the same --freeze")

