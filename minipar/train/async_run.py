"""``python -m minipar.train --mode ps|ssp|local-sgd``: training whole replicas asynchronously.

The synchronous default (``--mode sync``) is the engine's data-parallel step (``loop.py``). The
other modes (``minipar.modes``) give every rank the whole model and combine the ranks' work by
point-to-point messages to a parameter server (``ps``, ``ssp``) or by averaging the weights every
``--sync-every`` steps (``local-sgd``). ``check_mode`` refuses what these modes do not do, before
any collective; ``run_async`` trains, evaluates the final weights, and prints one line per rank
of busy and waiting time: what a straggler costs, measured.
"""

from __future__ import annotations

import time

from minipar.config import ConfigError

ASYNC_FLAGS_ONLY = (("staleness", "ssp"), ("sync_every", "local-sgd"), ("servers", "ps or ssp"))


def check_mode(args, world: int) -> None:
    """One line for a mode flag that is out of range or does not fit the mode or the ranks."""
    from minipar.parallel.stragglers import parse_straggler

    mode = args.mode
    if args.staleness is not None and args.staleness < 0:
        raise ConfigError(f"--staleness must be >= 0 (0 is synchronous), got {args.staleness}")
    if args.sync_every is not None and args.sync_every < 1:
        raise ConfigError(f"--sync-every must be >= 1 step, got {args.sync_every}")
    if args.servers is not None and args.servers < 1:
        raise ConfigError(f"--servers must be >= 1, got {args.servers}")
    if args.jitter < 0:
        raise ConfigError(f"--jitter must be >= 0, got {args.jitter}")
    for flag, modes in ASYNC_FLAGS_ONLY:
        if getattr(args, flag) is not None and mode not in modes.split(" or "):
            raise ConfigError(f"--{flag.replace('_', '-')} applies to --mode {modes}, "
                              f"not --mode {mode}")
    if args.straggler:
        try:
            parse_straggler(args.straggler, world)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    if mode == "sync":
        return
    if mode == "ssp" and args.staleness is None:
        raise ConfigError("--mode ssp needs --staleness S (steps a worker may run ahead; 0 is "
                          "synchronous)")
    servers = (args.servers or 1) if mode in ("ps", "ssp") else 0
    if world - servers < 1:
        raise ConfigError(f"--mode {mode} with {servers} server(s) needs more ranks than "
                          f"servers (have {world}): run under mpirun -n {servers + 1} or more")
    unsupported = [f for f, on in (
        ("--tp", (args.tp or 1) > 1), ("--pp", (args.pp or 1) > 1), ("--dp", args.dp),
        ("--zero", args.zero), ("--bucket-mb", args.bucket_mb),
        ("--microbatches", args.microbatches > 1), ("--save", args.save),
        ("--resume", args.resume), ("--trace", args.trace), ("--plot", args.plot),
        ("--partition", getattr(args, "partition", "equal") != "equal"),
        ("--attention", args.attention != "plain"), ("--recompute", args.recompute != "none"))
        if on]
    if unsupported:
        raise ConfigError(f"--mode {mode} trains whole replicas, one per rank, without "
                          f"{', '.join(unsupported)}: leave them out or use --mode sync")
    if args.batch_size % (world - servers):
        raise ConfigError(f"--batch-size {args.batch_size} must divide over the {world - servers}"
                          f" worker(s) of --mode {mode}")


def run_async(args, cfg, task, world, say) -> dict:
    """Train in ``args.mode`` (collective over ``world``); returns the summary on every rank."""
    from minipar.modes import Replica, run_mode
    from minipar.parallel.stragglers import delay_from_flags, parse_straggler

    with_server = args.mode in ("ps", "ssp")
    servers = (args.servers or 1) if with_server else 0
    workers = world.size - servers
    replica = Replica(cfg, task, args.batch_size, workers, seed=args.seed, dtype=args.dtype)
    straggler = parse_straggler(args.straggler, world.size) if args.straggler else None
    delay = delay_from_flags(args.straggler, args.jitter, world.rank, world.size, args.seed)
    say(f"mode    | {args.mode}: " + (
        f"{servers} server(s) + {workers} worker(s), staleness "
        f"{'unbounded' if args.mode == 'ps' else args.staleness}" if with_server else
        f"{workers} replica(s), weights averaged every {args.sync_every or 1} step(s)")
        + (f"; rank {straggler[0]} slowed {straggler[1]:g}x" if straggler else ""))
    t0 = time.perf_counter()
    from minipar.nn.optim import lr_at

    def schedule(step: int) -> float:  # the synchronous run's warmup and cosine decay
        return lr_at(min(step, args.steps - 1), args.lr, args.warmup, args.steps)

    result = run_mode(args.mode, world, replica, args.steps, schedule, servers=servers or 1,
                      staleness=args.staleness, sync_every=args.sync_every or 1,
                      staleness_lr=args.staleness_lr, optimizer=args.optimizer, delay=delay)
    wall = time.perf_counter() - t0
    times = world.allgather_obj((result.times.busy_s, result.times.wait_s, len(result.losses)))
    metrics = replica.evaluate(result.weights) if world.rank == 0 else None
    for rank, (busy, wait, steps) in enumerate(times):
        role = "server" if rank < servers else f"worker, {steps} steps"
        say(f"rank {rank:<3}| {role}: busy {busy:.2f} s, waiting {wait:.2f} s")
    if world.rank != 0:
        return {}
    stale = result.staleness
    say(f"done    | {args.mode} in {wall:.1f} s: held-out "
        + (f"exact match {metrics['exact_match']:.3f}" if task.metric == "exact_match" else
           f"perplexity {metrics['perplexity']:.2f}")
        + (f"; staleness mean {sum(stale) / len(stale):.2f}, max {max(stale)}" if stale else ""))
    return {"mode": args.mode, "world": world.size, "servers": servers, "steps": args.steps,
            "wall_s": wall, "eval": metrics, "ranks": [
                {"busy_s": b, "wait_s": w, "steps": n} for b, w, n in times],
            "staleness": stale, "final_loss_worker0": None if not result.losses
            else result.losses[-1]}
