"""``python -m minipar.bench --profile``: where a training step's wall time goes, kernel by kernel.

cProfile sees only the thread that runs it, and half of a step's work runs on the rank's kernel
worker threads (``minipar.nn.threads``), so its table shows the main thread waiting. This
profiler instead wraps each kernel of ``minipar.nn.functional``, the optimizer's update and the
vocabulary cross-entropy in a wall-clock timer while whole steps run. Only the outermost timed
call counts (``mha_fwd`` calls ``attention_fwd``: the time is mha_fwd's), so the rows add up to
at most the step, and "other" is the rest: residual adds, gradient bookkeeping, Python.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

KERNELS = ("linear_fwd", "linear_bwd_input", "linear_bwd_weight", "mha_fwd", "mha_bwd",
           "attention_fwd", "attention_bwd", "cross_attention_fwd", "cross_attention_bwd",
           "layernorm_fwd", "layernorm_bwd", "gelu_fwd", "gelu_bwd", "embedding_fwd",
           "embedding_bwd", "cross_entropy_fwd", "cross_entropy_bwd")


@contextmanager
def kernel_timers():
    """Time the kernels while the block runs; yields {name: [seconds, calls]}, filled as they
    run. The original functions are restored on exit, also after an exception."""
    from minipar.nn import functional as F
    from minipar.nn import optim
    from minipar.parallel.tensor import VocabParallelCrossEntropy as CE

    spent: dict = defaultdict(lambda: [0.0, 0])
    depth = [0]

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            if depth[0]:  # inside another timed kernel: counted there
                return fn(*args, **kwargs)
            depth[0] += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name][0] += time.perf_counter() - t0
                spent[name][1] += 1
                depth[0] -= 1
        return wrapper

    targets = [(F, name, name) for name in KERNELS]  # a name F lacks fails here, loudly
    targets += [(optim, "adamw_update", "adamw_update"), (optim, "sgd_update", "sgd_update"),
                (CE, "forward", "vocab_cross_entropy_fwd"),
                (CE, "backward", "vocab_cross_entropy_bwd")]
    saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]
    try:
        for owner, attr, label in targets:
            setattr(owner, attr, timed(label, getattr(owner, attr)))
        yield spent
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def profile_step(step, n: int, warmup: int = 2) -> dict:
    """Run ``step`` (a ``bench.step.MiniparStep``) ``warmup`` times, then ``n`` times under the
    timers: the mean step and each kernel's mean seconds and calls per step."""
    for _ in range(warmup):
        step()
    with kernel_timers() as spent:
        total = sum(step()[0] for _ in range(n))
    kernels = {k: {"s": v[0] / n, "calls": v[1] / n} for k, v in spent.items()}
    return {"step_s": total / n, "kernels": kernels,
            "other_s": total / n - sum(k["s"] for k in kernels.values())}


def format_profile(prof: dict, top: int = 12) -> str:
    step = prof["step_s"]
    rows = sorted(prof["kernels"].items(), key=lambda kv: -kv[1]["s"])[:top]
    lines = [f"where the step's {step * 1e3:.0f} ms go (wall time per step, outermost kernel "
             "calls):", f"{'kernel':26s} {'ms':>8s} {'share':>6s} {'calls':>6s}"]
    for name, k in rows:
        lines.append(f"{name:26s} {k['s'] * 1e3:8.1f} {k['s'] / step:6.0%} {k['calls']:6.0f}")
    lines.append(f"{'other':26s} {prof['other_s'] * 1e3:8.1f} {prof['other_s'] / step:6.0%}")
    return "\n".join(lines)


__all__ = ["kernel_timers", "profile_step", "format_profile", "KERNELS"]
