"""``python -m minipar.bench --partition``: the pipeline bubble of equal and balanced splits,
measured under mpirun and predicted by the simulator, side by side.

Equal block counts are not equal work: the last stage also computes the logits over the
vocabulary (2 b s h V FLOPs per microbatch), so with a large vocabulary it is the slowest stage
and every other stage waits for it. ``--partition balanced`` moves blocks off it
(``minipar.sim.partition.balanced_blocks``). This benchmark runs the same model, batch and
schedule with each split (``python -m minipar.train --pp P --partition ... --trace``, launched
for you, the splits alternating ``--repeat`` times so that a change of load hits them alike),
and reads each training step from the trace: a stage is busy while it runs a forward or
backward pass; the bubble is the idle share of the pipeline phase, 1 - sum of busy / (P x time
to the last pass), the simulator's definition (``minipar.sim.simulator``). Medians over the
timed steps are reported beside the simulator's prediction for the same layout, on this
machine as the CPU-time rate of the model's GEMMs describes it (``--hardware-file`` from
``python -m minipar.bench --measure-hardware`` describes it better), and the slowest stage's
busy time over the mean, measured and in FLOPs (the partition report's balance).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

PROG = "python -m minipar.bench --partition"
COMPUTE = ("fwd", "bwd", "bwd_input", "bwd_weight")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--partition", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--pp", type=int, default=2, help="pipeline stages = mpirun ranks")
    p.add_argument("--layers", type=int, default=8, help="blocks")
    p.add_argument("--d-model", type=int, default=256, help="model width")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary: the head's weight")
    p.add_argument("--batch-size", type=int, default=32, help="global batch")
    p.add_argument("--microbatches", type=int, default=8, help="microbatches per step")
    p.add_argument("--schedule", default="1f1b", help="gpipe, 1f1b, interleaved, zb-h1")
    p.add_argument("--splits", default="equal,balanced",
                   help="the --partition values to compare, separated by ';' or ',' between "
                        "names (explicit counts: 'equal;6,2')")
    p.add_argument("--steps", type=int, default=8, help="training steps per split")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--repeat", type=int, default=2, help="runs per split, alternating splits")
    p.add_argument("--hardware-file", default=None, metavar="FILE",
                   help="this machine for the prediction (python -m minipar.bench "
                        "--measure-hardware); default: a quick GEMM measurement")
    p.add_argument("--timeout", type=float, default=600, help="seconds per mpirun job")
    p.add_argument("--json", default=None, metavar="FILE", help="save the rows as JSON")
    return p


def chunks_per_stage(args) -> int:
    """Model chunks per stage: 2 for the interleaved schedule, else 1."""
    return 2 if args.schedule == "interleaved" else 1


def split_values(text: str) -> list[str]:
    """``equal,balanced`` or ``equal;6,2``: the --partition value of each run."""
    if ";" in text:
        return [s.strip() for s in text.split(";") if s.strip()]
    return [s.strip() for s in text.split(",") if s.strip()]


def step_bubbles(doc: dict, ranks: int) -> list[dict]:
    """Per training step of a Chrome trace (``--trace``): the measured bubble, the time to the
    last pass, and each rank's busy seconds; steps in order."""
    steps: dict = {}
    for e in doc["traceEvents"]:
        step = e.get("args", {}).get("step")
        if e.get("ph") == "X" and step is not None:
            steps.setdefault(step, []).append(e)
    out = []
    for step in sorted(steps):
        events = steps[step]
        t0 = min(e["ts"] for e in events)
        passes = [e for e in events if e["cat"] in COMPUTE]
        end = max(e["ts"] + e["dur"] for e in passes) - t0
        busy = [sum(e["dur"] for e in passes if e["pid"] == r) / 1e6 for r in range(ranks)]
        out.append({"step": step, "bubble": 1 - sum(busy) / (ranks * end / 1e6),
                    "pipeline_s": end / 1e6, "busy_s": busy})
    return out


def measure(args, split: str, workdir: str) -> dict:
    """Train with ``--partition split`` under mpirun; each timed step's measured numbers."""
    from minipar.dist.mpirun import mpirun

    trace, summary = os.path.join(workdir, "trace.json"), os.path.join(workdir, "s.json")
    mpirun(args.pp, ["-m", "minipar.train", "--quiet", "--pp", str(args.pp),
                     "--layers", str(args.layers), "--d-model", str(args.d_model),
                     "--vocab", str(args.vocab), "--batch-size", str(args.batch_size),
                     "--microbatches", str(args.microbatches), "--schedule", args.schedule,
                     "--virtual-stages", str(chunks_per_stage(args)),
                     "--steps", str(args.steps), "--eval-every", str(10 ** 9),
                     "--partition", split, "--trace", trace, "--summary", summary],
           timeout=args.timeout, stream=False)
    with open(trace) as fh:
        steps = step_bubbles(json.load(fh), args.pp)[args.warmup:]
    with open(summary) as fh:
        done = json.load(fh)
    return {"split": split, "blocks": done["layout"]["partition"], "model": done["model"],
            "per_step": steps}


def summarize(runs: list[dict]) -> dict:
    """One split's runs as one row: the medians over its steps of the bubble, the pipeline
    time and each stage's busy time."""
    steps = [s for run in runs for s in run["per_step"]]
    busy = [statistics.median(s["busy_s"][r] for s in steps)
            for r in range(len(steps[0]["busy_s"]))]
    return {**{k: runs[0][k] for k in ("split", "blocks", "model")},
            "bubble": statistics.median(s["bubble"] for s in steps),
            "imbalance": statistics.median(max(s["busy_s"]) * len(s["busy_s"]) / sum(s["busy_s"])
                                           for s in steps),
            "pipeline_s": statistics.median(s["pipeline_s"] for s in steps),
            "busy_s": busy, "steps": len(steps), "runs": len(runs), "per_step": steps}


def hardware(args, seq_len: int):
    """This machine for the simulator: the measured file, else the CPU-time rate of the
    block's GEMMs at this model's shapes (``minipar.bench.probe``), one thread per rank."""
    from minipar.sim.hardware import Hardware

    path = args.hardware_file
    if path is None:
        from minipar.bench.probe import Workload as Probe
        from minipar.bench.probe import measure_gemm

        rate = measure_gemm(Probe(d_model=args.d_model, seq_len=seq_len,
                                  batch_size=max(1, args.batch_size // args.microbatches)))
        fd, path = tempfile.mkstemp(suffix=".json")
        with os.fdopen(fd, "w") as fh:
            json.dump({"gemm_flops": rate, "cores": os.cpu_count()}, fh)
    return Hardware.from_bench_json(path).shared_by(args.pp)


def predict(args, cfg, blocks: list[int], hw) -> float:
    """The simulator's bubble for this layout and split."""
    from minipar.config import ParallelConfig
    from minipar.sim.costmodel import Workload
    from minipar.sim.timing import estimate

    v = chunks_per_stage(args)
    par = ParallelConfig(pp=args.pp, schedule=args.schedule, microbatches=args.microbatches,
                         virtual_stages=v, partition=tuple(blocks))
    work = Workload(global_batch=args.batch_size,
                    microbatch_size=args.batch_size // args.microbatches, recompute="none",
                    dtype="fp32", scatter_gather=False, dropout=False)
    return estimate(cfg, par, work, hw, use_simulator=True).bubble_fraction


def report(rows: list[dict]) -> str:
    """The table: per split, the measured and predicted bubble, the slowest stage's busy time
    over the mean (measured, and in FLOPs), the pipeline phase and each stage's busy time."""
    lines = [f"{'--partition':<12} {'blocks':<10} {'bubble':>7} {'predicted':>9} "
             f"{'slowest/mean':>12} {'FLOPs':>6} {'pipeline':>9}  busy per stage (s)"]
    for r in rows:
        busy = " ".join(f"{b:.3f}" for b in r["busy_s"])
        lines.append(f"{r['split']:<12} {','.join(map(str, r['blocks'])):<10} "
                     f"{100 * r['bubble']:>6.1f}% {100 * r['predicted']:>8.1f}% "
                     f"{r['imbalance']:>11.2f}x {r['flop_imbalance']:>5.2f}x "
                     f"{1e3 * r['pipeline_s']:>7.0f}ms  {busy}")
    if len(rows) > 1:
        a, b = rows[0], rows[-1]
        lines.append(f"{a['split']} -> {b['split']}: bubble {100 * a['bubble']:.1f}% -> "
                     f"{100 * b['bubble']:.1f}% (predicted {100 * a['predicted']:.1f}% -> "
                     f"{100 * b['predicted']:.1f}%), slowest stage {a['imbalance']:.2f}x -> "
                     f"{b['imbalance']:.2f}x the mean; pipeline phase "
                     f"{a['pipeline_s'] / b['pipeline_s']:.2f}x as fast (times move with the "
                     "machine's load, ratios within a step much less)")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    from minipar.config import MODEL_PRESETS, ConfigError, replace
    from minipar.dist.mpirun import MPIRunError
    from minipar.sim.hardware import Hardware
    from minipar.sim.partition import partition, resolve_partition

    cfg = replace(MODEL_PRESETS["default"], vocab_size=args.vocab, n_layers=args.layers,
                  d_model=args.d_model)
    v = chunks_per_stage(args)
    try:
        if args.steps <= args.warmup:
            raise ConfigError(f"--steps {args.steps} must exceed --warmup {args.warmup}")
        if args.repeat < 1:
            raise ConfigError(f"--repeat must be >= 1, got {args.repeat}")
        for split in split_values(args.splits):
            resolve_partition(split, cfg, args.pp, v)  # one line now, not after a run
        if args.hardware_file is not None:
            Hardware.from_bench_json(args.hardware_file)
    except ConfigError as exc:
        print(f"minipar.bench: error: {exc}", file=sys.stderr)
        return 2
    runs: dict = {split: [] for split in split_values(args.splits)}
    for _ in range(args.repeat):  # alternate the splits: a change of load hits them alike
        for split in runs:
            with tempfile.TemporaryDirectory() as tmp:
                try:
                    runs[split].append(measure(args, split, tmp))
                except MPIRunError as exc:
                    print(f"minipar.bench: error: the run with --partition {split} failed: "
                          f"{str(exc)[-2000:]}", file=sys.stderr)
                    return 1
    rows, hw = [summarize(r) for r in runs.values()], None
    for row in rows:
        m = row["model"]  # the model the run trained (the task sets the sequence length)
        cfg = replace(cfg, seq_len=m["seq_len"], n_heads=m["heads"])
        hw = hw or hardware(args, cfg.seq_len)
        row["predicted"] = predict(args, cfg, row["blocks"], hw)
        split = partition(cfg, args.pp, v, tuple(row["blocks"]))
        row["blocks"], row["flop_imbalance"] = split.blocks, split.imbalance
    print(f"pp {args.pp}, {args.schedule} x {args.microbatches} microbatches, {args.layers} "
          f"layers, d_model {args.d_model}, vocab {args.vocab}, batch {args.batch_size}; "
          f"median of {rows[0]['steps']} steps in {args.repeat} run(s) per split, alternating; "
          f"predicted on {hw.name}")
    print(report(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
