"""The probes behind ``python -m minipar.bench --measure-hardware``, run in fresh processes.

Everything the time model (``minipar.sim``) needs to know, one BLAS thread per process: the
GEMM rate at the model's shapes and that of attention's batched products, the rate each family
of NumPy elementwise kernels achieves (bytes counted as the cost model counts them), whether
freed memory must be faulted in again and at what rate, the Python + NumPy overhead per kernel
(``--local``: one process), and allreduce latency and bandwidth (``--comm-probe``: every rank
of ``mpirun -n N``). ``minipar.bench.validate.measure_hardware`` launches them and writes the
hardware JSON that ``python -m minipar.simulate --hardware this-machine --hardware-file FILE``
reads (``Hardware.from_bench_json``).

Times are process CPU seconds, each rate the best of a few rounds, so that other users of a
shared machine disturb them as little as possible; ``python -m minipar.bench --validate``
explains why the same clock measures the real runs.
"""

from __future__ import annotations

from minipar.dist.launch import configure_threads

if __name__ == "__main__":
    configure_threads()  # before NumPy: the probe must run as the training ranks do

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402


@dataclass(frozen=True)
class Workload:
    """The model and batch every layout trains: the ``small`` preset, cut down to stay quick
    while GEMMs still dominate Python overhead."""

    layers: int = 2
    d_model: int = 384
    heads: int = 6
    seq_len: int = 128
    vocab: int = 256
    batch_size: int = 8

    def model(self):
        from minipar.config import MODEL_PRESETS, replace
        return replace(MODEL_PRESETS["small"], n_layers=self.layers, d_model=self.d_model,
                       n_heads=self.heads, seq_len=self.seq_len, vocab_size=self.vocab,
                       tie_weights=False)

    def train_args(self, data: str, steps: int, summary: str) -> list[str]:
        return ["-m", "minipar.train", "--task", "text", "--data", data, "--model", "small",
                "--layers", str(self.layers), "--d-model", str(self.d_model), "--heads",
                str(self.heads), "--seq-len", str(self.seq_len), "--vocab", str(self.vocab),
                "--batch-size", str(self.batch_size), "--steps", str(steps), "--eval-every",
                str(steps), "--quiet", "--threads", "1", "--summary", summary]



def cores() -> int:
    """Cores this process may run on (what ranks share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# ------------------------------------------------------------------- one-process probes
def cpu_seconds(fn, reps: int = 5, before=None) -> float:
    """Mean process CPU seconds of one ``fn()`` over ``reps`` calls, after a warm-up call;
    ``before()`` runs untimed ahead of each call.

    A mean, like the real runs' per-step times; ``measure_hardware`` takes the best of a few
    such means, as ``bench_validate`` takes the least disturbed of a few runs."""
    fn()
    spent = 0.0
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.process_time()
        fn()
        spent += time.process_time() - t0
    return max(spent / reps, 1e-9)


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory (no trimming, no mmap per array), so that the kernel
    probes after this time arithmetic and memory traffic, not page faults, which
    ``measure_first_touch`` prices on their own. False where the C library is not glibc."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_trim_threshold, 1 << 30)
                    and libc.mallopt(m_mmap_threshold, 1 << 25))
    except (OSError, AttributeError):
        return False


def measure_gemm(work: Workload, reps: int = 3) -> float:
    """FLOP/s of the block's weight GEMMs (forward, input and weight gradient) at the largest
    and smallest microbatch the layouts use: total FLOPs over total time."""
    import numpy as np
    rng = np.random.default_rng(0)
    h, f = work.d_model, 4 * work.d_model
    flops = seconds = 0.0
    for n in (work.batch_size * work.seq_len, work.seq_len):
        for k, m in ((h, 3 * h), (h, h), (h, f), (f, h)):
            x = rng.standard_normal((n, k), dtype=np.float32)
            w = rng.standard_normal((k, m), dtype=np.float32)
            dy = rng.standard_normal((n, m), dtype=np.float32)
            for a, b in ((x, w), (dy, w.T), (x.T, dy)):
                seconds += cpu_seconds(lambda a=a, b=b: a @ b, reps)
                flops += 2.0 * n * k * m
    return flops / seconds


def measure_bmm(work: Workload, reps: int = 3) -> float:
    """FLOP/s of attention's six batched products (forward q k^T and p v, their gradients) on
    head views of a (b, s, 3h) projection, as ``minipar.nn.functional`` computes them."""
    import numpy as np

    from minipar.nn import functional as F
    rng = np.random.default_rng(0)
    s, h, a = work.seq_len, work.d_model, work.heads
    flops = seconds = 0.0
    for b in (max(1, work.batch_size // 4), work.batch_size):
        qkv = rng.standard_normal((b, s, 3 * h), dtype=np.float32)
        q, k, v = (F.split_heads(qkv[..., i * h:(i + 1) * h], a) for i in range(3))
        p = rng.standard_normal((b, a, s, s), dtype=np.float32)
        dy = rng.standard_normal(q.shape, dtype=np.float32)
        for x, y in ((q, k.swapaxes(-1, -2)), (p, v), (p.swapaxes(-1, -2), dy),
                     (dy, v.swapaxes(-1, -2)), (p, k), (p.swapaxes(-1, -2), q)):
            seconds += cpu_seconds(lambda x=x, y=y: x @ y, reps)
            flops += 2.0 * b * s * s * h
    return flops / seconds


def _family_kernels(work: Workload, b: int) -> dict:
    """The cost model's forward kernel of each elementwise family for b sequences."""
    from minipar.sim import kernels as K
    cfg = work.model()
    out: dict = {}
    for k in (K.block_forward(cfg, b, 1, False, 4, False) + K.embed_forward(cfg, b, 1, False, 4,
              False) + K.head_forward(cfg, b, 1, False, 4)):
        if k.cls == "elem":
            out.setdefault(k.family, k)
    return out


def _family_steps(work: Workload, b: int) -> dict:
    """One forward + backward of minipar's own kernels per family, as a layer runs them."""
    import numpy as np

    from minipar.dist.comm import local_comm
    from minipar.nn import functional as F
    from minipar.parallel.tensor import VocabParallelCrossEntropy
    rng = np.random.default_rng(0)
    n, s, h, a, v = b * work.seq_len, work.seq_len, work.d_model, work.heads, work.vocab

    def normal(*shape):
        return rng.standard_normal(shape, dtype=np.float32)
    x, dy, g, bias = normal(n, h), normal(n, h), np.ones(h, np.float32), np.zeros(h, np.float32)
    hf, bf = normal(n, 4 * h), np.zeros(4 * h, np.float32)
    scores, scale = normal(b, a, s, s), 1.0 / np.sqrt(h // a)
    ids, table = rng.integers(0, v, (b, s)), normal(v, h)
    logits, targets = normal(b, s, v), rng.integers(0, v, (b, s))
    loss = VocabParallelCrossEntropy(type("Ctx", (), {"tp": local_comm()})(), v)

    def layernorm():
        y, cache = F.layernorm_fwd(x, g, bias)
        F.layernorm_bwd(dy, cache)

    def residual():  # the projection's bias added in place, the skip add; backward: db
        x.__iadd__(bias)
        F.residual_fwd(x, dy)
        dy.sum(axis=0)

    def gelu():  # fc1's bias in place, GELU; backward: GELU's gradient and fc1's db
        hf.__iadd__(bf)
        y, cache = F.gelu_fwd(hf)
        F.gelu_bwd(y, cache).sum(axis=0)

    def softmax():  # scale, causal mask and softmax in place on the scores; backward
        scores.__imul__(scale)
        scores.__iadd__(F.causal_bias(s, scores.dtype))
        p, _ = F.softmax_fwd(scores, inplace=True)
        F.softmax_bwd(p, p).__imul__(scale)

    def embedding():
        y, cache = F.embedding_fwd(ids, table)
        F.embedding_bwd(y, cache)

    def cross_entropy():
        loss.forward(logits, targets, mb=0)  # shifts in place: the max stays 0
        loss.backward(1.0, mb=0)
    return {"layernorm": layernorm, "residual": residual, "gelu": gelu, "softmax": softmax,
            "embedding": embedding, "cross_entropy": cross_entropy}


def measure_elementwise(work: Workload, reps: int = 5, flush_bytes: int = 64 << 20) -> dict:
    """Achieved bytes/s per elementwise family: the cost model's bytes of a forward and its
    backward (2.5x forward) over the CPU time of minipar's kernels, at a quarter of the batch
    and the whole batch, each call on data evicted from the caches first (a step streams its
    activations through memory: far more than any cache holds). Fresh allocations are charged
    separately (``measure_first_touch``)."""
    import numpy as np

    from minipar.nn.optim import adamw_update
    total: dict = {}
    flush = np.zeros(flush_bytes // 4, np.float32)
    for b in (max(1, work.batch_size // 4), work.batch_size):
        kernels, steps = _family_kernels(work, b), _family_steps(work, b)
        for fam, fn in steps.items():
            t = cpu_seconds(fn, reps, before=lambda: flush.__iadd__(1.0))
            nb, tt = total.get(fam, (0.0, 0.0))
            total[fam] = (nb + 2.5 * kernels[fam].nbytes, tt + t)
    rates = {fam: nb / tt for fam, (nb, tt) in total.items()}
    p = np.ones(work.model().d_model ** 2 * 4, np.float32)  # a 4h x h matrix
    m, v, grad = np.zeros_like(p), np.zeros_like(p), np.full_like(p, 1e-3)
    t = cpu_seconds(lambda: adamw_update(p, grad, m, v, lr=1e-3, beta1=0.9, beta2=0.999,
                                         eps=1e-8, weight_decay=0.0, step=1), reps,
                    before=lambda: flush.__iadd__(1.0))
    rates["optimizer"] = 7 * 4 * p.size / t  # bytes as kernels.optimizer_time counts them
    return rates


def measure_stream(nbytes: int = 1 << 24, reps: int = 5) -> float:
    """Bytes/s of ``a *= b`` over warm arrays: the plain streaming rate."""
    import numpy as np
    a, b = np.ones(nbytes // 4, np.float32), np.ones(nbytes // 4, np.float32)
    return 3 * nbytes / cpu_seconds(lambda: a.__imul__(b), reps)


def measure_first_touch(total: int = 64 << 20, piece: int = 1 << 20, reps: int = 3) -> float:
    """Bytes/s at which this process's allocator hands out memory that must be faulted in
    again: allocate and fill ``total`` bytes in ``piece``-sized arrays, free them all (as a
    forward allocates activations and backward frees them), repeat; minus filling the same
    arrays kept. 0 when freed memory is reused (what ``minipar.dist.launch`` asks glibc for; by
    default glibc gives large blocks back to the OS and every step faults them in again).
    Call it before ``keep_freed_memory``, with the allocator as a training rank has it."""
    import numpy as np
    count = total // piece

    def fresh():
        for a in [np.empty(piece // 4, np.float32) for _ in range(count)]:
            a.fill(1.0)
    kept = [np.empty(piece // 4, np.float32) for _ in range(count)]

    def refill():
        for a in kept:
            a.fill(1.0)
    fill = cpu_seconds(refill, reps)
    extra = cpu_seconds(fresh, reps) - fill
    return total / extra if extra > fill else 0.0  # else within noise: memory is reused


def measure_op_latency(reps: int = 200) -> float:
    """Seconds of Python + NumPy overhead per cost-model kernel: tiny LayerNorm, GELU, softmax
    and linear passes (forward + backward: 9 kernels of the model) over 9."""
    import numpy as np

    from minipar.nn import functional as F
    x, g, w = np.ones((2, 8), np.float32), np.ones(8, np.float32), np.ones((8, 8), np.float32)

    def tiny():
        F.layernorm_bwd(x, F.layernorm_fwd(x, g, g)[1])
        F.gelu_bwd(x, F.gelu_fwd(x)[1])
        F.softmax_bwd(x, F.softmax_fwd(x)[0])
        F.linear_bwd(x, F.linear_fwd(x, w, g)[1])
    t0 = time.process_time()
    for _ in range(reps):
        tiny()
    return (time.process_time() - t0) / reps / 9


def comm_probe(nbytes: int = 4 << 20, small_reps: int = 200, big_reps: int = 10) -> dict:
    """Collective, under mpirun: ring allreduce latency per step and bandwidth on this world,
    fitted to the alpha-beta model the cost model uses, from quiet-machine times; the large
    message is ``nbytes`` (one activation), reduced in place: the transfer alone (a forward's
    collectives return fresh arrays; the cost model charges those as first touches)."""
    import numpy as np

    from minipar.dist.comm import MPIComm
    world = MPIComm.world()
    p, share = world.size, min(world.size, cores())

    def quiet(fn, reps):
        world.barrier()
        t0 = time.process_time()
        for _ in range(reps):
            fn()
        spent = time.process_time() - t0
        return sum(world.allgather_obj(spent)) / share / reps
    small, big = np.zeros(2, np.float32), np.zeros(nbytes // 4, np.float32)
    t_small = min(quiet(lambda: world.allreduce_(small), small_reps) for _ in range(3))
    t_big = min(quiet(lambda: world.allreduce_(big), big_reps) for _ in range(3))
    alpha = t_small / (2 * (p - 1))
    beta_time = max(t_big - 2 * (p - 1) * alpha, 1e-9)
    return {"ranks": p, "latency_s": alpha,
            "allreduce_bytes_per_s": 2 * (p - 1) / p * nbytes / beta_time,
            "allreduce_small_s": t_small, "allreduce_big_s": t_big, "big_bytes": nbytes}


def _best_rates(work: Workload, rounds: int) -> dict:
    """Every one-process rate, each the best of ``rounds`` passes over the whole set: a
    disturbance by another process spoils one pass of one probe, not the result."""
    best: dict = {}
    for _ in range(rounds):
        elem = measure_elementwise(work)
        rates = {"gemm_flops": measure_gemm(work), "bmm_flops": measure_bmm(work),
                 "mem_bytes_per_s": measure_stream(), "per_op_per_s": 1 / measure_op_latency(),
                 **{f"elem:{k}": v for k, v in elem.items()}}
        best = {k: max(v, best.get(k, 0.0)) for k, v in rates.items()}
    return best


def local_probe(work: Workload, rounds: int = 3) -> dict:
    """The one-process part of the hardware JSON, measured in this process (which should have
    one BLAS thread, as ``mpirun`` ranks get from ``minipar.dist.mpirun``)."""
    touch = measure_first_touch()  # first: with the allocator as the training ranks have it
    keep_freed_memory()
    best = _best_rates(work, rounds)
    elem = {k[5:]: v for k, v in best.items() if k.startswith("elem:")}
    data = {k: best[k] for k in ("gemm_flops", "bmm_flops", "mem_bytes_per_s")}
    data["first_touch_bytes_per_s"] = touch
    data.update(elem_bytes_per_s=elem, op_latency_s=1 / best["per_op_per_s"], cores=cores(),
                blas_threads=1, workload=asdict(work))
    return data


def main(argv=None) -> int:
    """The probes' processes: ``--local FILE`` (each rank measures alone and writes
    FILE.rank) or ``--comm-probe FILE`` (every rank of ``mpirun -n N`` together; rank 0
    writes FILE)."""
    p = argparse.ArgumentParser(prog="python -m minipar.bench.probe")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--local", metavar="FILE")
    what.add_argument("--comm-probe", metavar="FILE")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workload", default="{}", help="Workload fields as JSON")
    args = p.parse_args(argv)
    work, rank = Workload(**json.loads(args.workload)), os.environ.get("PMI_RANK", "0")
    if args.local:
        result, path = local_probe(work, args.rounds), f"{args.local}.{rank}"
    else:  # the large message: one activation of the whole batch
        result = comm_probe(work.batch_size * work.seq_len * work.d_model * 4)
        path = args.comm_probe if rank == "0" else None
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
