"""``python -m minipar.train``: train a GPT on one rank or many, in any dp x pp x tp layout.

    python -m minipar.train                          # serial, the sort task, ~1 minute
    mpirun -n 4 python -m minipar.train              # 4-way data parallel, same result
    mpirun -n 8 python -m minipar.train --dp 2 --tp 2 --pp 2 --schedule 1f1b --microbatches 4

Only rank 0 prints. Every configuration error is found on every rank before the first
collective and reported once, as one line that names the flag.
"""

from __future__ import annotations

from minipar.dist.launch import configure_threads, env_rank

BLAS_THREADS = configure_threads()  # before NumPy is imported anywhere

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

EPILOG = """examples:
  python -m minipar.train                                   sort digits, serial (the default)
  mpirun -n 4 python -m minipar.train                       the same, 4-way data parallel
  mpirun -n 4 python -m minipar.train --dp 2 --zero 2       dp 2 with ZeRO-2 ... on 2 ranks
  mpirun -n 4 python -m minipar.train --tp 2 --dp 2 --sequence-parallel
  mpirun -n 4 python -m minipar.train --pp 4 --schedule 1f1b --microbatches 8
  python -m minipar.train --task text --data book.txt --model small --steps 200

With no layout flags every rank does data parallelism. dp x tp x pp must equal the number of
ranks. Set --threads (or OMP_NUM_THREADS) to override the BLAS threads per rank, which default
to cores / ranks on this machine."""


class _Parser(argparse.ArgumentParser):
    """Usage errors print once (rank 0) as one line, on every rank exit 2, nothing hangs."""

    def error(self, message):
        if env_rank() == 0:
            sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m minipar.train", description=__doc__.split("\n\n")[0],
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", default="default", help="preset: tiny, default, small")
    m.add_argument("--layers", type=int, help="override the number of blocks")
    m.add_argument("--d-model", type=int, help="override the model width")
    m.add_argument("--heads", type=int, help="override the number of attention heads")
    m.add_argument("--seq-len", type=int, help="override the context length (tokens)")
    m.add_argument("--vocab", type=int, help="override the vocabulary (text/benchmarks only)")
    m.add_argument("--tie-weights", action="store_true", help="share embedding and LM head")
    m.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    d = p.add_argument_group("data")
    d.add_argument("--task", default=None, help="sort (default), reverse, add, text")
    d.add_argument("--data", default=None, help="UTF-8 text file for --task text")
    d.add_argument("--n-digits", type=int, default=None, help="problem size of digit tasks")
    t = p.add_argument_group("training")
    t.add_argument("--batch-size", type=int, default=64, help="global batch (sequences)")
    t.add_argument("--steps", type=int, default=500)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    t.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--grad-clip", type=float, default=1.0, help="max global norm (0 = off)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    t.add_argument("--summary", default=None, metavar="FILE", help="write a JSON summary")
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
    c = p.add_argument_group("checkpoints and faults")
    c.add_argument("--save", default=None, metavar="DIR",
                   help="write layout-independent checkpoints to DIR/step-NNNNNN/")
    c.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="checkpoint every N steps (and always at the end when --save is set)")
    c.add_argument("--keep", type=int, default=3, metavar="K", help="keep the newest K (0 = all)")
    c.add_argument("--resume", default=None, metavar="PATH",
                   help="a run directory (its newest checkpoint) or one step directory")
    c.add_argument("--skip-nonfinite", action="store_true",
                   help="skip a step whose loss or gradients are not finite, instead of stopping")
    c.add_argument("--check-collectives", action="store_true",
                   help="debug: verify every collective's op, shape and dtype agree on all "
                        "ranks; report the first mismatch instead of hanging")
    lay = p.add_argument_group("layout")
    lay.add_argument("--dp", type=int, help="data parallel size")
    lay.add_argument("--tp", type=int, help="tensor parallel size")
    lay.add_argument("--pp", type=int, help="pipeline stages")
    lay.add_argument("--zero", type=int, default=0, help="ZeRO stage over dp: 0, 1, 2, 3")
    lay.add_argument("--bucket-mb", type=float, default=0.0,
                     help="overlap dp gradient sync with backward in buckets of this size")
    lay.add_argument("--sequence-parallel", action="store_true")
    lay.add_argument("--schedule", default="1f1b", help="gpipe, 1f1b, interleaved, zb-h1")
    lay.add_argument("--microbatches", "--grad-accum", type=int, default=1, dest="microbatches",
                     help="microbatches per step per dp rank (gradient accumulation)")
    lay.add_argument("--virtual-stages", type=int, default=1,
                     help="model chunks per pipeline rank (interleaved schedule)")
    return p


def pick_layout(args, world: int) -> tuple[int, int, int, str]:
    """(dp, tp, pp) from the flags; missing sizes are filled in so the product is the world."""
    given = {k: getattr(args, k) for k in ("dp", "tp", "pp") if getattr(args, k) is not None}
    tp, pp = given.get("tp", 1), given.get("pp", 1)
    if "dp" in given:
        dp = given["dp"]
    elif tp > 0 and pp > 0 and world % (tp * pp) == 0 and world >= tp * pp:
        dp = world // (tp * pp)
    else:
        from minipar.config import ConfigError

        raise ConfigError(f"--tp {tp} x --pp {pp} = {tp * pp} does not divide the number of "
                          f"ranks ({world})")
    note = "" if len(given) == 3 else (
        "no layout flags: all ranks do data parallelism" if not given else
        "unspecified sizes set to fill the world")
    return dp, tp, pp, note


def make_configs(args, world: int):
    """Validated (ModelConfig, ParallelConfig, task) or ConfigError; no collective involved."""
    from minipar.config import MODEL_PRESETS, ConfigError, ModelConfig, ParallelConfig, replace
    from minipar.tasks import make_task

    if args.model not in MODEL_PRESETS:
        raise ConfigError(f"--model: unknown preset {args.model!r} "
                          f"(choose {', '.join(MODEL_PRESETS)})")
    for flag in ("batch_size", "steps", "eval_every"):
        if getattr(args, flag) <= 0:
            raise ConfigError(f"--{flag.replace('_', '-')} must be positive, "
                              f"got {getattr(args, flag)}")
    if args.save_every < 0 or args.keep < 0:
        raise ConfigError("--save-every and --keep must be >= 0")
    if args.save_every and not args.save:
        raise ConfigError("--save-every needs --save DIR")
    if not args.lr > 0 or args.lr == float("inf"):
        raise ConfigError(f"--lr must be a positive number, got {args.lr}")
    task_kw = {} if args.n_digits is None else {"n_digits": args.n_digits}
    task = make_task(args.task, args.seed, data_path=args.data, seq_len=args.seq_len, **task_kw)
    cfg: ModelConfig = MODEL_PRESETS[args.model]
    vocab = args.vocab or task.vocab_size
    if vocab < task.vocab_size:
        raise ConfigError(f"--vocab {vocab} is smaller than the task's {task.vocab_size} tokens")
    cfg = replace(cfg, vocab_size=vocab, seq_len=task.seq_len, tie_weights=args.tie_weights,
                  n_layers=args.layers or cfg.n_layers, d_model=args.d_model or cfg.d_model,
                  n_heads=args.heads or cfg.n_heads)
    cfg.validate()
    dp, tp, pp, note = pick_layout(args, world)
    par = ParallelConfig(dp=dp, tp=tp, pp=pp, zero=args.zero,
                         sequence_parallel=args.sequence_parallel, schedule=args.schedule,
                         microbatches=args.microbatches, virtual_stages=args.virtual_stages,
                         bucket_mb=args.bucket_mb)
    par.validate(cfg, world_size=world, batch_size=args.batch_size)
    return cfg, par, task, note


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from minipar import backend
    from minipar.config import ConfigError

    rank0 = env_rank() == 0

    def fail(msg: str) -> int:
        if rank0:
            print(f"minipar.train: error: {msg}", file=sys.stderr, flush=True)
        return 2

    try:
        backend.use(args.backend)
    except backend.BackendError as exc:
        return fail(str(exc))
    from minipar.dist.comm import MPIComm, install_abort_handler

    world = MPIComm.world(check=args.check_collectives,
                          staging=True if args.host_staging else None)
    try:
        cfg, par, task, note = make_configs(args, world.size)
        resume = None
        if args.resume:
            from minipar import checkpoint

            resume = checkpoint.read(checkpoint.resolve(args.resume), cfg)
            if resume[2]["step"] >= args.steps:
                raise ConfigError(f"--resume: the checkpoint is at step {resume[2]['step']}, "
                                  f"not before --steps {args.steps}")
    except (ConfigError, OSError) as exc:
        return fail(str(exc))
    if world.size > 1:
        install_abort_handler(world)
    from minipar.train.loop import run

    import numpy

    # Overflow and NaN are detected explicitly after each step (and named there), so NumPy's
    # floating-point warnings would only add noise to that one clear message.
    numpy.seterr(all="ignore")
    try:
        summary = run(args, cfg, par, task, world, note, blas_threads=BLAS_THREADS,
                      resume=resume)
    except FloatingPointError as exc:  # every rank sees the same allreduced loss and norm
        return fail(f"{exc} (use --skip-nonfinite to skip such steps)")
    except ConfigError as exc:  # found identically on every rank, before any collective
        return fail(str(exc))
    if summary is not None and args.summary and world.rank == 0:
        with open(args.summary, "w") as fh:
            json.dump(summary, fh, indent=1)
    return 0
