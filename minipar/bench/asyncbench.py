"""``python -m minipar.bench --async``: synchronous vs asynchronous training, measured side by side.

Under ``mpirun -n N`` (launched for you) the same GPT, task, data and optimizer train in each
mode - ``sync`` (average gradients every step), ``ps`` (a parameter server, no bound), ``ssp``
(bounded staleness ``s``) and ``local-sgd`` (average weights every ``H`` steps) - once as they
are and once with one slow rank (``--straggler RANK:FACTOR``). Every mode has the same ``N - 1``
workers, world ranks ``1 .. N-1`` (rank 0 is the server, or idle in the modes without one), so
a straggler is the same worker everywhere. Snapshots of the weights taken during each run are
evaluated after it (so evaluating costs the run nothing) and the table gives, per run: the wall
time, held-out exact match at the end, and the wall time and batches to reach ``--target``;
beside them the cost model's (``minipar.sim.stragglers``) prediction of the slow rank's effect
from the measured compute and communication times. ``--plot`` draws exact match against wall
time and against batches, one line per mode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from minipar.dist.launch import configure_threads

SSP_BOUND, LOCAL_H = 2, 4
MODE_RUNS = (("sync", {}), ("ps", {}), ("ssp", {"staleness": SSP_BOUND}),
             ("local-sgd", {"sync_every": LOCAL_H}))
PROG = "python -m minipar.bench --async"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m minipar.bench --async\n"
               "  python -m minipar.bench --async --ranks 3 --steps 40 --straggler 1:4 "
               "--plot async.png")
    p.add_argument("--async", action="store_true", dest="async_", help=argparse.SUPPRESS)
    p.add_argument("--ranks", type=int, default=3, help="MPI ranks: 1 server (or idle) + workers")
    p.add_argument("--steps", type=int, default=150, help="steps per worker")
    p.add_argument("--model", default="default", help="preset: tiny, default, small")
    p.add_argument("--batch-size", type=int, default=64, help="global batch over the workers")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--straggler", default="1:3", metavar="RANK:FACTOR",
                   help="the slow rank of the second set of runs (default 1:3)")
    p.add_argument("--target", type=float, default=0.9, help="exact match to time (0-1)")
    p.add_argument("--snapshot-every", type=int, default=5, help="steps between snapshots")
    p.add_argument("--plot", default=None, metavar="PNG", help="save the accuracy curves")
    p.add_argument("--json", default=None, metavar="FILE", help="save every run's numbers")
    p.add_argument("--timeout", type=float, default=1200, help="seconds before the job is killed")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return p


def _check(args) -> str | None:
    if args.ranks < 3:
        return "--ranks must be >= 3 (a server and at least two workers)"
    if args.steps < 1 or args.batch_size < 1 or args.snapshot_every < 1:
        return "--steps, --batch-size and --snapshot-every must be positive"
    if args.batch_size % (args.ranks - 1):
        return f"--batch-size {args.batch_size} must divide over the {args.ranks - 1} workers"
    if not 0 < args.target <= 1:
        return "--target must be in (0, 1]"
    for flag, path in (("--plot", args.plot), ("--json", args.json)):
        parent = os.path.dirname(os.path.abspath(path)) if path else None
        if path and (os.path.isdir(path) or not os.path.isdir(parent)
                     or not os.access(parent, os.W_OK)):
            return f"{flag} {path}: not a writable file path (is its folder there?)"
    from minipar.config import MODEL_PRESETS
    from minipar.parallel.stragglers import parse_straggler

    if args.model not in MODEL_PRESETS:
        return f"--model: unknown preset {args.model!r} (choose {', '.join(MODEL_PRESETS)})"
    try:
        rank, _ = parse_straggler(args.straggler, args.ranks)
    except ValueError as exc:
        return str(exc)
    if rank == 0:
        return f"--straggler {args.straggler}: rank 0 is the server; slow a worker (1 or more)"
    return None


def worker(args) -> None:
    """One rank of the benchmark job (under mpirun): every mode, without and with a straggler."""
    from minipar.config import MODEL_PRESETS
    from minipar.dist.comm import MPIComm
    from minipar.modes import Replica, evaluate_snapshots, run_mode
    from minipar.parallel.stragglers import make_delay, parse_straggler
    from minipar.tasks import make_task

    world = MPIComm.world()
    workers = world.split(0 if world.rank > 0 else 1, world.rank, "workers")
    n_workers = world.size - 1
    cfg = MODEL_PRESETS[args.model]
    rows = []
    for straggler in (None, parse_straggler(args.straggler, world.size)):
        for mode, kw in MODE_RUNS:
            task = make_task("sort", seed=0)
            replica = Replica(cfg, task, args.batch_size, n_workers, seed=0)
            delay = make_delay(world.rank, straggler)
            with_server = mode in ("ps", "ssp")
            keeper = 0 if with_server else 1
            every = args.snapshot_every * n_workers
            world.barrier()
            t0 = time.perf_counter()
            if with_server:
                res = run_mode(mode, world, replica, args.steps, args.lr, delay=delay,
                               snapshot_every=every, **kw)
            elif world.rank > 0:
                res = run_mode(mode, workers, replica, args.steps, args.lr, delay=delay,
                               snapshot_every=every, **kw)
            else:
                res = None  # idle: the synchronous modes have no server
            wall = time.perf_counter() - t0
            world.barrier()
            mine = replica if world.rank == keeper else None
            curve = evaluate_snapshots(mine, res.snapshots) if mine else None
            final = mine.evaluate(res.weights)["exact_match"] if mine else None
            times = world.allgather_obj(None if world.rank == 0 else  # workers only
                                        (res.times.busy_s, res.times.wait_s, len(res.losses),
                                         wall))
            stale = res.staleness if world.rank == 0 and with_server else None
            rows.append({"mode": mode, "straggler": straggler, "times": times,
                         "curve": world.bcast_obj(curve, keeper),
                         "final": world.bcast_obj(final, keeper),
                         "staleness": world.bcast_obj(stale, 0)})
    if world.rank == 0:
        print("MINIPAR_ASYNC_JSON " + json.dumps(rows), flush=True)


def to_target(curve: list, target: float) -> tuple:
    """(seconds, batches) of the first snapshot at or above ``target``, else (None, None)."""
    for seconds, batches, metric in curve:
        if metric >= target:
            return seconds, batches
    return None, None


def rates(row: dict) -> tuple[str, str]:
    """(measured, predicted) pace of a run: seconds per step for the synchronous modes,
    updates per second for the parameter server; the prediction is the cost model's
    (``minipar.sim.stragglers``) from each worker's measured compute and its least wait."""
    from minipar.sim import stragglers as S

    per_worker = [t for t in row["times"] if t is not None]
    compute = [busy / n for busy, _, n, _ in per_worker]  # a straggler's includes its delay
    comm = min(wait / n for _, wait, n, _ in per_worker)
    wall = max(w for *_, w in per_worker)
    steps = max(n for _, _, n, _ in per_worker)
    pushes = sum(n for _, _, n, _ in per_worker)
    if row["mode"] == "sync":
        return f"{wall / steps:.4f} s/step", f"{S.sync_step_s(compute, comm):.4f} s/step"
    if row["mode"] == "local-sgd":
        return (f"{wall / steps:.4f} s/step",
                f"{S.local_sgd_step_s(compute, comm, LOCAL_H):.4f} s/step")
    model = S.ps_updates_per_s if row["mode"] == "ps" else S.ssp_updates_per_s
    return f"{pushes / wall:.1f} updates/s", f"{model(compute, comm):.1f} updates/s"


def report(rows: list, target: float) -> str:
    head = (f"{'mode':<10} {'straggler':<10} {'wall s':>7} {'final EM':>9} "
            f"{'s to ' + format(target, '.2f'):>9} {'batches to':>10} {'waiting':>8} "
            f"{'max stale':>9}  {'measured':>16}  {'cost model':>16}")
    lines = [head, "-" * len(head)]
    for row in rows:
        strag = row["straggler"]
        secs, batches = to_target(row["curve"], target)
        per_worker = [t for t in row["times"] if t is not None]
        busy, wait = sum(t[0] for t in per_worker), sum(t[1] for t in per_worker)
        wall = max(t[3] for t in per_worker)
        measured, model = rates(row)
        stale = max(row["staleness"]) if row["staleness"] else 0
        lines.append(
            f"{row['mode']:<10} {('-' if strag is None else f'{strag[0]}:{strag[1]:g}'):<10} "
            f"{wall:>7.2f} {row['final']:>9.3f} "
            f"{('-' if secs is None else f'{secs:.2f}'):>9} "
            f"{('-' if batches is None else str(batches)):>10} "
            f"{100 * wait / max(busy + wait, 1e-9):>7.0f}% {stale:>9}  {measured:>16}  "
            f"{model:>16}")
    return "\n".join(lines)


def plot(rows: list, path: str, target: float) -> str:
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.rcParams["svg.fonttype"] = "none"
    fig = Figure(figsize=(11, 4.2))
    ax_t, ax_b = fig.subplots(1, 2, sharey=True)
    colors = {"sync": "#3b6fb6", "ps": "#d9822b", "ssp": "#5aa05a", "local-sgd": "#8064a2"}
    for row in rows:
        if not row["curve"]:
            continue
        secs, batches, metric = zip(*row["curve"])
        style = "-" if row["straggler"] is None else "--"
        label = row["mode"] + ("" if row["straggler"] is None else " (straggler)")
        ax_t.plot(secs, metric, style, color=colors[row["mode"]], label=label)
        ax_b.plot(batches, metric, style, color=colors[row["mode"]], label=label)
    data_label = "worker batches used (B / workers rows each)"
    for ax, xlabel in ((ax_t, "wall time (s)"), (ax_b, data_label)):
        ax.axhline(target, color="#999999", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    ax_t.set_ylabel("held-out exact match")
    ax_t.set_title("accuracy against wall time")
    ax_b.set_title("accuracy against data seen")
    ax_b.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def run_benchmark(argv: list[str], ranks: int, timeout: float = 1200) -> list[dict]:
    """Launch the benchmark job (``mpirun -n ranks``) with these flags; its rows, one per run."""
    from minipar.dist.mpirun import mpirun

    cmd = ["-m", "minipar.bench.asyncbench", "--worker"] + [a for a in argv if a != "--async"]
    out = mpirun(ranks, cmd, timeout=timeout, stream=False)
    line = next(ln for ln in out.splitlines() if ln.startswith("MINIPAR_ASYNC_JSON "))
    return json.loads(line.split(" ", 1)[1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.worker:
        configure_threads()
        worker(args)
        return 0
    problem = _check(args)
    if problem:
        print(f"minipar.bench: error: {problem}", file=sys.stderr)
        return 2
    from minipar.dist.mpirun import MPIRunError

    try:
        rows = run_benchmark(argv, args.ranks, args.timeout)
    except MPIRunError as exc:
        print(f"minipar.bench: error: the benchmark job failed: {str(exc)[-2000:]}",
              file=sys.stderr)
        return 1
    print(f"{args.ranks} ranks (1 server or idle + {args.ranks - 1} workers), {args.model} "
          f"model on sort, batch {args.batch_size}, {args.steps} steps per worker, AdamW lr "
          f"{args.lr:g}; ssp s={SSP_BOUND}, local-sgd H={LOCAL_H}; EM = held-out exact match")
    print(report(rows, args.target))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh)
    if args.plot:
        print(f"plot: {plot(rows, args.plot, args.target)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
