"""Checks that turn a typo into one line before training starts, instead of a lost run.

Everything here runs on every rank before the first collective and raises ``ConfigError`` with a
message that names the flag: the numbers a flag must satisfy (``check_numbers``), the output
paths the run will write at its end (``check_outputs``: a traceback after the last step loses the
whole run), and the memory one rank will need against what this machine has
(``estimate_rank_bytes``, ``check_memory``): past that, the kernel's out-of-memory killer ends the
run, and other people's processes with it.
"""

from __future__ import annotations

import math
import os

import numpy

from minipar.config import ConfigError, ModelConfig, ParallelConfig, check_output

# Numeric flags and what they must be; an absent flag (None) is not checked.
POSITIVE = ("--batch-size", "--steps", "--eval-every", "--lr", "--threads", "--n-digits",
            "--layers", "--d-model", "--heads", "--seq-len", "--vocab", "--dp", "--tp", "--pp",
            "--microbatches", "--virtual-stages")
NON_NEGATIVE = ("--warmup", "--weight-decay", "--grad-clip", "--seed", "--save-every",
                "--keep", "--bucket-mb")
SEQ_LEN_SLACK = 2  # --seq-len beyond this many times a task's need is refused without --force


def check_numbers(args) -> None:
    """Every numeric flag finite and in range: ``--tp -1`` is a typo, not a layout."""
    for flag in POSITIVE + NON_NEGATIVE:
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        if not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value}")
        if flag in NON_NEGATIVE and value < 0:
            raise ConfigError(f"{flag} must be >= 0, got {value}")
        if flag in POSITIVE and value <= 0:
            bound = "a positive integer" if isinstance(value, int) else "> 0"
            raise ConfigError(f"{flag} must be {bound}, got {value}")
    if args.sequence_parallel and (args.tp or 1) == 1:
        raise ConfigError("--sequence-parallel shards activations over the tensor-parallel "
                          "group: it needs --tp 2 or more")


def check_seq_len(args, task) -> str:
    """Refuse a ``--seq-len`` far beyond what a synthetic task needs (every extra position is
    padding: never scored, yet attention costs grow with its square) unless ``--force``;
    returns a warning line for moderate padding ('' when none)."""
    need = getattr(task, "needed_len", None)
    if args.seq_len is None or need is None or args.seq_len <= need:
        return ""
    msg = (f"--seq-len {args.seq_len}: task {task.name} needs {need}; the other "
           f"{args.seq_len - need} positions are padding, never scored")
    if args.seq_len > SEQ_LEN_SLACK * need and not args.force:
        raise ConfigError(f"{msg}, yet each step costs up to {(args.seq_len / need) ** 2:,.0f}x "
                          f"more; leave --seq-len out (or <= {SEQ_LEN_SLACK * need}), or pass "
                          "--force")
    return f"warning | {msg}"


# -------------------------------------------------------------------------------- output paths
def check_outputs(args) -> None:
    """Every path the run writes (``--save``, ``--summary``, ``--trace``, ``--plot``)."""
    for flag, kind in (("--save", "directory"), ("--plot", "directory"),
                       ("--summary", "file"), ("--trace", "file")):
        path = getattr(args, flag[2:])
        if path is not None:
            check_output(flag, path, kind, example=f"{flag[2:]}.json")


# ------------------------------------------------------------------------------------- memory
def estimate_rank_bytes(cfg: ModelConfig, par: ParallelConfig, batch_size: int, dtype: str,
                        optimizer: str) -> dict:
    """Bytes the busiest rank will hold, by kind, computed before anything is allocated.

    Model states follow ZeRO (Rajbhandari et al. 2019): weights, gradients (/dp from stage 2),
    optimizer state (AdamW two moments, SGD one buffer; /dp from stage 1). Activations are the
    exact per-block terms of ``minipar.sim.costmodel.block_activation_terms`` times the layers
    of a chunk and the microbatches a schedule keeps live, plus the head's logits and their
    gradient; ``working`` is one more block's worth, the temporaries of the block whose backward
    is running; ``data`` is the global batch of token ids each rank draws (int64 inputs and
    targets). Measured
    against the peak resident memory of one step, less the interpreter's (``default`` model,
    batch 16384: 3.23 GiB estimated, 3.38 measured; with 4 microbatches 0.81 and 0.85;
    ``small``, batch 256: 0.83 and 0.86).
    """
    from minipar.nn.precision import policy_of_dtype
    from minipar.parallel.tensor import padded_vocab
    from minipar.sim import costmodel as cm

    # Model states by the precision's policy (ZeRO's 2 + 2 + 12 in bf16/fp16); activations at 4
    # bytes unless float64, since a 16-bit run's kernels also hold fp32 temporaries.
    pol = policy_of_dtype(dtype)
    ew, eg = pol.itemsize, numpy.dtype(pol.grad_dtype(par.microbatches)).itemsize
    k = pol.state_bytes(2 if optimizer == "adamw" else 1)
    e = 8 if dtype == "float64" else 4
    rows = batch_size // par.dp // par.microbatches  # sequences per microbatch
    if cfg.arch == "encdec":
        return encdec_rank_bytes(cfg, par, rows, batch_size, (ew, eg, k, e))
    masks = cfg.dropout > 0  # 1-byte masks kept; the dropped probabilities are not (dropout.py)
    block = cm.activation_bytes_per_layer(cfg, rows, par.tp, par.sequence_parallel,
                                          par.recompute, value_bytes=e, dropout=masks,
                                          layernorm_rstd=True, attention=par.attention)
    working = cm.activation_bytes_per_layer(cfg, rows, par.tp, par.sequence_parallel,
                                            value_bytes=e, dropout=masks, layernorm_rstd=True,
                                            attention=par.attention)  # the block in backward
    if masks:  # the table keeps the dropped probabilities too; dropout.py recomputes them
        dropped = e * rows * (cfg.n_heads // par.tp) * cfg.seq_len ** 2
        block -= dropped if par.recompute == "none" else 0
        working -= dropped
    logits = 3 * rows * cfg.seq_len * padded_vocab(cfg.vocab_size, par.tp) // par.tp * e
    worst: dict = {"total": -1}
    for stage in range(par.pp):
        n = cm.local_param_count(cfg, par, stage)
        # the largest local chunk's blocks (all chunks are equal unless --partition says so)
        layers = max(sum(u.kind == "block" for u in c) for c in cm.units(cfg, par, stage))
        live = cm.peak_live(par.schedule, par.pp, par.microbatches, par.virtual_stages, stage)
        mem = {"weights": ew * n, "gradients": eg * n // (par.dp if par.zero >= 2 else 1),
               "optimizer": k * n // (par.dp if par.zero >= 1 else 1),
               "activations": live * layers * block + (logits if stage == par.pp - 1 else 0),
               "working": working, "data": 2 * 8 * batch_size * cfg.seq_len}
        mem["total"] = sum(mem.values())
        if mem["total"] > worst["total"]:
            worst = mem
    return worst


def encdec_param_count(cfg: ModelConfig, tp: int = 1) -> int:
    """Parameters one tp rank of the encoder-decoder holds (``minipar.models.encdec``): column-
    parallel matrices and biases and row-parallel matrices are split over tp, vocab-parallel
    tables hold padded_vocab / tp rows, LayerNorms, positions and row-parallel biases are whole."""
    from minipar.parallel.tensor import padded_vocab

    c, f = cfg.d_model, cfg.ffn
    ln = 2 * c
    attn = ln + (3 * c * c + 3 * c) // tp + c * c // tp + c  # fused [Q|K|V], output projection
    cross = ln + (c * c + c) // tp + (2 * c * c + 2 * c) // tp + c * c // tp + c  # Q, [K|V], out
    mlp = ln + (c * f + f) // tp + f * c // tp + c
    table = padded_vocab(cfg.vocab_size, tp) // tp * c
    pos = (cfg.src_len + cfg.seq_len) * c if cfg.pos == "learned" else 0
    tables = table * (1 if cfg.tie_weights else 3)  # source, target embeddings and the head
    norms = ln * (2 if cfg.norm == "pre" else 1)  # the encoder's final LayerNorm, the head's
    return cfg.n_layers * (2 * attn + cross + 2 * mlp) + tables + pos + norms


def encdec_rank_bytes(cfg: ModelConfig, par: ParallelConfig, rows: int, batch_size: int,
                      sizes: tuple) -> dict:
    """``estimate_rank_bytes`` of the encoder-decoder (one pipeline stage): an encoder layer
    keeps a GPT block's activations over the S source tokens, a decoder layer a block's over
    the T target tokens plus its cross-attention's (normalised input and queries over T, the
    memory's keys and values over S, the (heads/tp) T x S softmax, the merged heads)."""
    from minipar.config import replace
    from minipar.parallel.tensor import padded_vocab
    from minipar.sim import costmodel as cm

    ew, eg, k, e = sizes
    s, t, c, tp = cfg.src_len, cfg.seq_len, cfg.d_model, par.tp
    n = encdec_param_count(cfg, tp)

    def block(length: int) -> int:
        return cm.activation_bytes_per_layer(replace(cfg, seq_len=length), rows, tp,
                                             par.sequence_parallel, value_bytes=e,
                                             dropout=False, layernorm_rstd=True)

    cross = e * rows * (2 * t * c + (t + 2 * s) * c // tp + cfg.n_heads // tp * t * s)
    layers = cfg.n_layers * (block(s) + block(t) + cross)
    logits = 3 * rows * t * padded_vocab(cfg.vocab_size, tp) // tp * e
    mem = {"weights": ew * n, "gradients": eg * n // (par.dp if par.zero >= 2 else 1),
           "optimizer": k * n // (par.dp if par.zero >= 1 else 1),
           "activations": cm.peak_live(par.schedule, 1, par.microbatches, 1, 0) * layers + logits,
           "working": block(s) + block(t) + cross, "data": 8 * batch_size * (s + 2 * t)}
    mem["total"] = sum(mem.values())
    return mem


def available_memory() -> tuple[int, int] | None:
    """(available, total) bytes of this machine's memory, or None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in fh if ln.split()[1:]}
        return info["MemAvailable"], info["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        page, pages = os.sysconf("SC_PAGE_SIZE"), os.sysconf("SC_PHYS_PAGES")
        avail = os.sysconf("SC_AVPHYS_PAGES")
        return avail * page, pages * page
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: float) -> str:
    return f"{n / 2 ** 30:,.1f} GiB"


def check_memory(args, cfg: ModelConfig, par: ParallelConfig, ranks_here: int) -> dict:
    """Refuse a run whose ``ranks_here`` ranks on this machine need more memory than it has
    available, naming the flags that drive the need; ``--force`` tries anyway. Returns the
    estimate (for the banner)."""
    mem = estimate_rank_bytes(cfg, par, args.batch_size, args.dtype, args.optimizer)
    machine = available_memory()
    if machine is None or args.force or args.backend == "cupy":  # cupy: device memory counts
        return mem
    need = mem["total"] * ranks_here
    if need <= machine[0]:
        return mem
    states = mem["weights"] + mem["gradients"] + mem["optimizer"]
    cause = (f"the model (--layers {cfg.n_layers}, --d-model {cfg.d_model}: "
             f"{gib(states)} of weights, gradients and optimizer state)"
             if states > mem["total"] / 2 else
             f"--batch-size {args.batch_size} (with --seq-len {cfg.seq_len}: "
             f"{gib(mem['activations'] + mem['working'] + mem['data'])} of activations "
             "and data)")
    raise ConfigError(f"{cause} needs about {gib(mem['total'])} per rank x {ranks_here} "
                      f"rank(s) on this machine, but only {gib(machine[0])} of its "
                      f"{gib(machine[1])} is available; shrink it (or add --microbatches, "
                      "--zero, --tp, --pp), or pass --force to try anyway")
