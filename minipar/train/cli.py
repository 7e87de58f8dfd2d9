"""``python -m minipar.train``: train a GPT (or, with ``--arch encdec``, the encoder-decoder) on
one rank or many, in any dp x pp x tp layout.

    python -m minipar.train                          # serial, the sort task, ~10 s
    mpirun -n 4 python -m minipar.train              # 4-way data parallel, same result
    mpirun -n 8 python -m minipar.train --dp 2 --tp 2 --pp 2 --schedule 1f1b --microbatches 4

Only rank 0 prints. Every bad input (a flag out of range, a layout that does not fit the ranks,
an output path that cannot be written, a run too big for this machine's memory, a checkpoint
that is damaged or belongs to another run) is found on every rank before the first collective
and before any training step, and reported once, as one line that names the flag.
"""

from __future__ import annotations

from minipar.dist.launch import configure_threads, env_rank, local_ranks

BLAS_THREADS = configure_threads()  # before NumPy is imported anywhere

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

PROG = "python -m minipar.train"

# Each example runs as printed (tests/test_cli.py runs every one for a few steps); times are CPU
# seconds measured on a 2-core machine, one BLAS thread.
EXAMPLES = [
    ("python -m minipar.train", "sort digits, serial (the default), ~10 s"),
    ("mpirun -n 4 python -m minipar.train", "the same, 4-way data parallel"),
    ("mpirun -n 2 python -m minipar.train --dp 2 --zero 2", "ZeRO-2: gradients and optimizer "
                                                             "state sharded over 2 ranks"),
    ("mpirun -n 4 python -m minipar.train --tp 2 --dp 2 --sequence-parallel", "Megatron TP + SP"),
    ("mpirun -n 4 python -m minipar.train --pp 4 --layers 4 --schedule 1f1b --microbatches 8",
     "4 pipeline stages need 4 layers"),
    ("mpirun -n 2 python -m minipar.train --pp 2 --layers 3 --partition balanced --microbatches 4",
     "blocks split by FLOPs: the head makes the last stage heavy"),
    ("python -m minipar.train --task text --data book.txt --steps 200",
     "bytes of any UTF-8 file, ~20 s (with --model small: ~30 min)"),
    ("mpirun -n 2 python -m minipar.train --cp 2 --task text --data book.txt --seq-len 256",
     "context parallel: each sequence split over 2 ranks, ring attention"),
    ("mpirun -n 4 python -m minipar.train --arch encdec --task translate --tp 2 --show 3",
     "the encoder-decoder (Vaswani et al. 2017): words -> digits, ~10 s, exact match ~0.99"),
    ("mpirun -n 4 python -m minipar.train --arch encdec --task qa --show 3",
     "key-value question answering, 1000 steps, ~25 s, exact match ~1.0"),
]
EPILOG = "examples:\n" + "\n".join(f"  {cmd}\n      {what}" for cmd, what in EXAMPLES) + """

With no layout flags every rank does data parallelism. dp x cp x tp x pp must equal the number of
ranks. Set --threads (or OMP_NUM_THREADS) to override the BLAS threads per rank, which default
to cores / ranks on this machine. Use --force to run past the memory and --seq-len checks or to
resume a checkpoint with another --task, --seed or --optimizer."""


class _Parser(argparse.ArgumentParser):
    """Usage errors print once (rank 0) as one line, on every rank exit 2, nothing hangs."""

    printing = True

    def error(self, message):
        if self.printing:
            sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


DEFAULT_STEPS = 500  # --steps when neither the user nor the task says


def build_parser(printing: bool = True) -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=__doc__.split("\n\n")[0],
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.printing = printing
    m = p.add_argument_group("model")
    m.add_argument("--model", default="default", help="preset: tiny, default, small")
    m.add_argument("--layers", type=int, help="override the number of blocks")
    m.add_argument("--d-model", type=int, help="override the model width")
    m.add_argument("--heads", type=int, help="override the number of attention heads")
    m.add_argument("--seq-len", type=int, help="override the context length (tokens); the digit "
                   "tasks need 16 to 19 and refuse more than twice that without --force")
    m.add_argument("--vocab", type=int, help="override the vocabulary (text/benchmarks only)")
    m.add_argument("--tie-weights", action="store_true", help="share embedding and LM head")
    m.add_argument("--precision", default=None, choices=["fp32", "fp64", "bf16", "fp16"],
                   help="fp32 (default), fp64 (exact comparisons), or bf16/fp16 mixed precision: "
                   "16-bit weights, activations and gradients, fp32 master weights and "
                   "optimizer state (minipar.nn.precision)")
    m.add_argument("--loss-scale", type=float, default=2.0 ** 16,
                   help="fp16: the initial dynamic loss scale (default 65536)")
    m.add_argument("--loss-scale-window", type=int, default=200,
                   help="fp16: clean steps before the loss scale doubles (default 200)")
    # The older name of --precision (float32 = fp32, float64 = fp64), kept out of the help.
    m.add_argument("--dtype", default=None, choices=["float32", "float64"],
                   help=argparse.SUPPRESS)
    m.add_argument("--dropout", type=float, default=0.0, metavar="P",
                   help="attention, residual and embedding dropout in training (0 = off); "
                        "every layout draws the serial run's masks")
    m.add_argument("--attention", default="plain", choices=["plain", "blockwise"],
                   help="attention kernel: plain keeps the (T, T) softmax per head for backward, "
                        "blockwise (flash-attention style) only O(T); the numbers agree")
    m.add_argument("--recompute", default="none", choices=["none", "selective", "full"],
                   help="activation recomputation (Korthikanti et al. 2022): selective reruns "
                        "the attention core in backward, full reruns each block's forward")
    m.add_argument("--arch", default="gpt", help="gpt (decoder only, the default) or encdec "
                   "(the encoder-decoder of Vaswani et al. 2017: --task translate, summarize, qa)")
    m.add_argument("--norm", default="pre", help="encdec: LayerNorm before each sublayer (pre) "
                   "or after it (post, the paper's)")
    m.add_argument("--pos", default=None, help="positions: learned (default) or sinusoidal")
    m.add_argument("--weight-init", default=None, choices=["gpt2", "fan-in"],
                   help="weight scales: gpt2 (0.02, the GPT's default) or fan-in (1/sqrt(fan-in) "
                        "and unit-scale token embeddings, the encoder-decoder's default)")
    m.add_argument("--pos-bias", default=None, action=argparse.BooleanOptionalAction,
                   help="encdec: the encoder's attention also learns a bias per head and "
                        "(query, key) position; on by default for --task qa, which needs it")
    d = p.add_argument_group("data")
    d.add_argument("--task", default=None, help="sort (default), reverse, add, text; with "
                   "--arch encdec: translate (default), summarize, qa")
    d.add_argument("--data", default=None, metavar="FILE",
                   help="UTF-8 text file for --task text (implies it)")
    d.add_argument("--src", default=None, metavar="FILE", help="--arch encdec: a parallel "
                   "corpus's source sentences, one a line (with --tgt)")
    d.add_argument("--tgt", default=None, metavar="FILE", help="--arch encdec: the target "
                   "sentence of each --src line; --seq-len caps a line's tokens (default 64)")
    d.add_argument("--n-digits", type=int, default=None,
                   help="problem size of the digit tasks (sort/reverse: 8, add: 3)")
    t = p.add_argument_group("training")
    t.add_argument("--batch-size", type=int, default=64, help="global batch (sequences)")
    from minipar.seq2seq import QATask

    t.add_argument("--steps", type=int, default=None, help=f"optimizer steps in all (default "
                   f"{DEFAULT_STEPS}; --task qa {QATask.default_steps})")
    t.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    t.add_argument("--warmup", type=int, default=50, help="linear warmup steps, then cosine decay")
    t.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"],
                   help="AdamW (Loshchilov & Hutter 2019) or SGD with momentum")
    t.add_argument("--weight-decay", type=float, default=0.0, help="decoupled weight decay")
    t.add_argument("--grad-clip", type=float, default=1.0, help="max global norm (0 = off)")
    t.add_argument("--seed", type=int, default=0, help="seed of the weights and the batches")
    t.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    t.add_argument("--summary", default=None, metavar="FILE", help="write a JSON summary")
    t.add_argument("--show", type=int, default=0, metavar="N",
                   help="--arch encdec: at the end print N held-out examples, source -> "
                        "reference -> the model's output (greedy, or beam search with --beam)")
    t.add_argument("--beam", type=int, default=1, metavar="K",
                   help="--show decodes with beam search of width K (default 1: greedy)")
    t.add_argument("--threads", type=int, default=None, help="BLAS threads per rank")
    t.add_argument("--backend", default="numpy", choices=["numpy", "cupy", "strict"],
                   help="array backend: numpy, cupy (GPU), strict (CPU stand-in for a device)")
    t.add_argument("--host-staging", action="store_true",
                   help="with --backend cupy: stage device arrays through host memory even if "
                        "MPI is CUDA-aware")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--trace", default=None, metavar="FILE",
                   help="write every rank's events as Chrome-trace JSON (open in Perfetto)")
    t.add_argument("--plot", default=None, metavar="DIR",
                   help="save the measured timeline of the last step and the loss curve (PNG)")
    t.add_argument("--force", action="store_true",
                   help="run even if the memory estimate exceeds this machine's, --seq-len "
                        "is mostly padding, or --resume changes --task/--seed/--optimizer")
    c = p.add_argument_group("checkpoints and faults")
    c.add_argument("--save", default=None, metavar="DIR",
                   help="write layout-independent checkpoints to DIR/step-NNNNNN/")
    c.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="checkpoint every N steps (and always at the end when --save is set)")
    c.add_argument("--keep", type=int, default=3, metavar="K",
                   help="keep this run's newest K checkpoints (0 = all)")
    c.add_argument("--overwrite", action="store_true",
                   help="start over in a --save DIR that holds another run's checkpoints "
                        "(they are deleted at the first save)")
    c.add_argument("--resume", default=None, metavar="PATH",
                   help="a run directory (its newest checkpoint) or one step directory")
    c.add_argument("--init-from", default=None, metavar="CHECKPOINT",
                   help="fine-tune: start a new run (any task) from a checkpoint's weights "
                        "(a run directory or one step directory, saved in any layout) with a "
                        "fresh optimizer, step and schedule; the model flags must match it")
    c.add_argument("--freeze", default=None, metavar="NAMES",
                   help="comma-separated parameter-name prefixes to keep fixed, e.g. "
                        "embed,blocks.0 (no update, no optimizer state, no gradient sync)")
    c.add_argument("--skip-nonfinite", action="store_true",
                   help="skip a step whose loss or gradients are not finite, instead of stopping")
    c.add_argument("--check-collectives", action="store_true",
                   help="debug: verify every collective's op, shape and dtype agree on all "
                        "ranks; report the first mismatch instead of hanging")
    lay = p.add_argument_group("layout")
    lay.add_argument("--dp", type=int, help="data parallel size")
    lay.add_argument("--tp", type=int, help="tensor parallel size")
    lay.add_argument("--pp", type=int, help="pipeline stages")
    lay.add_argument("--cp", type=int, default=None,
                     help="context parallel size: each sequence split over cp ranks, attention "
                          "as a ring passing key/value blocks (long sequences)")
    lay.add_argument("--cp-split", default="zigzag", choices=["zigzag", "contiguous"],
                     help="how --cp cuts a sequence: zigzag (rank r holds chunks r and 2cp-1-r, "
                          "balanced under the causal mask) or contiguous (unbalanced)")
    lay.add_argument("--zero", type=int, default=0, help="ZeRO stage over dp: 0, 1, 2, 3")
    lay.add_argument("--bucket-mb", type=float, default=0.0,
                     help="overlap dp gradient sync with backward in buckets of this size")
    lay.add_argument("--sequence-parallel", action="store_true",
                     help="shard LayerNorm and residual activations over tp (needs --tp > 1)")
    lay.add_argument("--schedule", default="1f1b", help="gpipe, 1f1b, interleaved, zb-h1")
    lay.add_argument("--microbatches", "--grad-accum", type=int, default=1, dest="microbatches",
                     help="microbatches per step per dp rank (gradient accumulation)")
    lay.add_argument("--virtual-stages", type=int, default=1,
                     help="model chunks per pipeline rank (interleaved schedule)")
    lay.add_argument("--partition", default="equal", metavar="equal|balanced|N,N,...",
                     help="blocks per virtual stage: equal (default), balanced (the embedding "
                          "and head weigh on the first and last stage), or counts such as 3,1")
    mo = p.add_argument_group("synchronous or asynchronous (whole replicas, see lesson 11)")
    mo.add_argument("--mode", default="sync", choices=["sync", "ps", "ssp", "local-sgd"],
                    help="sync: the data-parallel step (default); ps: a parameter server, "
                         "workers never wait; ssp: at most --staleness steps ahead; local-sgd: "
                         "average the weights every --sync-every steps")
    mo.add_argument("--staleness", type=int, default=None, metavar="S",
                    help="ssp: steps a worker may run ahead of the slowest (0 = synchronous)")
    mo.add_argument("--sync-every", type=int, default=None, metavar="H",
                    help="local-sgd: steps between weight averages (default 1)")
    mo.add_argument("--servers", type=int, default=None, metavar="N",
                    help="ps/ssp: ranks 0..N-1 serve the parameters, in shards (default 1)")
    mo.add_argument("--staleness-lr", action="store_true",
                    help="ps/ssp: divide each update's step by 1 + its staleness")
    mo.add_argument("--straggler", default=None, metavar="RANK:FACTOR",
                    help="slow one rank's compute by FACTOR (any mode), e.g. 1:3")
    mo.add_argument("--jitter", type=float, default=0.0, metavar="J",
                    help="every rank's compute takes a random extra, mean J x itself (seeded)")
    return p


def pick_layout(args, world: int) -> tuple[int, int, int, str]:
    """(dp, tp, pp) from the flags; missing sizes are filled in so the product is the world."""
    from minipar.config import ConfigError

    given = {k: getattr(args, k) for k in ("dp", "tp", "pp") if getattr(args, k) is not None}
    for k, v in given.items():
        if v <= 0:
            raise ConfigError(f"--{k} must be a positive integer, got {v}")
    tp, pp = given.get("tp", 1), given.get("pp", 1)
    cp = getattr(args, "cp", None) or 1  # context parallel ranks (validated with the rest)
    if "dp" in given:
        dp = given["dp"]
    elif world % (tp * pp * cp) == 0:
        dp = world // (tp * pp * cp)
    else:
        with_cp = f" x --cp {cp}" if cp > 1 else ""
        raise ConfigError(f"--tp {tp} x --pp {pp}{with_cp} = {tp * pp * cp} does not divide "
                          f"the number of ranks ({world})")
    if cp > 1:
        given["cp"] = cp
    note = "" if len(given) >= 3 else (
        "no layout flags: all ranks do data parallelism" if not given else
        "unspecified sizes set to fill the world")
    return dp, tp, pp, note


def _given(value, default):
    return default if value is None else value


def resolve_precision(args) -> None:
    """One precision from --precision and its older alias --dtype: sets ``args.precision`` and
    ``args.dtype`` (the working dtype: float32, float64, bfloat16 or float16); ConfigError
    when the two flags disagree, or for bf16 on CuPy (which has no bfloat16)."""
    from minipar import backend
    from minipar.config import ConfigError
    from minipar.nn.precision import DTYPE_OF, PRECISION_OF_DTYPE

    old = PRECISION_OF_DTYPE.get(args.dtype) if args.dtype else None
    if old and args.precision and old != args.precision:
        raise ConfigError(f"--dtype {args.dtype} disagrees with --precision {args.precision}: "
                          "--dtype is the old name of --precision (float32 = fp32, float64 = "
                          "fp64); give only --precision")
    args.precision = args.precision or old or "fp32"
    args.dtype = DTYPE_OF[args.precision]
    if args.precision == "bf16" and backend.name() == "cupy":
        raise ConfigError("--precision bf16 is not supported on the cupy backend (CuPy has no "
                          "bfloat16); use --precision fp16, or --backend numpy")
    if args.precision in ("bf16", "fp16") and getattr(args, "mode", "sync") != "sync":
        raise ConfigError(f"--precision {args.precision} needs --mode sync (the asynchronous "
                          "modes keep whole fp32/fp64 replicas)")
    if args.loss_scale <= 0 or not args.loss_scale < float("inf"):
        raise ConfigError(f"--loss-scale must be a positive number, got {args.loss_scale}")
    if args.loss_scale_window < 1:
        raise ConfigError(f"--loss-scale-window must be >= 1, got {args.loss_scale_window}")


def make_configs(args, world: int):
    """Validated (ModelConfig, ParallelConfig, task) or ConfigError; no collective involved."""
    from minipar.config import MODEL_PRESETS, ConfigError, ModelConfig, ParallelConfig, replace
    from minipar.seq2seq import SEQ2SEQ_TASKS
    from minipar.tasks import make_task
    from minipar.sim.partition import resolve_partition
    from minipar.train.async_run import check_mode
    from minipar.train.checks import check_numbers

    if args.model not in MODEL_PRESETS:
        raise ConfigError(f"--model: unknown preset {args.model!r} "
                          f"(choose {', '.join(MODEL_PRESETS)})")
    resolve_precision(args)
    check_numbers(args)
    if args.save_every and not args.save:
        raise ConfigError("--save-every needs --save DIR")
    if args.overwrite and not args.save:
        raise ConfigError("--overwrite needs --save DIR")
    if args.arch == "encdec" or args.task in SEQ2SEQ_TASKS or args.src or args.tgt:
        return _encdec_configs(args, world)
    if (args.arch != "gpt" or args.norm != "pre" or args.show or args.beam != 1
            or args.pos_bias is not None):
        _check_arch(args)
    task_kw = {} if args.n_digits is None else {"n_digits": args.n_digits}
    task = make_task(args.task, args.seed, data_path=args.data, seq_len=args.seq_len, **task_kw)
    cfg: ModelConfig = MODEL_PRESETS[args.model]
    vocab = _given(args.vocab, task.vocab_size)
    if vocab < task.vocab_size:
        raise ConfigError(f"--vocab {vocab} is smaller than the task's {task.vocab_size} tokens")
    cfg = replace(cfg, vocab_size=vocab, seq_len=task.seq_len, tie_weights=args.tie_weights,
                  n_layers=_given(args.layers, cfg.n_layers),
                  d_model=_given(args.d_model, cfg.d_model),
                  n_heads=_given(args.heads, cfg.n_heads), dropout=args.dropout,
                  pos=_given(args.pos, cfg.pos),
                  weight_init=_given(args.weight_init, cfg.weight_init))
    cfg.validate()
    check_mode(args, world)
    if args.mode != "sync":  # whole replicas: the layout flags were refused by check_mode
        return cfg, ParallelConfig(), task, f"--mode {args.mode}: one whole replica per rank"
    dp, tp, pp, note = pick_layout(args, world)
    blocks = resolve_partition(args.partition, cfg, pp, args.virtual_stages)
    par = ParallelConfig(dp=dp, tp=tp, pp=pp, zero=args.zero,
                         sequence_parallel=args.sequence_parallel, schedule=args.schedule,
                         microbatches=args.microbatches, virtual_stages=args.virtual_stages,
                         bucket_mb=args.bucket_mb, partition=blocks, attention=args.attention,
                         recompute=args.recompute, cp=_given(args.cp, 1),
                         cp_split=args.cp_split)
    par.validate(cfg, world_size=world, batch_size=args.batch_size)
    return cfg, par, task, note


def _check_arch(args) -> None:
    """--arch, and the flags that only the encoder-decoder takes, for a GPT run."""
    from minipar.config import ConfigError

    if args.arch not in ("gpt", "encdec"):
        raise ConfigError(f"--arch must be gpt or encdec, got {args.arch!r}")
    if args.norm != "pre":
        raise ConfigError(f"--norm {args.norm} applies to --arch encdec (the GPT is pre-LN)")
    if args.pos_bias is not None:
        flag = "--pos-bias" if args.pos_bias else "--no-pos-bias"
        raise ConfigError(f"{flag} applies to --arch encdec (its encoder's attention)")
    if args.show or args.beam != 1:
        raise ConfigError("--show and --beam decode examples of --arch encdec")


def _encdec_configs(args, world: int):
    """make_configs for --arch encdec: the task sets the source and target lengths."""
    from minipar.config import MODEL_PRESETS, ConfigError, ParallelConfig, replace
    from minipar.seq2seq import SEQ2SEQ_TASKS, make_seq2seq_task

    if args.arch != "encdec":
        what = f"--task {args.task}" if args.task in SEQ2SEQ_TASKS else "--src/--tgt"
        raise ConfigError(f"{what} needs an encoder: add --arch encdec")
    for flag, given in (("--data", args.data), ("--n-digits", args.n_digits),
                        ("--vocab", args.vocab)):
        if given is not None:
            raise ConfigError(f"{flag} does not apply to --arch encdec (its task sets the "
                              "vocabulary and the source and target lengths)")
    if args.mode != "sync":
        raise ConfigError(f"--mode {args.mode} trains GPT replicas; --arch encdec needs "
                          "--mode sync")
    if args.show < 0:
        raise ConfigError(f"--show must be >= 0, got {args.show}")
    if args.beam < 1 or (args.beam > 1 and not args.show):
        raise ConfigError(f"--beam must be >= 1 and decodes --show's rows (add --show N), "
                          f"got --beam {args.beam}")
    task = make_seq2seq_task(args.task, args.seed, src=args.src, tgt=args.tgt,
                             max_len=args.seq_len)
    base = MODEL_PRESETS[args.model]
    cfg = replace(base, vocab_size=task.vocab_size, seq_len=task.seq_len, src_len=task.src_len,
                  arch="encdec", norm=args.norm, tie_weights=args.tie_weights,
                  pos_bias=_given(args.pos_bias, task.pos_bias),
                  weight_init=_given(args.weight_init, "fan-in"),
                  pos=_given(args.pos, base.pos), n_layers=_given(args.layers, base.n_layers),
                  d_model=_given(args.d_model, base.d_model),
                  n_heads=_given(args.heads, base.n_heads), dropout=args.dropout)
    cfg.validate()
    dp, tp, pp, note = pick_layout(args, world)
    from minipar.sim.encdec_cost import resolve_partition  # encoder then decoder layers

    blocks = resolve_partition(getattr(args, "partition", "equal"), cfg, pp,
                               args.virtual_stages)
    par = ParallelConfig(dp=dp, tp=tp, pp=pp, zero=args.zero,
                         sequence_parallel=args.sequence_parallel, schedule=args.schedule,
                         microbatches=args.microbatches, virtual_stages=args.virtual_stages,
                         bucket_mb=args.bucket_mb, attention=args.attention,
                         recompute=args.recompute, partition=blocks, cp=_given(args.cp, 1),
                         cp_split=args.cp_split)
    par.validate(cfg, world_size=world, batch_size=args.batch_size)
    return cfg, par, task, note


@dataclass
class Setup:
    """Everything the loop needs that the checks produced."""

    cfg: object
    par: object
    task: object
    note: str
    run_id: str
    memory: dict
    resume: tuple | None = None  # (params, optim or None for a fresh optimizer, meta)
    init: tuple | None = None  # --init-from: (params, meta, step dir)
    freeze: tuple = ()  # --freeze: parameter-name prefixes
    warnings: list[str] = field(default_factory=list)


def _resume(args, cfg, task) -> tuple[tuple, list[str]]:
    """The checkpoint of ``--resume``, compared with this run; warnings under ``--force``."""
    from minipar import checkpoint
    from minipar.config import ConfigError
    from minipar.train.finetune import check_resume_freeze

    params, optim, meta = checkpoint.load(args.resume, cfg)
    check_resume_freeze(args, meta)
    if meta["step"] >= args.steps:
        raise ConfigError(f"--resume: the checkpoint is at step {meta['step']}, "
                          f"not before --steps {args.steps}")
    diffs = [(flag, saved, now) for flag, saved, now in (
        ("--task", meta["task"], task.name), ("--seed", meta["seed"], args.seed),
        ("--optimizer", meta["optimizer"], args.optimizer)) if saved != now]
    said = ", ".join(f"{flag} {saved}" for flag, saved, _ in diffs)
    asked = ", ".join(f"{flag} {now}" for flag, _, now in diffs)
    if diffs and not args.force:
        raise ConfigError(f"--resume {args.resume}: the checkpoint was trained with {said}, this "
                          f"run asks for {asked}; pass --force to continue it anyway")
    warnings = [f"warning | --force: resuming a checkpoint of {said} with {asked}"] if diffs \
        else []
    if meta["optimizer"] != args.optimizer:  # its state means nothing to another optimizer
        optim = None
        warnings.append(f"warning | the {args.optimizer} state starts from zero")
    return (params, optim, meta), warnings


def prepare(args, world_size: int, ranks_here: int) -> Setup:
    """Every check, in the order a user fixes things; ConfigError on the first failure."""
    from minipar.train import checks, finetune

    cfg, par, task, note = make_configs(args, world_size)
    args.steps = _given(args.steps, getattr(task, "default_steps", None) or DEFAULT_STEPS)
    warnings = [w for w in [checks.check_seq_len(args, task)] if w]
    checks.check_outputs(args)
    memory = checks.check_memory(args, cfg, par, ranks_here)
    init, freeze, lines = finetune.prepare_init(args, cfg, task)
    warnings = lines + warnings
    resume, run_id = None, uuid.uuid4().hex
    if args.resume:
        resume, more = _resume(args, cfg, task)
        warnings += more
        run_id = resume[2]["run_id"]
    if args.save:
        _check_owner(args, resume[2]["run_id"] if resume else None)
    return Setup(cfg, par, task, note, run_id, memory, resume, warnings=warnings, init=init,
                 freeze=freeze)


def _check_owner(args, run_id: str | None) -> None:
    """A run directory belongs to one run: refuse one holding steps this run did not write
    (or damaged steps, whose writer is unknown) unless ``--overwrite``."""
    from minipar import checkpoint
    from minipar.config import ConfigError

    owners = checkpoint.step_owners(args.save)
    foreign = [s for s, rid in owners.items() if run_id is None or rid != run_id]
    if not foreign or args.overwrite:
        return
    damaged = [s for s in foreign if owners[s] is None]
    what = ("another run's checkpoints" if not damaged else "damaged checkpoints"
            if len(damaged) == len(foreign) else "another run's and damaged checkpoints")
    shown = ", ".join(str(s) for s in foreign[-4:])
    hint = (f"continue that run with --resume {args.save}, " if len(damaged) < len(foreign)
            else "")
    raise ConfigError(f"--save {args.save}: the directory holds {what} (step {shown}); "
                      f"{hint}save somewhere else, or pass --overwrite to replace them")


def _finite(x):
    """``x`` with every non-finite float replaced by None: NaN is not JSON (a skipped step's
    loss may be NaN or infinite)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def main(argv=None, world=None) -> int:
    """The command. ``world`` (a Comm) runs it in-process, e.g. one thread per rank in tests;
    by default every process of the mpirun job is a rank."""
    in_process = world is not None
    rank0 = (world.rank if in_process else env_rank()) == 0
    args = build_parser(printing=rank0).parse_args(argv)
    from minipar import backend
    from minipar.config import ConfigError

    def fail(msg: str) -> int:
        if rank0:
            print(f"minipar.train: error: {msg}", file=sys.stderr, flush=True)
        return 2

    try:
        backend.use(args.backend)
    except backend.BackendError as exc:
        return fail(str(exc))
    if not in_process:
        from minipar.dist.comm import MPIComm

        world = MPIComm.world(check=args.check_collectives,
                              staging=True if args.host_staging else None)
    error, setup = None, None
    try:
        setup = prepare(args, world.size, world.size if in_process else local_ranks())
    except (ConfigError, OSError) as exc:
        error = str(exc)
    # Ranks may see different machines (paths, memory): all agree before any training traffic.
    errors = world.allgather_obj(error) if world.size > 1 else [error]
    if any(errors):
        return fail(next(e for e in errors if e))
    return _train(args, setup, world, rank0, in_process)


def _train(args, setup: Setup, world, rank0: bool, in_process: bool) -> int:
    import numpy

    from minipar.config import ConfigError
    from minipar.train.loop import run

    if world.size > 1 and not in_process:
        from minipar.dist.comm import install_abort_handler

        install_abort_handler(world)
    # Overflow and NaN are detected explicitly after each step (and named there), so NumPy's
    # floating-point warnings would only add noise to that one clear message.
    try:
        with numpy.errstate(all="ignore"):
            summary = run(args, setup.cfg, setup.par, setup.task, world, setup.note,
                          blas_threads=BLAS_THREADS, resume=setup.resume, run_id=setup.run_id,
                          memory=setup.memory, warnings=setup.warnings, init=setup.init,
                          freeze=setup.freeze)
    except FloatingPointError as exc:  # every rank sees the same allreduced loss and norm
        if rank0:
            print(f"minipar.train: error: {exc} (use --skip-nonfinite to skip such steps)",
                  file=sys.stderr, flush=True)
        return 2
    except ConfigError as exc:  # found identically on every rank
        if rank0:
            print(f"minipar.train: error: {exc}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        if world.size > 1 and not in_process:  # the abort handler: one line, every rank ends
            raise KeyboardInterrupt("stopped by Ctrl-C") from None
        if rank0:
            print("minipar.train: stopped by Ctrl-C", file=sys.stderr, flush=True)
        return 130
    if summary is not None and args.summary and rank0:
        with open(args.summary, "w") as fh:
            json.dump(_finite(summary), fh, indent=1, allow_nan=False)
    return 0
