"""The training loop behind ``python -m minipar.train``: banner, steps, evaluation, summary.

Kept apart from the argument parsing so that tests, lessons and notebooks can drive a run with a
thread world (``run_threads``) as easily as the CLI drives one under ``mpirun``.
"""

from __future__ import annotations

import sys
import time

from minipar import backend
from minipar.nn.optim import lr_at
from minipar.sim.costmodel import param_count


def _fmt_bytes(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"


def _comm_mode(world) -> str:
    """How device arrays reach MPI (host staging or CUDA-aware), for the banner."""
    from minipar.dist.mpi_comm import comm_mode

    return comm_mode(getattr(world, "staging", None))


def batch_for_rank(task, step: int, batch_size: int, mesh):
    """This dp rank's rows of the global batch of ``step`` and the global scored-token count."""
    inputs, targets = task.dp_rows(step, batch_size, mesh.dp_rank, mesh.dp_size)
    if task.metric == "perplexity":  # every position is scored
        normalizer = batch_size * targets.shape[1]
    else:  # synthetic rows all score the same number of answer tokens
        normalizer = task.n_scored(targets) * mesh.dp_size
    return inputs, targets, normalizer


def merge_stats(total: dict, step_stats: dict) -> None:
    """Add one step's per-group, per-op CommStats into the run's totals."""
    for group, ops in step_stats.items():
        for op, s in ops.items():
            t = total.setdefault(group, {}).setdefault(
                op, {"calls": 0, "bytes": 0, "wire_bytes": 0, "seconds": 0.0})
            for k in t:
                t[k] += s.get(k, 0)


def save_checkpoint(engine, args, cfg, par, task, step: int) -> str | None:
    """Gather the full state (collective) and let rank 0 write it atomically."""
    from dataclasses import asdict

    from minipar import checkpoint

    params = engine.full_params()
    optim = engine.full_optimizer_state()
    if engine.mesh.world.rank != 0:
        return None
    meta = {"model": asdict(cfg), "layout": asdict(par), "seed": args.seed, "task": task.name,
            "data_position": step, "optimizer": args.optimizer,
            "optimizer_steps": engine.optimizer_steps(), "dtype": args.dtype}
    return checkpoint.write(args.save, step, params, optim, meta, keep=args.keep)


def _tag_step(tracer, first: int, step: int) -> None:
    """Mark the events a training step recorded with its number (the timeline plots one)."""
    for e in tracer.events[first:]:
        e["args"]["step"] = step


def _write_trace(tracer, world, args, par, losses, out) -> None:
    """Collective: rank 0 gathers every rank's events, writes --trace and the --plot PNGs."""
    import os

    from minipar.observe import render
    from minipar.observe import trace

    with world.stats.paused():  # the trace's own traffic is not the run's
        events = trace.merge(world.allgather_obj(tracer.events))
    if world.rank != 0:
        return
    if args.trace:
        trace.to_chrome_trace(events, args.trace)
        print(f"trace   | {len(events)} events of {world.size} rank(s) -> {args.trace}",
              file=out, flush=True)
    if args.plot:
        os.makedirs(args.plot, exist_ok=True)
        last = max((e["args"].get("step", 0) for e in events), default=0)
        step = [e for e in events if e["args"].get("step") == last]
        t0 = min((e["start"] for e in step), default=0.0)
        step = [dict(e, start=e["start"] - t0, end=e["end"] - t0) for e in step]
        title = (f"measured step {last}: {par.schedule}, pp {par.pp}, {par.microbatches} "
                 f"microbatches, dp {par.dp}, tp {par.tp}")
        paths = [render.plot_timeline(step, os.path.join(args.plot, "timeline.png"), title),
                 render.plot_losses(losses, os.path.join(args.plot, "loss.png"),
                                    "training loss")]
        print(f"plots   | {', '.join(paths)}", file=out, flush=True)


def run(args, cfg, par, task, world, note: str = "", blas_threads: int = 0, out=sys.stdout,
        resume=None):
    """Train as ``args`` says; returns the summary dict on rank 0 (None elsewhere).

    ``resume`` is ``(params, optim, meta)`` from ``checkpoint.read``: training continues at the
    checkpoint's step with its weights and optimizer state, whatever layout saved it.
    """
    from minipar.dist.mesh import Mesh
    from minipar.engine import Engine

    mesh = Mesh(world, dp=par.dp, pp=par.pp, tp=par.tp)
    rank0 = world.rank == 0
    tracer = None
    if getattr(args, "trace", None) or getattr(args, "plot", None):
        from minipar.observe.trace import Tracer

        tracer = Tracer(rank=world.rank)
    engine = Engine(cfg, par, mesh, seed=args.seed, dtype=args.dtype, optimizer=args.optimizer,
                    lr=args.lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                    tracer=tracer)
    start = 0
    if resume is not None:
        params, optim, meta = resume
        engine.load_full_state(params, optim, meta["optimizer_steps"])
        start = int(meta["step"])
        engine.step_count = start
    n_params = param_count(cfg)
    mem = engine.memory()
    if rank0:
        print(f"minipar | {mesh.describe().rsplit(' rank', 1)[0]} on {world.size} rank(s)"
              f"{' (' + note + ')' if note and world.size > 1 else ''} | "
              f"{blas_threads or '?'} BLAS thread(s) per rank", file=out)
        print(f"backend | {backend.describe()}" + (
            f"; {_comm_mode(world)}" if world.size > 1 else ""),
            file=out)
        print(f"model   | {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, "
              f"seq {cfg.seq_len}, vocab {cfg.vocab_size}: {n_params:,} parameters "
              f"({args.dtype})", file=out)
        print(f"memory  | rank 0 holds params {_fmt_bytes(mem['params'])}, grads "
              f"{_fmt_bytes(mem['grads'])}, optimizer {_fmt_bytes(mem['optimizer'])}", file=out)
        schedule = (f", schedule {par.schedule} x {par.microbatches} microbatches"
                    if par.pp > 1 else "")
        print(f"task    | {task.name}, batch {args.batch_size}, {args.steps} steps, "
              f"lr {args.lr}{schedule}", file=out, flush=True)
        if par.pp > 1:
            from minipar.sim.partition import partition

            for line in partition(cfg, par.pp, par.virtual_stages).lines():
                print(line, file=out, flush=True)
        if resume is not None:
            print(f"resume  | from step {start} (saved with layout dp={resume[2]['layout']['dp']}"
                  f", tp={resume[2]['layout']['tp']}, pp={resume[2]['layout']['pp']})",
                  file=out, flush=True)

    bar = None
    if rank0 and not args.quiet:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, initial=start, unit="step", file=sys.stderr,
                   dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 5.0)

    def say(msg: str) -> None:
        """A line from rank 0 that does not tear the progress bar."""
        if rank0:
            bar.write(msg) if bar is not None else print(msg, file=out, flush=True)

    losses, evals, comm_total, skipped = [], [], {}, []
    tokens = 0
    if tracer is not None:
        world.barrier()  # a common time origin for every rank's events
        tracer.reset_clock()
    t_start = time.perf_counter()
    t_train = 0.0
    for step in range(start, args.steps):
        inputs, targets, normalizer = batch_for_rank(task, step, args.batch_size, mesh)
        lr = lr_at(step, args.lr, args.warmup, args.steps)
        mesh.reset_stats()
        n_events = len(tracer.events) if tracer is not None else 0
        t0 = time.perf_counter()
        result = engine.train_step(inputs, targets, normalizer, lr,
                                   skip_nonfinite=args.skip_nonfinite)
        t_train += time.perf_counter() - t0
        if tracer is not None:
            _tag_step(tracer, n_events, step + 1)
        if result.skipped:
            skipped.append(step + 1)
            say(f"step {step + 1}: non-finite loss or gradients, step skipped")
        merge_stats(comm_total, mesh.stats())
        losses.append(result.loss)
        tokens += args.batch_size * cfg.seq_len
        if bar is not None:
            bar.update(1)
            # refresh=False: tqdm's mininterval paces the redraws (a log gets a line per 5 s)
            bar.set_postfix(loss=f"{result.loss:.4f}", tok_s=f"{tokens / t_train:,.0f}",
                            refresh=False)
        last = step == args.steps - 1
        if args.save and ((args.save_every and (step + 1) % args.save_every == 0) or last):
            save_checkpoint(engine, args, cfg, par, task, step + 1)
        if (step + 1) % args.eval_every == 0 or last:
            metrics = engine.evaluate(task.eval_batches(args.batch_size))
            evals.append({"step": step + 1, **metrics})
            say(f"eval step {step + 1}: exact match {metrics['exact_match']:.3f}"
                if task.metric == "exact_match" else
                f"eval step {step + 1}: perplexity {metrics['perplexity']:.3f}")
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - t_start
    if tracer is not None:
        _write_trace(tracer, world, args, par, losses, out)
    if not rank0:
        return None
    final = evals[-1]
    summary = {
        "layout": {"dp": par.dp, "tp": par.tp, "pp": par.pp, "world": world.size,
                   "zero": par.zero, "sequence_parallel": par.sequence_parallel,
                   "schedule": par.schedule, "microbatches": par.microbatches,
                   "virtual_stages": par.virtual_stages},
        "model": {"layers": cfg.n_layers, "d_model": cfg.d_model, "heads": cfg.n_heads,
                  "seq_len": cfg.seq_len, "vocab": cfg.vocab_size},
        "task": task.name, "steps": args.steps, "start_step": start,
        "skipped_steps": skipped, "batch_size": args.batch_size,
        "dtype": args.dtype, "params": n_params, "losses": losses,
        "final_loss": losses[-1], "evals": evals,
        "tokens_per_s": tokens / t_train if t_train else 0.0, "wall_s": wall,
        "comm": comm_total, "memory": engine.memory(),
    }
    if task.metric == "exact_match":
        summary["eval_accuracy"] = final["exact_match"]
    else:
        summary["eval_perplexity"] = final["perplexity"]
    acc = (f"held-out exact match {final['exact_match']:.3f}" if task.metric == "exact_match"
           else f"held-out perplexity {final['perplexity']:.3f}")
    print(f"done    | {args.steps - start} steps in {wall:.1f} s, "
          f"{summary['tokens_per_s']:,.0f} tokens/s, final loss {losses[-1]:.4f}, {acc}",
          file=out, flush=True)
    moved = sum(s["bytes"] for ops in comm_total.values() for s in ops.values())
    if moved:
        print(f"comm    | {_fmt_bytes(moved)} moved by rank 0 over the run "
              f"({', '.join(g for g in comm_total)})", file=out, flush=True)
    return summary

