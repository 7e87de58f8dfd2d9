"""``python -m minipar.bench --validate``: the cost model against this machine, layout by layout.

It measures this machine (``minipar.bench.probe``: GEMM and elementwise rates, page faults,
per-kernel overhead, the slowdown when every core is busy, allreduce at 2 and 4 ranks; written
as a hardware JSON), then runs small layouts for real (``python -m minipar.train`` under
``mpirun``: 1, 2 and 4 ranks; DP, TP, PP; one BLAS thread per rank) and prints the measured
step time beside the cost model's prediction (``predict_step_time`` with
``Hardware.shared_by(ranks)``) for each. Target: within 25%.

Timing on a shared machine. Times are process CPU seconds (user + system) of every rank: other
users' processes stretch wall time, much less the CPU time a computation needs. MPICH ranks
busy-poll while they wait, so on an otherwise idle machine every rank is always running or
waiting for a core, and N ranks on C cores take (sum of the ranks' CPU seconds) / min(N, C) of
wall time: that is the "measured" step; the wall-clock step is printed beside it, and the two
agree on a quiet machine. A step is the difference of two runs (K and K + k steps) divided by
k, so start-up, the first step's warm-up and the final evaluation cancel; each run length is
the least of ``--repeat`` runs, the one other users disturbed least. The last column is the
memory each rank faulted in per step (``getrusage``'s page faults), beside what the cost model
charges as first touches. Both are 0 when ``minipar.dist.launch`` keeps freed memory (the
default); with ``MINIPAR_MALLOC=default`` glibc returns the memory of large microbatches to the
OS after each step but keeps that of small ones, which the model does not know.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from minipar.bench.probe import Workload, cores
from minipar.config import ConfigError

TARGET = 0.25  # |predicted / measured - 1| allowed (issue 7, section 5)
DEFAULT_HARDWARE = os.path.join("runs", "this-machine.json")


@dataclass(frozen=True)
class Layout:
    """One real run: a dp x tp x pp grid (Megatron rank order) and its microbatches."""

    name: str
    dp: int = 1
    tp: int = 1
    pp: int = 1
    microbatches: int = 1

    @property
    def ranks(self) -> int:
        return self.dp * self.tp * self.pp

    def parallel(self):
        from minipar.config import ParallelConfig
        return ParallelConfig(dp=self.dp, tp=self.tp, pp=self.pp, schedule="1f1b",
                              microbatches=self.microbatches)

    def flags(self) -> list[str]:
        return ["--dp", str(self.dp), "--tp", str(self.tp), "--pp", str(self.pp),
                "--schedule", "1f1b", "--microbatches", str(self.microbatches)]


LAYOUTS = (Layout("serial"), Layout("dp2", dp=2), Layout("dp4", dp=4), Layout("tp2", tp=2),
           Layout("pp2-1f1b", pp=2, microbatches=4), Layout("tp2-dp2", dp=2, tp=2),
           Layout("pp2-dp2-1f1b", dp=2, pp=2, microbatches=4))


# ------------------------------------------------------------------------ this machine
def _read(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def all_busy_speed(alone: dict, busy: list[dict]) -> float:
    """A process's speed while every core runs one, relative to alone (they share caches and
    memory bandwidth): the geometric mean, over every measured rate, of the ranks' mean rate
    with all cores busy over the rate alone; at most 1."""
    def rates(d):
        return {"gemm": d["gemm_flops"], "bmm": d["bmm_flops"], "stream": d["mem_bytes_per_s"],
                "op": 1 / d["op_latency_s"], **d["elem_bytes_per_s"]}
    solo = rates(alone)
    logs = [math.log(sum(rates(d)[k] for d in busy) / len(busy) / v) for k, v in solo.items()]
    return min(1.0, math.exp(sum(logs) / len(logs)))


def measure_hardware(work: Workload, path: str, rank_counts=(2, 4), rounds: int = 3,
                     log=print) -> dict:
    """Measure this machine (``minipar.bench.probe``) in fresh processes launched as training
    ranks are, one BLAS thread each: the rates in one process, then in one per core at once
    (``all_busy_speed``), allreduce under ``mpirun -n N``; write the hardware JSON to
    ``path`` and return it."""
    from minipar.dist.mpirun import mpirun
    spec = ["--workload", json.dumps(asdict(work))]
    with tempfile.TemporaryDirectory() as tmp:
        def local(n):  # the one-process probe on each of n ranks at once
            out = os.path.join(tmp, f"local{n}.json")
            mpirun(n, ["-m", "minipar.bench.probe", "--local", out, "--rounds", str(rounds),
                       *spec], stream=False, timeout=300)
            return [_read(f"{out}.{r}") for r in range(n)]
        data = local(1)[0]
        data["all_busy_speed"] = all_busy_speed(data, local(cores())) if cores() > 1 else 1.0
        touch, elem = data["first_touch_bytes_per_s"], data["elem_bytes_per_s"]
        log(f"GEMM (1 thread)        {data['gemm_flops'] / 1e9:.1f} GFLOP/s, attention's "
            f"batched {data['bmm_flops'] / 1e9:.1f} GFLOP/s")
        log("elementwise (GB/s)     " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in elem.items()))
        log(f"stream {data['mem_bytes_per_s'] / 1e9:.1f} GB/s, fresh memory "
            + (f"faulted in at {touch / 1e9:.2f} GB/s" if touch else "reused (no faults)")
            + f", {data['op_latency_s'] * 1e6:.1f} us per kernel; {data['cores']} cores, each "
            f"at {data['all_busy_speed']:.0%} of its speed alone when all are busy")
        data["ranks"] = {}
        for n in rank_counts:
            out = os.path.join(tmp, f"comm{n}.json")
            mpirun(n, ["-m", "minipar.bench.probe", "--comm-probe", out, *spec], stream=False,
                   timeout=120)
            r = data["ranks"][str(n)] = _read(out)
            log(f"allreduce, {n} ranks    {r['latency_s'] * 1e6:.0f} us per ring step, "
                f"{r['allreduce_bytes_per_s'] / 1e9:.2f} GB/s")
    first = data["ranks"].get(str(min(rank_counts)), {})
    data.update({k: first[k] for k in ("allreduce_bytes_per_s", "latency_s") if k in first})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as fh:
        json.dump(data, fh, indent=1)
    return data


# ----------------------------------------------------------------------------- real runs
def write_text(path: str, chars: int = 20000, seed: int = 0) -> str:
    """A small deterministic text file for ``--task text`` (few eval windows: eval is cheap)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = ["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(400)]
    text, size = [], 0
    while size < chars:
        text.append(words[rng.integers(len(words))])
        size += len(text[-1]) + 1
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(" ".join(text))
    return path


def _children() -> tuple[float, int]:
    """(CPU seconds, page faults) of the finished child processes (every rank)."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime, r.ru_minflt


def run_steps(layout: Layout, work: Workload, data: str, steps: int, tmp: str) -> tuple:
    """(CPU seconds of every rank and the launcher, page faults, training wall seconds) of
    one real run."""
    from minipar.dist.mpirun import mpirun
    summary = os.path.join(tmp, "summary.json")
    cpu0, faults0 = _children()
    mpirun(layout.ranks, work.train_args(data, steps, summary) + layout.flags(), stream=False,
           timeout=600)
    cpu, faults = _children()
    with open(summary) as fh:
        s = json.load(fh)
    tokens = steps * work.batch_size * work.seq_len
    return cpu - cpu0, faults - faults0, tokens / s["tokens_per_s"]


def measure_layout(layout: Layout, work: Workload, data: str, steps: int, tmp: str,
                   repeat: int = 2, warm: int = 2) -> dict:
    """Seconds per step: runs of ``warm`` and ``warm + steps`` steps, differenced, each the
    least of ``repeat`` runs (the least disturbed by other users of the machine); and the
    bytes each rank faulted in per step (pages first touched, as ``getrusage`` counts them)."""
    short = [run_steps(layout, work, data, warm, tmp) for _ in range(repeat)]
    long = [run_steps(layout, work, data, warm + steps, tmp) for _ in range(repeat)]
    cpu = min(x[0] for x in long) - min(x[0] for x in short)
    wall = min(x[2] for x in long) - min(x[2] for x in short)
    faults = (long[0][1] - short[0][1]) / steps / layout.ranks
    return {"measured_s": cpu / steps / min(layout.ranks, cores()), "wall_s": wall / steps,
            "faulted_bytes": max(0.0, faults * resource.getpagesize())}


def modelled_fresh_bytes(layout: Layout, work: Workload, hw) -> float:
    """Bytes per rank per step the cost model has faulted in on ``hw`` (mean over pipeline
    stages): a forward's extra seconds when fresh memory costs one second per byte."""
    if hw.first_touch_bw <= 0:  # freed memory is reused: nothing is faulted in
        return 0.0
    from minipar.sim.costmodel import Workload as Step
    from minipar.sim.hardware import A100_80GB, replace
    from minipar.sim.timing import chunk_costs
    par = layout.parallel()
    step = Step(global_batch=work.batch_size, dtype="fp32", dropout=False,
                microbatch_size=work.batch_size // (layout.dp * layout.microbatches))
    one, free = replace(A100_80GB, first_touch_bw=1.0), A100_80GB
    return sum(layout.microbatches * sum(a.fwd - b.fwd for a, b in zip(
        chunk_costs(work.model(), par, step, one, s), chunk_costs(work.model(), par, step,
                                                                   free, s)))
        for s in range(layout.pp)) / layout.pp


def predict(layout: Layout, work: Workload, hw) -> float:
    """The cost model's step time for this layout, each rank getting its share of the cores."""
    from minipar.sim.timing import predict_step_time
    return predict_step_time(work.model(), layout.parallel(), work.batch_size,
                             hw.shared_by(layout.ranks), "fp32")


def row(layout: Layout, measured: dict, predicted: float, fresh: float = 0.0) -> dict:
    """One line of the report; ``fresh``: bytes per rank per step the model faults in."""
    ratio = predicted / measured["measured_s"]
    return {"layout": layout.name, "ranks": layout.ranks, "dp": layout.dp, "tp": layout.tp,
            "pp": layout.pp, "microbatches": layout.microbatches, **measured,
            "predicted_s": predicted, "modelled_fresh_bytes": fresh, "ratio": ratio,
            "within_target": abs(ratio - 1) <= TARGET}


def table(rows: list[dict]) -> str:
    """The measured-vs-predicted table, one line per layout, with the memory each rank
    faulted in per step, measured (and as the model has it)."""
    lines = [f"{'layout':<16}{'ranks':>5}{'measured':>11}{'(wall)':>10}{'predicted':>11}"
             f"{'pred/meas':>11}  within {TARGET:.0%}   faulted MB/rank (model)"]
    for r in rows:
        lines.append(f"{r['layout']:<16}{r['ranks']:>5}{r['measured_s'] * 1e3:>8.0f} ms"
                     f"{r['wall_s'] * 1e3:>7.0f} ms{r['predicted_s'] * 1e3:>8.0f} ms"
                     f"{r['ratio']:>11.2f}  {'PASS' if r['within_target'] else 'MISS':<10}"
                     f"{r.get('faulted_bytes', 0) / 1e6:>6.0f} "
                     f"({r.get('modelled_fresh_bytes', 0) / 1e6:.0f})")
    passed = sum(r["within_target"] for r in rows)
    lines.append(f"{passed} of {len(rows)} predictions within {TARGET:.0%} of the measurement")
    return "\n".join(lines)


def machine_busy_seconds() -> float | None:
    """CPU seconds every process on this machine has used since boot (Linux), else None."""
    try:
        with open("/proc/stat") as fh:
            ticks = [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(ticks[:8]) - ticks[3] - ticks[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def validate(work: Workload, layouts, hw_path: str, steps: int, repeat: int = 2,
             log=print) -> dict:
    """Run every layout for real and predict it; the report as a JSON-able dict, with the
    share of the cores other processes used meanwhile (``other_load``, None if unknown)."""
    from minipar.sim.hardware import Hardware
    hw = Hardware.from_bench_json(hw_path)
    for layout in layouts:  # a layout that cannot run is a one-line error, before any run
        layout.parallel().validate(work.model(), world_size=layout.ranks,
                                   batch_size=work.batch_size)
    rows = []
    busy0, ours0, wall0 = machine_busy_seconds(), _children()[0], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        data = write_text(os.path.join(tmp, "text.txt"))
        for layout in layouts:
            t0 = time.perf_counter()
            r = row(layout, measure_layout(layout, work, data, steps, tmp, repeat),
                    predict(layout, work, hw), modelled_fresh_bytes(layout, work, hw))
            rows.append(r)
            log(f"{layout.name:<16} measured {r['measured_s'] * 1e3:.0f} ms, predicted "
                f"{r['predicted_s'] * 1e3:.0f} ms ({time.perf_counter() - t0:.0f} s)")
    busy1 = machine_busy_seconds()
    other = None if busy0 is None or busy1 is None else max(0.0, (
        busy1 - busy0 - (_children()[0] - ours0)) / ((time.perf_counter() - wall0) * cores()))
    return {"target": TARGET, "workload": asdict(work), "hardware_file": hw_path,
            "cores": cores(), "steps": steps, "repeat": repeat, "other_load": other,
            "rows": rows}


# ---------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minipar.bench --validate", description=__doc__.split("\n\n")[0],
        epilog="examples:\n  python -m minipar.bench --validate\n  python -m minipar.bench "
               "--measure-hardware --hardware-out runs/this-machine.json\n  python -m "
               "minipar.bench --validate --hardware-file runs/this-machine.json --layouts "
               "serial,dp2,pp2-1f1b --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--validate", action="store_true", help="run the validation (default)")
    p.add_argument("--measure-hardware", action="store_true",
                   help="only measure this machine and write the hardware JSON")
    p.add_argument("--hardware-out", default=DEFAULT_HARDWARE, metavar="FILE",
                   help=f"where the measured hardware JSON goes (default {DEFAULT_HARDWARE})")
    p.add_argument("--hardware-file", metavar="FILE",
                   help="use this hardware JSON instead of measuring")
    p.add_argument("--layouts", default=",".join(x.name for x in LAYOUTS),
                   help="comma-separated layout names (default: all)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per layout (default 6)")
    p.add_argument("--repeat", type=int, default=2,
                   help="runs of each length per layout; the least CPU time counts (default 2)")
    for flag, default in asdict(Workload()).items():
        p.add_argument(f"--{flag.replace('_', '-')}", type=int, default=default,
                       help=f"workload (default {default})")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    by_name = {x.name: x for x in LAYOUTS}
    names = [n.strip() for n in args.layouts.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown or not names or args.steps <= 0 or args.repeat <= 0:
        print(f"minipar.bench: error: --layouts: unknown {unknown} (choose from "
              f"{', '.join(by_name)})" if unknown or not names else
              "minipar.bench: error: --steps and --repeat must be positive", file=sys.stderr)
        return 2
    work = Workload(**{k: getattr(args, k) for k in asdict(Workload())})
    try:
        work.model().validate()
        if work.vocab < 256:  # the runs train on text, one token per byte
            raise ConfigError(f"--vocab must be at least 256 (bytes of text), got {work.vocab}")
    except ConfigError as exc:
        print(f"minipar.bench: error: {exc}", file=sys.stderr)
        return 2
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    path = args.hardware_file
    if not path:
        measure_hardware(work, args.hardware_out, log=log)
        path = args.hardware_out
        log(f"hardware -> {path}")
        if args.measure_hardware:
            return 0
    try:
        report = validate(work, [by_name[n] for n in names], path, args.steps, args.repeat,
                          log=log)
    except ConfigError as exc:
        print(f"minipar.bench: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report))
    else:
        print(table(report["rows"]))
        if report["other_load"] is not None:
            print(f"other processes kept {report['other_load']:.0%} of the {report['cores']} "
                  "cores busy meanwhile (the wall column is trustworthy only near 0%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
