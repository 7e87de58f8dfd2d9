"""The training loop behind ``python -m minipar.train``: banner, steps, evaluation, summary.

Kept apart from the argument parsing so that tests, lessons and notebooks can drive a run with a
thread world (``run_threads``) as easily as the CLI drives one under ``mpirun``. ``run`` reads top
to bottom: build the engine (``_start``), print the banner (``banner``), train
(``_train_steps``, evaluating with ``_evaluate``), then report (``_finish``).

Rank 0 writes everything to one stream (``Console``): the banner, the progress bar, evaluation
lines and the summary, so that under ``mpirun`` (which forwards stdout and stderr separately)
they can never tangle, and nothing is printed after the summary.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy

from minipar import backend
from minipar.nn.optim import lr_at
from minipar.sim.costmodel import param_count


def _fmt_bytes(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"


def describe_model(cfg) -> str:
    """The banner's words for a model: shape, and for the encoder-decoder its own choices."""
    if cfg.arch != "encdec":
        init = "" if cfg.weight_init == "gpt2" else f", {cfg.weight_init} init"
        return (f"{cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads, "
                f"seq {cfg.seq_len}, vocab {cfg.vocab_size}{init}")
    bias = ", encoder position bias" if cfg.pos_bias else ""
    return (f"encoder-decoder, {cfg.n_layers} + {cfg.n_layers} layers ({cfg.norm}-LN), d_model "
            f"{cfg.d_model}, {cfg.n_heads} heads, source {cfg.src_len} / target {cfg.seq_len} "
            f"tokens, vocab {cfg.vocab_size}, {cfg.weight_init} init{bias}")


def _n_params(cfg, engine) -> int:
    """The model's parameters: the cost model's count, the GPT's or the encoder-decoder's
    (``minipar.sim.encdec_cost``; a pipeline rank's ``engine.params`` are only its stage's)."""
    return param_count(cfg)


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


class Console:
    """Rank 0's one output stream: lines and the progress all go to ``out``; other ranks print
    nothing.

    On a terminal the progress is a tqdm bar, and lines go through ``tqdm.write`` (which clears
    the bar, prints the line and redraws it). Anywhere else (a log file, a pipe, and every rank
    under ``mpirun``, whose output the launcher forwards through a pipe) carriage returns would
    pile up, so the progress is a plain line at most every ``every_s`` seconds instead.
    """

    def __init__(self, rank0: bool, out=None, every_s: float = 10.0):
        self.rank0, self.out, self.every_s = rank0, out or sys.stdout, every_s
        self.bar = None
        self.total = self.step = 0
        self.last_line = 0.0

    def say(self, msg: str) -> None:
        if not self.rank0:
            return
        if self.bar is not None:
            self.bar.write(msg, file=self.out)
        else:
            print(msg, file=self.out, flush=True)

    def start_bar(self, total: int, initial: int) -> None:
        if not self.rank0:
            return
        self.total, self.step, self.last_line = total, initial, time.monotonic()
        if hasattr(self.out, "isatty") and self.out.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", file=self.out,
                            dynamic_ncols=True, mininterval=0.5)

    def progress(self, loss: float, tokens_per_s: float) -> None:
        if not self.rank0:
            return
        self.step += 1
        if self.bar is not None:
            self.bar.update(1)
            # refresh=False: tqdm's mininterval paces the redraws
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
        elif self.total and time.monotonic() - self.last_line >= self.every_s \
                and self.step < self.total:
            self.last_line = time.monotonic()
            self.say(f"step {self.step}/{self.total}: loss {loss:.4f}, "
                     f"{tokens_per_s:,.0f} tokens/s")

    def close_bar(self) -> None:
        """End the bar's line once; later lines start on a fresh one."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.total = 0


@dataclass
class Record:
    """What the steps produce for the summary."""

    losses: list = field(default_factory=list)
    evals: list = field(default_factory=list)
    comm: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    tokens: int = 0
    train_s: float = 0.0
    decoded: float | None = None  # --show: exact match of cached greedy decoding (encdec)


def save_checkpoint(engine, args, cfg, par, task, step: int, run_id: str,
                    first: bool = False) -> str | None:
    """Gather the full state (collective) and let rank 0 write it atomically."""
    from dataclasses import asdict

    from minipar import checkpoint

    params = engine.full_params()
    optim = engine.full_optimizer_state()
    if engine.mesh.world.rank != 0:
        return None
    meta = {"model": asdict(cfg), "layout": asdict(par), "seed": args.seed, "task": task.name,
            "data_position": step, "optimizer": args.optimizer, "run_id": run_id,
            "optimizer_steps": engine.optimizer_steps(), "dtype": args.dtype,
            "freeze": list(engine.freeze)}
    if engine.scaler.enabled:  # fp16: the dynamic loss scale is state, like Adam's moments
        sc = engine.scaler
        meta["loss_scale"] = {"scale": sc.scale, "clean_steps": sc.clean_steps,
                              "skipped": sc.skipped}
    return checkpoint.write(args.save, step, params, optim, meta, keep=args.keep,
                            replace_other_runs=first and getattr(args, "overwrite", False))


def _tag_step(tracer, first: int, step: int) -> None:
    """Mark the events a training step recorded with its number (the timeline plots one)."""
    for e in tracer.events[first:]:
        e["args"]["step"] = step


def _write_trace(tracer, world, args, par, losses, console: Console) -> None:
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
        console.say(f"trace   | {len(events)} events of {world.size} rank(s) -> {args.trace}")
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
        console.say(f"plots   | {', '.join(paths)}")


def continuation(engine, task, n_new: int = 48) -> tuple[str, str]:
    """(prompt, greedy continuation) of the first held-out window's first half (collective).

    Every rank runs the same forward passes (pipeline stages pass activations, ZeRO-3 gathers
    over dp); the head's rank shares each next token through one allreduce. A row is always
    T tokens long (the pipeline's buffers have that shape); positions after the last real token
    are zeros, which a causal model never looks at.
    """
    mesh, T = engine.mesh, engine.model_cfg.seq_len
    inputs, _ = next(task.eval_batches(1))  # (1, T)
    tokens = [int(t) for t in inputs[0, : max(1, T // 2)]]
    n_prompt = len(tokens)
    owner = mesh.tp_rank == 0 and mesh.dp_rank == 0 and mesh.cp_rank == 0
    with mesh.world.stats.paused():
        for _ in range(n_new):
            window = tokens[-T:]
            x = numpy.zeros((1, T), dtype=numpy.int64)  # (1, T)
            x[0, : len(window)] = window
            out = engine.forward_only(x)
            nxt = numpy.zeros(1)
            if out is not None and owner:
                nxt[0] = int(backend.to_host(out[0])[0, len(window) - 1])
            tokens.append(int(backend.to_host(
                mesh.world.allreduce(backend.from_host(nxt)))[0]))
    return task.render(numpy.array(tokens[:n_prompt])), task.render(numpy.array(
        tokens[n_prompt:]))


def _evaluate(engine, task, args, step: int, console: Console) -> dict:
    """Held-out metrics at ``step`` (collective); for text, a sample of what the model writes."""
    metrics = engine.evaluate(task.eval_batches(args.batch_size))
    if task.metric == "exact_match":
        console.say(f"eval step {step}: exact match {metrics['exact_match']:.3f}")
    else:
        console.say(f"eval step {step}: perplexity {metrics['perplexity']:.3f}")
        prompt, more = continuation(engine, task)
        console.say(f"sample  | {prompt!r} -> {more!r}")
    return {"step": step, **metrics}


def _start(args, cfg, par, world, resume, tracer, init=None, freeze=()):
    """The mesh and the engine, at the checkpoint's step when resuming, or at step 0 with a
    checkpoint's weights when fine-tuning (``init``, see ``minipar.train.finetune``)."""
    from minipar.dist.mesh import Mesh
    from minipar.engine import Engine

    mesh = Mesh(world, dp=par.dp, pp=par.pp, tp=par.tp, cp=par.cp)
    engine = Engine(cfg, par, mesh, seed=args.seed, dtype=args.dtype, optimizer=args.optimizer,
                    lr=args.lr, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                    tracer=tracer, precision=getattr(args, "precision", None),
                    loss_scale=getattr(args, "loss_scale", 2.0 ** 16),
                    loss_scale_window=getattr(args, "loss_scale_window", 200), freeze=freeze)
    if init is not None:
        engine.init_weights(init[0])
    start = 0
    if resume is not None:
        params, optim, meta = resume
        steps = meta["optimizer_steps"]
        if optim is None:  # another optimizer (--force): its state starts from zero
            optim = {k: numpy.zeros_like(v) for k, v in engine.full_optimizer_state().items()}
            steps = 0
        engine.load_full_state(params, optim, steps)
        saved_scale = meta.get("loss_scale")
        if engine.scaler.enabled and saved_scale and optim is not None:
            engine.scaler.scale = float(saved_scale["scale"])
            engine.scaler.clean_steps = int(saved_scale["clean_steps"])
            engine.scaler.skipped = int(saved_scale["skipped"])
        start = int(meta["step"])
        engine.step_count = start
    return mesh, engine, start


def banner(console: Console, args, cfg, par, task, world, mesh, note, blas_threads, memory,
           engine, start: int, resume, warnings) -> None:
    """Rank 0's description of the run before its first step."""
    say = console.say
    say(f"minipar | {mesh.describe().rsplit(' rank', 1)[0]} on {world.size} rank(s)"
        f"{' (' + note + ')' if note and world.size > 1 else ''} | "
        f"{blas_threads or '?'} BLAS thread(s) per rank")
    say(f"backend | {backend.describe()}" + (f"; {_comm_mode(world)}" if world.size > 1 else ""))
    say(f"model   | {describe_model(cfg)}: {_n_params(cfg, engine):,} parameters ({args.dtype})")
    say(f"numbers | precision {engine.policy.name}: weights/activations {engine.policy.dtype}, "
        f"master and optimizer state {engine.policy.master_dtype}; {engine.scaler.describe()}")
    mem = engine.memory()
    estimate = f"; estimated peak {_fmt_bytes(memory['total'])}" if memory else ""
    say(f"memory  | rank 0 holds params {_fmt_bytes(mem['params'])}, grads "
        f"{_fmt_bytes(mem['grads'])}, optimizer {_fmt_bytes(mem['optimizer'])}{estimate}")
    if par.tp > 1:
        say(f"tensor  | tp {par.tp}, sequence parallel {'on' if par.sequence_parallel else 'off'}")
    if par.cp > 1:
        say(context_line(cfg, par, args))
    schedule = (f", schedule {par.schedule} x {par.microbatches} microbatches"
                if par.pp > 1 else "")
    say(f"task    | {task.name}, batch {args.batch_size}, {args.steps} steps, "
        f"lr {args.lr}{schedule}")
    if par.pp * par.virtual_stages > 1 and cfg.arch == "encdec":
        from minipar.models.encdec_pipeline import describe_stages

        say(describe_stages(cfg, par.pp, par.virtual_stages, par.partition))
    elif par.pp > 1:
        from minipar.sim.partition import partition

        for line in partition(cfg, par.pp, par.virtual_stages, par.partition).lines():
            say(line)
    if resume is not None:
        lay = resume[2]["layout"]
        say(f"resume  | from step {start} (saved with layout dp={lay['dp']}, tp={lay['tp']}, "
            f"pp={lay['pp']})")
    for line in warnings:
        say(line)


def context_line(cfg, par, args) -> str:
    """The banner's context-parallel line: tokens per rank and the bytes one rank's blocks keep
    for backward (``costmodel.block_activation_terms`` x layers x live microbatches, the
    formula the tests check against the measured caches), beside the same for cp 1 with the
    blockwise kernel, which keeps what the ring keeps, so the ratio is cp's alone."""
    from minipar.config import replace
    from minipar.sim import costmodel as cm

    e = 8 if args.dtype == "float64" else 4
    rows = args.batch_size // par.dp // par.microbatches
    layers = cfg.n_layers // (par.pp * par.virtual_stages)
    live = cm.peak_live(par.schedule, par.pp, par.microbatches, par.virtual_stages, 0)

    def blocks(p) -> int:
        return live * layers * cm.activation_bytes_per_layer(
            cfg, rows, p.tp, p.sequence_parallel, p.recompute, value_bytes=e, dropout=False,
            layernorm_rstd=True, attention=p.attention, cp=p.cp)

    here, alone = blocks(par), blocks(replace(par, cp=1, attention="blockwise"))
    return (f"context | cp {par.cp} ({par.cp_split}), ring attention: {cfg.seq_len // par.cp} "
            f"of {cfg.seq_len} tokens per rank; blocks keep {_fmt_bytes(here)} of activations "
            f"per rank (cp 1, blockwise: {_fmt_bytes(alone)}, {alone / max(here, 1):.2f}x)")


def _straggler_delay(args, world):
    """The sleep after each of this rank's steps that ``--straggler``/``--jitter`` ask for."""
    from minipar.parallel.stragglers import delay_from_flags

    return delay_from_flags(getattr(args, "straggler", None), getattr(args, "jitter", 0.0),
                            world.rank, world.size, args.seed)


def _train_steps(args, cfg, task, engine, mesh, start, console, tracer, save) -> Record:
    """Steps ``start`` .. ``args.steps``, with checkpoints and evaluations (collective)."""
    rec = Record()
    delay = _straggler_delay(args, mesh.world)
    for step in range(start, args.steps):
        inputs, targets, normalizer = batch_for_rank(task, step, args.batch_size, mesh)
        lr = lr_at(step, args.lr, args.warmup, args.steps)
        mesh.reset_stats()
        n_events = len(tracer.events) if tracer is not None else 0
        t0 = time.perf_counter()
        result = engine.train_step(inputs, targets, normalizer, lr,
                                   skip_nonfinite=args.skip_nonfinite)
        if delay is not None:  # a straggler (--straggler/--jitter): everyone waits at the next sync
            time.sleep(delay(time.perf_counter() - t0))
        rec.train_s += time.perf_counter() - t0
        if tracer is not None:
            _tag_step(tracer, n_events, step + 1)
        if result.skipped:
            rec.skipped.append(step + 1)
            console.say(f"step {step + 1}: non-finite loss or gradients, step skipped"
                        + (f" (loss scale now {engine.scaler.scale:g})"
                           if engine.scaler.enabled else ""))
        merge_stats(rec.comm, mesh.stats())
        rec.losses.append(result.loss)
        rec.tokens += args.batch_size * cfg.seq_len
        console.progress(result.loss, rec.tokens / rec.train_s)
        last = step == args.steps - 1
        if args.save and ((args.save_every and (step + 1) % args.save_every == 0) or last):
            save(step + 1)
        if (step + 1) % args.eval_every == 0 or last:
            rec.evals.append(_evaluate(engine, task, args, step + 1, console))
    return rec


def _finish(args, cfg, par, task, world, engine, start, rec: Record, wall: float,
            console: Console) -> dict:
    """Rank 0's summary dict and its last lines."""
    final = rec.evals[-1]
    summary = {
        "layout": {"dp": par.dp, "tp": par.tp, "pp": par.pp, "world": world.size,
                   "zero": par.zero, "sequence_parallel": par.sequence_parallel,
                   "schedule": par.schedule, "microbatches": par.microbatches,
                   "virtual_stages": par.virtual_stages, "partition": list(par.partition),
                   "attention": par.attention, "recompute": par.recompute, "cp": par.cp,
                   "cp_split": par.cp_split},
        "model": {"layers": cfg.n_layers, "d_model": cfg.d_model, "heads": cfg.n_heads,
                  "seq_len": cfg.seq_len, "vocab": cfg.vocab_size},
        "task": task.name, "steps": args.steps, "start_step": start,
        "skipped_steps": rec.skipped, "batch_size": args.batch_size,
        "dtype": args.dtype, "params": _n_params(cfg, engine), "losses": rec.losses,
        "precision": engine.policy.name, "loss_scale": engine.scaler.scale,
        "overflow_skips": engine.scaler.skipped,
        "final_loss": rec.losses[-1], "evals": rec.evals,
        "tokens_per_s": rec.tokens / rec.train_s if rec.train_s else 0.0, "wall_s": wall,
        "comm": rec.comm, "memory": engine.memory(),
        "forward_flops": dict(zip(("all", "recomputed"), engine.forward_flops)),
    }
    if rec.decoded is not None:
        summary["decoded_exact_match"] = rec.decoded
    if task.metric == "exact_match":
        summary["eval_accuracy"] = final["exact_match"]
        acc = f"held-out exact match {final['exact_match']:.3f}"
    else:
        summary["eval_perplexity"] = final["perplexity"]
        acc = f"held-out perplexity {final['perplexity']:.3f}"
    console.say(f"done    | {args.steps - start} steps in {wall:.1f} s, "
                f"{summary['tokens_per_s']:,.0f} tokens/s, final loss {rec.losses[-1]:.4f}, "
                f"{acc}")
    if engine.scaler.enabled:
        console.say(f"scale   | loss scale {engine.scaler.scale:g} at the end; "
                    f"{engine.scaler.skipped} step(s) skipped for fp16 overflow")
    if (par.attention, par.recompute) != ("plain", "none") or par.cp > 1:
        fwd, again = engine.forward_flops
        kernel = "ring" if par.cp > 1 else par.attention
        console.say(f"memory  | {kernel} attention, recompute {par.recompute}: rank 0 "
                    f"kept at most {_fmt_bytes(engine.peak_activation_bytes)} of activations; "
                    f"forward {fwd / 1e9:.3f} GFLOP per step, {again / 1e9:.3f} of it recomputed")
    moved = sum(s["bytes"] for ops in rec.comm.values() for s in ops.values())
    if moved:
        console.say(f"comm    | {_fmt_bytes(moved)} moved by rank 0 over the run "
                    f"({', '.join(g for g in rec.comm)})")
    return summary


def run(args, cfg, par, task, world, note: str = "", blas_threads: int = 0, out=None,
        resume=None, run_id: str = "", memory: dict | None = None, warnings=(), init=None,
        freeze=()):
    """Train as ``args`` says; returns the summary dict on rank 0 (None elsewhere).

    ``resume`` is ``(params, optim, meta)`` from ``checkpoint.read`` (``optim`` None: a fresh
    optimizer state): training continues at the checkpoint's step with its weights, whatever
    layout saved it. ``init`` is ``(params, meta, step dir)`` of ``--init-from``: those
    weights, with a fresh optimizer and step 0; ``freeze`` the ``--freeze`` prefixes.
    ``run_id`` goes into every checkpoint; ``memory`` is the estimate the checks made and
    ``warnings`` lines they want printed.
    """
    if getattr(args, "mode", "sync") != "sync":  # whole replicas, asynchronous or local SGD
        from minipar.train.async_run import run_async

        console = Console(world.rank == 0, out)
        console.say(f"model   | {describe_model(cfg)}: {param_count(cfg):,} parameters "
                    f"({args.dtype}); task {task.name}, batch {args.batch_size}, "
                    f"{args.steps} steps, lr {args.lr}")
        summary = run_async(args, cfg, task, world, console.say)
        return summary if world.rank == 0 else None
    tracer = None
    if getattr(args, "trace", None) or getattr(args, "plot", None):
        from minipar.observe.trace import Tracer

        tracer = Tracer(rank=world.rank)
    mesh, engine, start = _start(args, cfg, par, world, resume, tracer, init, freeze)
    console = Console(world.rank == 0, out)
    banner(console, args, cfg, par, task, world, mesh, note, blas_threads, memory, engine,
           start, resume, warnings)
    if not args.quiet:
        console.start_bar(args.steps, start)
    saves = []

    def save(step: int) -> None:
        save_checkpoint(engine, args, cfg, par, task, step, run_id, first=not saves)
        saves.append(step)

    if tracer is not None:
        world.barrier()  # a common time origin for every rank's events
        tracer.reset_clock()
    t_start = time.perf_counter()
    try:
        rec = _train_steps(args, cfg, task, engine, mesh, start, console, tracer, save)
    finally:
        console.close_bar()  # an error line after this starts on a line of its own
    wall = time.perf_counter() - t_start
    if getattr(args, "show", 0) and cfg.arch == "encdec":  # collective: gathers the weights
        from minipar.train.show import show

        rec.decoded = show(engine, task, args.show, console.say, getattr(args, "beam", 1))
    if tracer is not None:
        _write_trace(tracer, world, args, par, rec.losses, console)
    if world.rank != 0:
        return None
    return _finish(args, cfg, par, task, world, engine, start, rec, wall, console)
