"""``python -m minipar.bench``: measure this machine and this code.

Default: the GEMM FLOP/s this machine reaches (the practical peak for our kernels), then the
forward + backward + optimizer step of a model preset on one rank, reported as tokens/s,
achieved model FLOP/s and their ratio to the GEMM peak. Model FLOPs per token are
``minipar.sim.costmodel.model_flops``: 6 N + 12 L T C (Kaplan et al. 2020; the second term is
attention's QK^T and AV, which the causal kernel computes in full), where N counts the weights of
the matrix products (not biases, LayerNorms or the embedding lookup tables).

``--reference torch`` times the same GPT in PyTorch eager beside it (``minipar.bench.reference``),
``--contention`` times it beside a busy process (``minipar.bench.contention``) and ``--profile``
shows where its time goes, kernel by kernel (``minipar.bench.profile``).

Speed targets are checked here, by measurement, never by timed tests.
"""

from __future__ import annotations

from minipar.dist.launch import configure_threads

BLAS_THREADS = configure_threads()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy  # noqa: E402


def gemm_flops(dtype: str = "float32", n: int = 1024, seconds: float = 1.0) -> float:
    """Best FLOP/s of an n x n x n matrix product on the current backend."""
    from minipar import backend

    xp = backend.xp()
    rng = numpy.random.default_rng(0)
    a = backend.from_host(rng.standard_normal((n, n)).astype(dtype))
    b = backend.from_host(rng.standard_normal((n, n)).astype(dtype))
    out = a @ b
    best = float("inf")
    deadline = time.perf_counter() + seconds
    reps = 0
    while reps < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        xp.matmul(a, b, out=out)
        _sync()
        best = min(best, time.perf_counter() - t0)
        reps += 1
    return 2.0 * n**3 / best


def _sync() -> None:
    from minipar import backend

    backend.synchronize()  # a GPU runs asynchronously: time what it did, not what was queued


def model_flops_per_token(cfg) -> float:
    """The matrix products' FLOPs of forward + backward per token: ``costmodel.model_flops``
    (Korthikanti et al. 2022 eq. 7; 6 N + 12 L T C with N the weights in matrix products)."""
    from minipar.sim.costmodel import model_flops

    return model_flops(cfg, 1) / cfg.seq_len


class MiniparStep:
    """One serial training step of a preset on fresh random tokens per call (the same token
    stream for every instance: seed 0); ``weights`` are the initial ones, by name."""

    def __init__(self, preset: str, batch: int, dtype: str):
        from minipar import backend
        from minipar.config import MODEL_PRESETS, ParallelConfig
        from minipar.dist.mesh import Mesh
        from minipar.engine import Engine

        self.cfg = MODEL_PRESETS[preset]
        self.batch = batch
        self.engine = Engine(self.cfg, ParallelConfig(), Mesh.serial(), seed=0, dtype=dtype,
                             lr=1e-4)
        self.weights = {p.name: backend.to_host(p.data).copy() for p in self.engine.params}
        self.rng = numpy.random.default_rng(0)

    def __call__(self) -> tuple[float, float]:
        """(seconds, loss) of one step."""
        shape = (self.batch, self.cfg.seq_len)
        x = self.rng.integers(0, self.cfg.vocab_size, shape)
        y = self.rng.integers(0, self.cfg.vocab_size, shape)
        t0 = time.perf_counter()
        result = self.engine.train_step(x, y, normalizer=x.size)
        _sync()
        return time.perf_counter() - t0, result.loss


def timed(steps: list, n: int, warmup: int = 2) -> list[dict]:
    """Run each of ``steps`` (callables returning (seconds, loss)) ``warmup + n`` times,
    interleaved step by step so that a change of load on a shared machine hits all alike;
    per step: the median seconds and the first loss."""
    times: list[list[float]] = [[] for _ in steps]
    first: list = [None] * len(steps)
    for i in range(warmup + n):
        for j, step in enumerate(steps):
            seconds, loss = step()
            first[j] = loss if first[j] is None else first[j]
            if i >= warmup:
                times[j].append(seconds)
    return [{"step_s": float(numpy.median(t)), "first_loss": f} for t, f in zip(times, first)]


def bench_step(preset: str, batch: int, dtype: str, steps: int, warmup: int = 2) -> dict:
    """Time serial training steps of a preset on random tokens; returns the measurements."""
    run = MiniparStep(preset, batch, dtype)
    (res,) = timed([run], steps, warmup)
    return describe(preset, dtype, run, res)


def describe(preset: str, dtype: str, run: MiniparStep, res: dict) -> dict:
    """The bench's numbers for one timed step: seconds, tokens/s, model FLOP/s."""
    tokens = run.batch * run.cfg.seq_len
    step_s = res["step_s"]
    return {"preset": preset, "batch": run.batch, "dtype": dtype, "step_s": step_s,
            "tokens_per_s": tokens / step_s, "first_loss": res["first_loss"],
            "achieved_flops": model_flops_per_token(run.cfg) * tokens / step_s}


def reference_torch(args, peak: float) -> dict | None:
    """minipar and PyTorch eager on the same GPT, steps interleaved (see
    ``minipar.bench.reference``): None, with one line printed, when torch is not installed;
    raises when the two disagree on the first loss (then they are not the same program)."""
    from minipar.bench import reference

    torch = reference.load_torch()
    if torch is None:
        print("minipar.bench: --reference torch: PyTorch is not installed (pip install "
              "'minipar[torch]'); minipar's step alone is reported")
        return None
    mine = MiniparStep(args.model, args.batch_size, args.dtype)
    theirs = reference.TorchStep(torch, mine.cfg, mine.weights, args.batch_size, args.dtype,
                                 BLAS_THREADS)
    ours, ref = timed([mine, theirs], args.steps)
    if not numpy.isclose(ref["first_loss"], ours["first_loss"], rtol=1e-4):
        raise RuntimeError(f"the PyTorch reference's first loss {ref['first_loss']:.6f} differs "
                           f"from minipar's {ours['first_loss']:.6f}: not the same model")
    tokens = args.batch_size * mine.cfg.seq_len
    cmp = reference.comparison(ours, ref, tokens, model_flops_per_token(mine.cfg), peak)
    return {**cmp, "step": describe(args.model, args.dtype, mine, ours),
            "torch_version": str(torch.__version__), "threads": BLAS_THREADS,
            "first_loss": {"minipar": ours["first_loss"], "torch": ref["first_loss"]}}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--collectives" in argv:  # collectives and dp scaling under mpirun: their own module
        from minipar.bench import comm as bench_comm

        return bench_comm.main(argv)
    if "--async" in argv:  # synchronous vs asynchronous training under mpirun
        from minipar.bench import asyncbench

        return asyncbench.main(argv)
    if "--partition" in argv:  # pipeline bubble of equal vs balanced splits under mpirun
        from minipar.bench import partition as bench_partition

        return bench_partition.main(argv)
    if "--validate" in argv or "--measure-hardware" in argv:  # cost model vs this machine
        from minipar.bench import validate as bench_validate

        return bench_validate.main(argv)
    parser = argparse.ArgumentParser(
        prog="python -m minipar.bench", description=__doc__.split("\n\n")[0],
        epilog="examples:\n  python -m minipar.bench\n  python -m minipar.bench --model small "
               "--dtype float32 --json\n  OMP_NUM_THREADS=1 python -m minipar.bench --steps 3\n"
               "  python -m minipar.bench --profile --steps 3",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", help="preset to time (default: small)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--gemm-size", type=int, default=1024)
    parser.add_argument("--backend", default="numpy", choices=["numpy", "cupy", "strict"])
    parser.add_argument("--threads", type=int, default=None, help="BLAS threads")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--reference", choices=["torch"], default=None,
                        help="also time the same GPT in PyTorch eager with the same threads "
                             "(optional extra: pip install 'minipar[torch]')")
    parser.add_argument("--contention", action="store_true",
                        help="also time the step beside a busy process and report the slowdown")
    parser.add_argument("--profile", action="store_true",
                        help="also show where the step's time goes, kernel by kernel (wall "
                             "time, the worker threads' share included)")
    parser.add_argument("--collectives", action="store_true",
                        help="instead: minipar vs raw mpi4py collectives under mpirun, and dp "
                             "scaling with --scaling (see python -m minipar.bench --collectives "
                             "--help)")
    parser.add_argument("--validate", action="store_true",
                        help="instead: measured vs predicted step time of small layouts under "
                             "mpirun (see python -m minipar.bench --validate --help)")
    parser.add_argument("--async", action="store_true", dest="async_",
                        help="instead: sync vs parameter server vs SSP vs local SGD under "
                             "mpirun, with a straggler (see python -m minipar.bench --async "
                             "--help)")
    parser.add_argument("--partition", action="store_true",
                        help="instead: the pipeline bubble of equal vs balanced splits, "
                             "measured under mpirun beside the simulator's prediction (see "
                             "python -m minipar.bench --partition --help)")
    parser.add_argument("--measure-hardware", action="store_true",
                        help="instead: measure this machine for the cost model (hardware JSON)")
    args = parser.parse_args(argv)
    from minipar import backend
    from minipar.config import MODEL_PRESETS

    if args.model not in MODEL_PRESETS:
        print(f"minipar.bench: error: --model: unknown preset {args.model!r} "
              f"(choose {', '.join(MODEL_PRESETS)})", file=sys.stderr)
        return 2
    if args.steps <= 0 or args.batch_size <= 0:
        print("minipar.bench: error: --steps and --batch-size must be positive", file=sys.stderr)
        return 2
    try:
        backend.use(args.backend)
    except backend.BackendError as exc:
        print(f"minipar.bench: error: {exc}", file=sys.stderr)
        return 2
    peak = gemm_flops(args.dtype, args.gemm_size)
    if not args.json:
        print(f"GEMM {args.gemm_size}^3 {args.dtype} on {backend.name()} "
              f"({BLAS_THREADS} BLAS threads): {peak / 1e9:.1f} GFLOP/s", flush=True)
    ref = reference_torch(args, peak) if args.reference == "torch" else None
    step = (ref["step"] if ref is not None else
            bench_step(args.model, args.batch_size, args.dtype, args.steps))
    result = {"backend": backend.name(), "blas_threads": BLAS_THREADS, "gemm_flops": peak,
              **step, "ratio": step["achieved_flops"] / peak}
    if not args.json:
        print(f"{args.model} step, batch {args.batch_size}: {step['step_s'] * 1e3:.0f} ms, "
              f"{step['tokens_per_s']:,.0f} tokens/s, {step['achieved_flops'] / 1e9:.1f} "
              f"GFLOP/s = {result['ratio']:.0%} of the GEMM peak", flush=True)
    if ref is not None:
        from minipar.bench.reference import format_comparison

        result["reference"] = {k: v for k, v in ref.items() if k != "step"}
        if not args.json:
            print(format_comparison(ref, ref["threads"], ref["torch_version"]), flush=True)
    if args.contention:
        from minipar.bench.contention import measure_contention, format_contention

        result["contention"] = cont = measure_contention(
            MiniparStep(args.model, args.batch_size, args.dtype), args.steps)
        if not args.json:
            print(format_contention(cont), flush=True)
    if args.profile:
        from minipar.bench.profile import format_profile, profile_step

        result["profile"] = prof = profile_step(
            MiniparStep(args.model, args.batch_size, args.dtype), args.steps)
        if not args.json:
            print(format_profile(prof), flush=True)
    if args.json:
        print(json.dumps(result))
    return 0
