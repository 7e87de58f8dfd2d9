"""``python -m minipar.simulate``: predict a training step on a cluster no laptop can run.

The cost model (``minipar.sim``) counts parameters, FLOPs, memory per GPU and bytes per
collective for a model x layout x hardware, and times the very pipeline program the executor
runs through the discrete-event simulator. ``--search`` ranks every layout that fits in
memory for a model and a GPU count. Bad layouts exit non-zero with a one-line reason.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

from minipar.config import SCHEDULE_NAMES, ConfigError, ParallelConfig, check_output, replace
from minipar.sim import costmodel as cm
from minipar.sim.hardware import HARDWARE_NAMES, Hardware, get_hardware
from minipar.sim.partition import resolve_partition
from minipar.sim.presets import MODELS, PTDP_TABLE1
from minipar.sim.timing import Estimate, estimate

PROG = "minipar.simulate"
GB = 1e9

EPILOG = """examples:
  python -m minipar.simulate                                  # PTD-P's 145B run (table 1)
  python -m minipar.simulate --model ptdp-1t --json           # 1T on 3072 A100s, as JSON
  python -m minipar.simulate --model gpt3-175b --gpus 1024 --tp 8 --pp 16 \\
      --recompute selective --sequence-parallel --microbatch-size 1
  python -m minipar.simulate --model gpt3-175b --gpus 1024 --search --top 5
  python -m minipar.simulate --model gpt3-13b --gpus 64 --tp 8 --pp 2 --hardware h100-sxm
  python -m minipar.simulate --model gpt3-125m --layers 4 --d-model 256 --heads 4 --seq-len 256 \\
      --dp 2 --global-batch 16 --dtype fp32 --hardware this-machine --hardware-file bench.json
  python -m minipar.simulate --model ptdp-39b --timeline step.png

Models: gpt3-125m ... gpt3-175b (Brown et al. 2020), ptdp-1.7b ... ptdp-1t (Narayanan et al.
2021, table 1: their t, p, GPU count and batch are the defaults). Throughput counts the FLOPs
actually executed (with recomputation, as PTD-P does); MFU counts only the model's FLOPs."""


class _Parser(argparse.ArgumentParser):
    """A usage error is one line naming the flag (not the whole usage text), exit 2."""

    def error(self, message):
        sys.stderr.write(f"{PROG}: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"python -m {PROG}", description=__doc__.split("\n")[0],
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--model", default="ptdp-145b", metavar="NAME",
                   help=f"preset: {', '.join(MODELS)} (default ptdp-145b)")
    for flag, what in (("--layers", "blocks"), ("--d-model", "hidden size"),
                       ("--heads", "attention heads"), ("--seq-len", "context length"),
                       ("--vocab", "vocabulary size"), ("--d-ff", "MLP width (0 = 4 d_model)")):
        m.add_argument(flag, type=int, help=f"override the preset's {what}")
    m.add_argument("--arch", choices=("gpt", "encdec"), default="gpt",
                   help="encdec: the preset as an encoder-decoder, --layers encoder and as many "
                        "decoder layers (counts, memory, bytes and bubble; no clock)")
    m.add_argument("--src-len", type=int, help="encdec: source length (default --seq-len)")
    m.add_argument("--pos-bias", action="store_true",
                   help="encdec: the encoder's learned position bias, heads x S^2 per layer")
    lay = p.add_argument_group("layout")
    lay.add_argument("--gpus", type=int, help="GPU count; dp = gpus / (tp x pp) if --dp absent")
    lay.add_argument("--dp", type=int, help="data parallel size")
    lay.add_argument("--tp", type=int, help="tensor parallel size")
    lay.add_argument("--pp", type=int, help="pipeline stages")
    lay.add_argument("--cp", type=int, help="context parallel size: each sequence split over "
                     "cp GPUs, ring attention (long sequences)")
    lay.add_argument("--cp-split", default="zigzag", choices=("zigzag", "contiguous"),
                     help="how --cp cuts a sequence (zigzag balances the causal mask)")
    lay.add_argument("--virtual-stages", type=int, help="model chunks per stage (interleaved)")
    lay.add_argument("--partition", default="equal", metavar="equal|balanced|N,N,...",
                     help="blocks per virtual stage, as python -m minipar.train --partition")
    lay.add_argument("--schedule", choices=SCHEDULE_NAMES,
                     help="pipeline schedule (default 1f1b, interleaved if --virtual-stages > 1)")
    lay.add_argument("--microbatch-size", type=int, help="sequences per microbatch (default 1)")
    lay.add_argument("--global-batch", type=int, help="sequences per step (preset's default)")
    lay.add_argument("--zero", type=int, choices=(0, 1, 2, 3), help="ZeRO stage over dp")
    lay.add_argument("--sequence-parallel", action="store_true", help="Korthikanti et al. 2022")
    lay.add_argument("--recompute", choices=cm.RECOMPUTE,
                     help="activation recomputation (ptdp presets: full; otherwise none)")
    lay.add_argument("--bucket-mb", type=float, default=0.0,
                     help="> 0: dp gradient sync overlaps the last backward")
    lay.add_argument("--no-scatter-gather", action="store_true",
                     help="send whole activations between stages (PTD-P section 4.1 off)")
    hw = p.add_argument_group("hardware")
    hw.add_argument("--hardware", default="a100-80gb", choices=HARDWARE_NAMES)
    hw.add_argument("--hardware-file", metavar="FILE",
                    help="JSON of `python -m minipar.bench --json` (keys gemm_flops, optionally "
                         "allreduce_bytes_per_s, latency_s) for --hardware this-machine")
    hw.add_argument("--dtype", default="bf16",
                    help="bf16 (default, mixed precision), fp16, fp32 or fp64")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON object")
    out.add_argument("--search", action="store_true",
                     help="rank the layouts of --gpus GPUs that fit, by predicted throughput")
    out.add_argument("--top", type=int, default=10, help="layouts shown by --search")
    out.add_argument("--timeline", metavar="PNG", help="save the simulated pipeline timeline")
    out.add_argument("--trace", metavar="JSON", help="save it as a Chrome trace (Perfetto)")
    return p


# ------------------------------------------------------------------------------- resolving
_OVERRIDES = (("n_layers", "--layers", "layers"), ("d_model", "--d-model", "d_model"),
              ("n_heads", "--heads", "heads"), ("seq_len", "--seq-len", "seq_len"),
              ("vocab_size", "--vocab", "vocab"), ("d_ff", "--d-ff", "d_ff"))
_POSITIVE = ("gpus", "dp", "tp", "pp", "cp", "virtual_stages", "microbatch_size", "global_batch",
             "top", "src_len")


def check_flags(args) -> None:
    """Zero or a negative count is a typo, never "unset" (absent flags are None)."""
    for name in _POSITIVE:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, "
                              f"got {value}")
    if not args.bucket_mb >= 0 or args.bucket_mb == float("inf"):
        raise ConfigError(f"--bucket-mb must be a finite number >= 0, got {args.bucket_mb}")
    for flag, path in (("--timeline", args.timeline), ("--trace", args.trace)):
        if path is not None:
            check_output(flag, path, "file", example="step.png" if flag == "--timeline"
                         else "step.json")


def resolve_model(args):
    """(model, default global batch, name): a preset with any overrides; an overridden preset
    is named for what it is (``gpt3-175b with --layers 200``), not for the preset."""
    if args.model not in MODELS:
        raise ConfigError(f"--model must be one of {', '.join(MODELS)}, got {args.model!r}")
    model, batch = MODELS[args.model]
    over = {key: getattr(args, attr) for key, _, attr in _OVERRIDES
            if getattr(args, attr) is not None and getattr(args, attr) != getattr(model, key)}
    model = replace(model, **over)
    if getattr(args, "arch", "gpt") == "encdec":  # the encoder reads src_len tokens
        model = replace(model, arch="encdec", src_len=args.src_len or model.seq_len,
                        pos_bias=getattr(args, "pos_bias", False))
    elif getattr(args, "src_len", None) is not None:
        raise ConfigError("--src-len applies to --arch encdec")
    elif getattr(args, "pos_bias", False):
        raise ConfigError("--pos-bias applies to --arch encdec")
    model.validate()
    name = args.model
    if over:
        name += " with " + " ".join(f"{flag} {over[key]}" for key, flag, _ in _OVERRIDES
                                    if key in over)
    return model, batch, name


def resolve(args) -> tuple:
    """(model, parallel, workload, hardware, name) from the flags and the preset's defaults."""
    check_flags(args)
    model, batch, name = resolve_model(args)
    run = PTDP_TABLE1.get(args.model)
    tp = args.tp if args.tp is not None else (run.tp if run else 1)
    pp = args.pp if args.pp is not None else (run.pp if run else 1)
    if args.sequence_parallel and tp == 1:
        raise ConfigError("--sequence-parallel shards activations over the tensor-parallel "
                          "group: it needs --tp 2 or more")
    cp = args.cp if args.cp is not None else 1
    if args.dp is not None:
        dp = args.dp
    elif args.gpus is not None:
        if args.gpus % (tp * pp * cp):
            with_cp = f" x --cp {cp}" if cp > 1 else ""
            raise ConfigError(f"--gpus {args.gpus} is not divisible by --tp {tp} x --pp {pp}"
                              f"{with_cp}")
        dp = args.gpus // (tp * pp * cp)
    else:
        dp = run.dp if (run and args.tp is None and args.pp is None) else 1
    v = args.virtual_stages if args.virtual_stages is not None else 1
    schedule = args.schedule or ("interleaved" if v > 1 else "1f1b")
    work = cm.Workload(
        global_batch=args.global_batch if args.global_batch is not None else (
            run.global_batch if run else batch),
        microbatch_size=args.microbatch_size if args.microbatch_size is not None else 1,
        recompute=args.recompute or (run.recompute if run else "none"),
        dtype=cm.canonical_dtype(args.dtype), scatter_gather=not args.no_scatter_gather)
    par = ParallelConfig(dp=dp, tp=tp, pp=pp, zero=args.zero or 0,
                         sequence_parallel=args.sequence_parallel, schedule=schedule,
                         microbatches=max(1, work.microbatches(dp)), virtual_stages=v,
                         bucket_mb=args.bucket_mb, cp=cp, cp_split=args.cp_split,
                         recompute=work.recompute,
                         partition=resolve_partition(args.partition, model, pp, v))
    cm.check_layout(model, par, work, args.gpus)
    hw = get_hardware(args.hardware, args.hardware_file)
    if args.hardware == "this-machine":  # every rank of the layout shares this one machine
        hw = hw.shared_by(par.world)
    return model, par, work, hw, name


# --------------------------------------------------------------------------------- report
def _si(x: float, unit: str) -> str:
    """1.23 T..., 456 G..., 7.8 M... : readable from a laptop to a supercomputer."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def describe(name: str, model, par: ParallelConfig, work: cm.Workload, hw: Hardware) -> str:
    params = cm.param_count(model)
    v = f", v={par.virtual_stages}" if par.virtual_stages > 1 else ""
    cp = f" x cp {par.cp} ({par.cp_split})" if par.cp > 1 else ""
    if par.partition:
        v += f", --partition {','.join(map(str, par.partition))}"
    count = f"{params / 1e9:.4g}B" if params >= 1e9 else f"{params / 1e6:.4g}M"
    return (f"{name}: {count} parameters ({model.n_layers} layers, d_model "
            f"{model.d_model}, {model.n_heads} heads, seq {model.seq_len}, vocab "
            f"{model.vocab_size})\nlayout: {par.world} GPU(s) = dp {par.dp}{cp} x tp {par.tp} x "
            f"pp {par.pp}, {par.schedule}{v}, {par.microbatches} microbatches of "
            f"{work.microbatch_size}, global batch {work.global_batch}, recompute "
            f"{work.recompute}, ZeRO {par.zero}, sequence parallel "
            f"{'on' if par.sequence_parallel else 'off'}, {work.dtype} on {hw.name}")


def report(name: str, model, par, work, hw: Hardware, est: Estimate) -> str:
    b, mem, comm = est.breakdown, est.memory_per_gpu_bytes, est.comm_bytes_per_step
    tokens = work.global_batch * model.seq_len / est.step_time_s
    kinds = ", ".join(f"{k} {_si(v, 'B')}" for k, v in mem.items() if k not in ("total", "stage"))
    comm_name = "tp + exposed cp ring comm" if par.cp > 1 else "tp comm"
    lines = [
        describe(name, model, par, work, hw),
        f"step time       {est.step_time_s:.3f} s  (stage {b['stage']}: compute "
        f"{b['compute_s']:.3f} s, {comm_name} {b['tp_comm_s']:.3f} s, pipeline idle "
        f"{b['pipeline_idle_s']:.3f} s, dp sync {b['dp_sync_exposed_s']:.3f} s, optimizer "
        f"{b['optimizer_s']:.3f} s" + (f", ZeRO-3 gathers {b['zero3_exposed_s']:.3f} s"
                                        if b["zero3_exposed_s"] > 1e-9 else "") + ")",
        f"throughput      {_si(est.tflops_per_gpu * 1e12, 'FLOP/s')} per GPU = "
        f"{est.percent_of_peak:.1f}% of the {_si(hw.flops(work.dtype), 'FLOP/s')} peak; "
        f"MFU {100 * est.mfu:.1f}%; "
        f"{tokens:,.0f} tokens/s",
        f"bubble          {100 * est.bubble_fraction:.1f}% of the pipeline phase idle",
        f"memory per GPU  {_si(mem['total'], 'B')} of {_si(hw.memory_bytes, 'B')} "
        f"(worst stage {mem['stage']}): {kinds}",
        f"comm per step   per GPU: tp {_si(comm['tp'], 'B')}, dp {_si(comm['dp'], 'B')}, "
        f"pp {_si(comm['pp'], 'B')}" + (f", cp {_si(comm['cp'], 'B')} (ring attention, "
                                         f"sent)" if par.cp > 1 else ""),
    ]
    run = PTDP_TABLE1.get(name)  # None for an overridden preset: its name says so
    if run and (par.tp, par.pp, par.world, par.virtual_stages, par.zero, par.sequence_parallel,
                work.global_batch, work.microbatch_size, work.recompute, work.dtype) == (
            run.tp, run.pp, run.gpus, run.virtual_stages, run.zero, run.sequence_parallel,
            run.global_batch, run.microbatch_size, run.recompute, "bf16"):
        lines.append(f"published       {run.measured['tflops_per_gpu']} TFLOP/s per GPU "
                     f"({run.source}; assumed: {run.assumed})")
    return "\n".join(lines)


def to_json(name: str, model, par, work, hw, est: Estimate) -> dict:
    out = est.to_json()
    out.update(model=name, hardware=hw.name, layout={
        "dp": par.dp, "tp": par.tp, "pp": par.pp, "virtual_stages": par.virtual_stages,
        "partition": list(par.partition),
        "schedule": par.schedule, "microbatches": par.microbatches,
        "microbatch_size": work.microbatch_size, "global_batch": work.global_batch,
        "zero": par.zero, "sequence_parallel": par.sequence_parallel,
        "recompute": work.recompute, "dtype": work.dtype, "cp": par.cp,
        "cp_split": par.cp_split})
    return out


# --------------------------------------------------------------------------------- search
def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


CP_MIN_TOKENS = 2048  # --search tries cp only while each rank keeps this many tokens or more


def context_sizes(model, n: int) -> list[int]:
    """The cp sizes --search tries with n GPUs left: 1, and for long sequences every divisor of
    n that cuts the sequence into 2 cp zig-zag chunks and leaves each rank at least
    ``CP_MIN_TOKENS`` tokens (shorter blocks cannot hide the ring's hops)."""
    return [c for c in _divisors(n) if c == 1 or (
        model.seq_len % (2 * c) == 0 and model.seq_len // c >= CP_MIN_TOKENS)]


def search(model, gpus: int, work: cm.Workload, hw: Hardware, zero: int | None = None,
           recompute: str | None = None) -> tuple[list, Counter]:
    """Every dp x cp x tp x pp x microbatch size x schedule of ``gpus`` GPUs that fits, ranked
    by predicted step time (closed form), with the cheapest recomputation and ZeRO stage that
    fit; sequence parallelism whenever tp > 1; context parallelism (zig-zag) for long
    sequences (``context_sizes``). Returns (ranked rows, rejection counts)."""
    rows, rejected = [], Counter()
    tps = [t for t in _divisors(gpus) if t <= 4 * hw.gpus_per_node]
    for tp in tps:
        if model.n_heads % tp or model.ffn % tp:
            rejected[f"tp does not divide the heads ({model.n_heads})"] += 1
            continue
        for pp in _divisors(gpus // tp):
            if model.n_layers % pp:
                rejected[f"pp does not divide the layers ({model.n_layers})"] += 1
                continue
            for cp in context_sizes(model, gpus // (tp * pp)):
                _search_cp(model, work, hw, gpus // (tp * pp * cp), tp, pp, cp, zero,
                           recompute, rows, rejected)
    rows.sort(key=lambda r: r[1].step_time_s)
    return rows, rejected


def _search_cp(model, work, hw, dp, tp, pp, cp, zero, recompute, rows, rejected) -> None:
    """The microbatch sizes and schedules of one dp x cp x tp x pp, into rows / rejected."""
    for b in (1, 2, 4, 8):
        if work.global_batch % (dp * b):
            rejected["dp x microbatch size does not divide the global batch"] += 1
            continue
        m = work.global_batch // (dp * b)
        scheds = [("1f1b", 1)] + [("interleaved", v) for v in (2, 4) if pp > 1 and
                                  m % pp == 0 and model.n_layers % (pp * v) == 0]
        for schedule, v in scheds:
            row = _best_fit(model, work, hw, dp, tp, pp, b, m, schedule, v, zero, recompute,
                            cp)
            if isinstance(row, float):
                rejected["out of memory even with full recomputation and ZeRO"] += 1
            else:
                rows.append(row)


def _best_fit(model, work, hw, dp, tp, pp, b, m, schedule, v, zero, recompute, cp=1):
    """(parallel, estimate, workload) for the first recompute/ZeRO choice that fits, else the
    smallest memory seen (a float)."""
    smallest = float("inf")
    zeros = [zero] if zero is not None else ([0, 1] if dp * cp > 1 else [0])
    for rc in ([recompute] if recompute else cm.RECOMPUTE):
        for z in zeros:
            par = ParallelConfig(dp=dp, tp=tp, pp=pp, zero=z, sequence_parallel=tp > 1,
                                 schedule=schedule, microbatches=m, virtual_stages=v, cp=cp,
                                 recompute=rc)
            w = replace(work, microbatch_size=b, recompute=rc)
            mem = cm.memory_per_gpu(model, par, w)["total"]
            if mem <= hw.memory_bytes:
                return par, estimate(model, par, w, hw, use_simulator=False), w
            smallest = min(smallest, mem)
    return smallest


SEARCH_LEGEND = ("v: model chunks per pipeline rank, b: sequences per microbatch, "
                 "m: microbatches per step, cp: context parallel ranks (zig-zag)")


def search_table(rows: list, top: int) -> str:
    head = (f"{'#':>3} {'dp':>5} {'cp':>3} {'tp':>3} {'pp':>3} {'v':>2} {'b':>2} {'m':>5} "
            f"{'zero':>4} "
            f"{'recompute':>9} {'step s':>8} {'TFLOP/s':>8} {'MFU':>6} {'bubble':>7} "
            f"{'mem GB':>7}")
    lines = [SEARCH_LEGEND, head]
    for i, (par, est, w) in enumerate(rows[:top], 1):
        lines.append(
            f"{i:>3} {par.dp:>5} {par.cp:>3} {par.tp:>3} {par.pp:>3} {par.virtual_stages:>2} "
            f"{w.microbatch_size:>2} {par.microbatches:>5} {par.zero:>4} {w.recompute:>9} "
            f"{est.step_time_s:>8.2f} {est.tflops_per_gpu:>8.1f} {100 * est.mfu:>5.1f}% "
            f"{100 * est.bubble_fraction:>6.1f}% {est.memory_per_gpu_bytes['total'] / GB:>7.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _run(args)
    except ConfigError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... | head` stopped reading: not an error of this command
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - the interpreter's exit flush
        return 0


def _run(args) -> int:
    if args.search:
        return _run_search(args)
    model, par, work, hw, name = resolve(args)
    if model.arch == "encdec":
        return _run_encdec(args, model, par, work, name)
    passes = 2 * par.pp * par.microbatches * par.virtual_stages
    want_plot = bool(args.timeline or args.trace)
    if want_plot and passes > 20000:
        raise ConfigError(f"--timeline/--trace: {passes} passes are too many to draw; use a "
                          "smaller --global-batch or larger --microbatch-size")
    est = estimate(model, par, work, hw, use_simulator=True if want_plot else None)
    if args.timeline:
        from minipar.observe.render import plot_timeline
        plot_timeline(est.timeline, args.timeline, f"{name}: simulated step")
    if args.trace:
        from minipar.observe.trace import timeline_events, to_chrome_trace
        to_chrome_trace(timeline_events(est.timeline), args.trace)
    if args.json:
        print(json.dumps(to_json(name, model, par, work, hw, est)))
    else:
        print(report(name, model, par, work, hw, est))
    if not est.fits:
        mem = est.memory_per_gpu_bytes
        print(f"{PROG}: error: does not fit: {mem['total'] / GB:.1f} GB per GPU (stage "
              f"{mem['stage']}) > {hw.memory_bytes / GB:.1f} GB on {hw.name}; try --recompute "
              "selective/full, --zero 1-3, --sequence-parallel, or more --tp/--pp",
              file=sys.stderr)
        return 1
    return 0


def _run_encdec(args, model, par, work, name) -> int:
    """--arch encdec: the counts of ``minipar.sim.encdec_estimate`` (no timeline, no clock)."""
    from minipar.sim import encdec_estimate

    if args.timeline or args.trace:
        raise ConfigError("--timeline/--trace need the time model, which is the GPT's: leave "
                          "them out with --arch encdec")
    est = encdec_estimate.estimate(model, par, work)
    print(json.dumps(est, default=float) if args.json
          else encdec_estimate.report(name, model, par, work, est))
    return 0


def _run_search(args) -> int:
    check_flags(args)
    if args.partition != "equal":
        raise ConfigError("--search compares equal splits: leave out --partition")
    for flag in ("dp", "tp", "pp", "cp", "virtual_stages", "microbatch_size", "schedule"):
        if getattr(args, flag) is not None:
            raise ConfigError(f"--search chooses the layout itself: leave out "
                              f"--{flag.replace('_', '-')}")
    model, batch, name = resolve_model(args)
    run = PTDP_TABLE1.get(args.model)
    gpus = args.gpus if args.gpus is not None else (run.gpus if run else None)
    if gpus is None:
        raise ConfigError("--search needs --gpus N (the GPU count to lay out)")
    work = cm.Workload(global_batch=args.global_batch if args.global_batch is not None else (
                           run.global_batch if run else batch),
                       dtype=cm.canonical_dtype(args.dtype),
                       scatter_gather=not args.no_scatter_gather)
    hw = get_hardware(args.hardware, args.hardware_file)
    rows, rejected = search(model, gpus, work, hw, args.zero, args.recompute)
    if args.json:
        print(json.dumps({"model": name, "gpus": gpus, "hardware": hw.name,
                          "ranked": [to_json(name, model, p, w, hw, e)
                                     for p, e, w in rows[:args.top]],
                          "fitting": len(rows), "rejected": dict(rejected)}))
    else:
        print(f"{name} on {gpus} x {hw.name}, global batch {work.global_batch}: "
              f"{len(rows)} layouts fit; best {min(args.top, len(rows))} by predicted step time")
        if rows:
            print(search_table(rows, args.top))
        for reason, n in rejected.most_common():
            print(f"rejected {n:>5}: {reason}")
    if not rows:
        print(f"{PROG}: error: --gpus {gpus}: no layout fits {name} in "
              f"{hw.memory_bytes / GB:.1f} GB per GPU", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
