# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Lesson 3: data parallelism and ZeRO
#
# Data parallelism is the first thing anyone does with a second GPU: every rank holds the whole
# model, takes a different slice of the batch, and the ranks sum their gradients before the
# optimizer step. In this lesson we
#
# 1. check that it is *exactly* the serial run, number for number,
# 2. add gradient accumulation (several microbatches per step, one sync),
# 3. cut the memory per rank with ZeRO stages 1, 2 and 3 (Rajbhandari et al. 2019) and measure
#    it against the paper's formulas, with the bytes each stage moves, and
# 4. overlap the gradient sync with the backward pass by sending it in buckets.

# %%
import os
import tempfile

import matplotlib.pyplot as plt
import numpy as np

from minipar.compare import mismatches, random_batches, serial_reference, train_layout
from minipar.config import ModelConfig, ParallelConfig
from minipar.dist.comm import run_threads

out_dir = tempfile.mkdtemp(prefix="minipar-lesson3-")
cfg = ModelConfig(vocab_size=16, seq_len=8, n_layers=2, d_model=16, n_heads=2)
batches = random_batches(cfg, steps=3, batch=8, seed=0)  # 3 global batches of 8 sequences

# %% [markdown]
# ## 1. Data parallel == serial
#
# `train_layout(world, cfg, par, batches)` trains on any layout and returns the loss of each
# step and the full parameters and gradients at the end; `serial_reference` is the same call on
# one rank. With dp=4 each rank gets 2 of the 8 sequences.
#
# Why the ranks *sum* their gradients instead of averaging them: each rank's loss is already
# divided by the number of scored tokens in the whole *global* batch, so the sum of the four
# ranks' gradients is the gradient of the serial mean loss, not four times it.

# %%
serial = serial_reference(cfg, batches)
par = ParallelConfig(dp=4)
dp4 = run_threads(lambda w: train_layout(w, cfg, par, batches), par.world)[0]
print("serial losses:", np.round(serial.losses, 12))
print("dp=4 losses:  ", np.round(dp4.losses, 12))
worst = max(np.abs(dp4.params[k] - v).max() / np.abs(v).max() for k, v in serial.params.items())
print(f"largest relative difference in any parameter after 3 steps: {worst:.1e}")
print("mismatches at rtol 1e-9:", mismatches(dp4, serial, 1e-9))

# %% [markdown]
# The differences are float64 rounding (the sum over ranks adds in another order). What did each
# step cost? `RunResult.comm` holds each step's `CommStats` by group: one allreduce of every
# gradient over the dp group (plus 16 bytes over the world: the loss and the squared gradient
# norm for clipping).

# %%
n_params = sum(v.size for v in serial.params.values())
step = dp4.comm[0]
print(f"parameters: {n_params}, gradient bytes: {n_params * 8}")
for group, ops in step.items():
    for op, s in ops.items():
        print(f"  {group:5s} {op:10s} calls {s['calls']}  bytes {s['bytes']:>7,d}  "
              f"wire bytes per rank {s['wire_bytes']:>7,d}")
print("ring theory, 2 (p-1)/p x bytes:", 2 * 3 * n_params * 8 // 4)

# %% [markdown]
# ## 2. Gradient accumulation
#
# A batch that does not fit in memory is split into microbatches: forward and backward one at a
# time, gradients *added* into `Param.grad` (minipar's modules always add; zeroing is explicit),
# and one sync at the end. dp=2 with 2 microbatches of 2 sequences is again the serial run, and
# still one allreduce per step:

# %%
par = ParallelConfig(dp=2, microbatches=2)
acc = run_threads(lambda w: train_layout(w, cfg, par, batches), par.world)[0]
print("mismatches:", mismatches(acc, serial, 1e-9))
print("dp allreduce calls per step:", [c["dp"]["allreduce"]["calls"] for c in acc.comm])

# %% [markdown]
# ## 3. ZeRO: stop storing everything dp times
#
# With AdamW each parameter costs its value, its gradient and two moments: 4 numbers, all
# replicated on every rank. ZeRO shards them over the dp group. Every rank lays its parameters
# out in one flat buffer, padded to a multiple of dp, and owns the r-th slice:
#
# - **stage 1** shards the optimizer state. The gradient sync becomes a *reduce-scatter* (rank r
#   gets the summed slice r, half the bytes of an allreduce), rank r updates its slice with the
#   same AdamW arithmetic, and an *allgather* rebuilds the full parameters. Same bytes as one
#   allreduce, a quarter of the optimizer memory at dp=4.
# - **stage 2** also keeps only the gradient slice after the reduce-scatter.
# - **stage 3** also shards the parameters: between uses a layer holds nothing; each unit (the
#   embedding, each block, the head) is allgathered just before its forward and again before
#   its backward, and its gradients are reduce-scattered right after its backward.
#
# Every stage is still the serial run:

# %%
for zero in (1, 2, 3):
    par = ParallelConfig(dp=4, zero=zero, microbatches=2)
    res = run_threads(lambda w: train_layout(w, cfg, par, batches), par.world)[0]
    dp_ops = {op: (s["calls"], s["bytes"]) for op, s in res.comm[0]["dp"].items()}
    print(f"ZeRO-{zero}: mismatches {mismatches(res, serial, 1e-9)}  dp traffic per step "
          f"(calls, bytes) {dp_ops}")

# %% [markdown]
# ZeRO-1 and 2 move exactly the bytes of plain data parallelism (the padded gradient once in the
# reduce-scatter, the padded parameters once in the allgather: together one allreduce). ZeRO-3
# gathers the parameters twice per microbatch (forward and backward) and reduce-scatters the
# gradients once per microbatch: 1.5x the bytes per microbatch, so 3x here with 2 microbatches.
#
# ### Memory per rank, measured against the formula
#
# `engine.memory()` reports the bytes a rank keeps across steps, measured from the arrays it
# holds. The ZeRO paper's formulas (section 5.1), with Psi the parameters of a rank, b bytes per
# number, K = 2 for AdamW's moments and Psi' = Psi padded to a multiple of dp:
#
# | stage | parameters | gradients | optimizer |
# |---|---|---|---|
# | 0 | Psi b | Psi b | K Psi b |
# | 1 | Psi' b | Psi' b | K Psi'/dp b |
# | 2 | Psi' b | Psi'/dp b | K Psi'/dp b |
# | 3 | S b | S b | K S b |
#
# where S = sum over units of ceil(n_unit / dp), because stage 3 pads each unit on its own.

# %%
from minipar.dist.mesh import Mesh  # noqa: E402
from minipar.engine import Engine  # noqa: E402
from minipar.sim.costmodel import units  # noqa: E402

big = ModelConfig(vocab_size=64, seq_len=16, n_layers=4, d_model=64, n_heads=4)
DP, B = 4, 8


def measured(zero):
    def rank(world):
        par = ParallelConfig(dp=DP, zero=zero)
        return Engine(big, par, Mesh(world, dp=DP), dtype="float64").memory()
    return run_threads(rank, DP)[0]


def formula(zero, k=2):
    sizes = [u.params for chunk in units(big, ParallelConfig(dp=DP), 0) for u in chunk]
    psi = sum(sizes)
    full = -(-psi // DP) * DP
    shard = sum(-(-n // DP) for n in sizes)
    return {0: (psi, psi, k * psi), 1: (full, full, k * full // DP),
            2: (full, full // DP, k * full // DP), 3: (shard, shard, k * shard)}[zero]


kinds = ("params", "grads", "optimizer")
print(f"{'stage':>5} " + " ".join(f"{k + ' (measured / formula)':>34}" for k in kinds))
mem = {}
for zero in range(4):
    mem[zero] = measured(zero)
    expect = [n * B for n in formula(zero)]
    print(f"{zero:5d} " + " ".join(f"{mem[zero][k]:>16,d} / {e:<15,d}"
                                   for k, e in zip(kinds, expect)))

fig, ax = plt.subplots(figsize=(7, 3.5))
bottom = np.zeros(4)
for kind, colour in zip(kinds, ("tab:blue", "tab:orange", "tab:green")):
    values = np.array([mem[z][kind] for z in range(4)]) / 1024
    ax.bar(range(4), values, bottom=bottom, color=colour, label=f"{kind} (measured)")
    bottom += values
ax.plot(range(4), [sum(formula(z)) * B / 1024 for z in range(4)], "k_", markersize=40,
        mew=2, label="ZeRO formula, total")
ax.set_xticks(range(4), [f"ZeRO-{z}" for z in range(4)])
ax.set_ylabel("KiB per rank")
ax.set_title(f"model states per rank: dp={DP}, {formula(0)[0]:,d} parameters, AdamW, float64")
ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(out_dir, "zero_memory.png"), dpi=120)
plt.show()

# %% [markdown]
# From 4 Psi b to about 4 Psi b / dp. What this chart leaves out is *activation* memory, which
# ZeRO does not touch (lessons 5 and 6 do), and ZeRO-3's transient buffers: the unit being
# gathered lives only while it runs.
#
# ## 4. Overlapping the sync with backward: buckets
#
# Plain data parallelism waits for the whole backward pass, then sends all gradients at once:
# the network idles during backward and the GPUs idle during the sync. But backward produces
# gradients from the last layer to the first, so the last layers' gradients could be on their
# way while earlier layers still compute. `--bucket-mb` does that: the flat gradient buffer is
# cut into buckets from its end, and each bucket starts a non-blocking allreduce (`iallreduce_`)
# the moment every parameter in it has its final gradient; `sync_grads` only waits. With
# microbatches, buckets launch only during the last microbatch's backward.
#
# Let's watch when the buckets start, relative to the backward pass of each microbatch:

# %%
import time  # noqa: E402

par = ParallelConfig(dp=2, microbatches=2, bucket_mb=0.25)  # buckets of at most 256 KiB


def watch(world):
    mesh = Mesh(world, dp=2)
    engine = Engine(big, par, mesh, dtype="float64")
    engine.dp.microbatches = par.microbatches  # known up front, so step 1 overlaps too
    events, t0 = [], time.perf_counter()
    chunk, launch = engine.chunks[0], mesh.dp.iallreduce_

    def backward(dy=None, mb=0, _orig=chunk.backward, **kw):
        events.append(("backward start", mb, time.perf_counter() - t0))
        out = _orig(dy, mb, **kw)
        events.append(("backward end", mb, time.perf_counter() - t0))
        return out

    def iallreduce_(x, op="sum"):
        events.append((f"bucket of {x.nbytes:,d} B", None, time.perf_counter() - t0))
        return launch(x, op)
    chunk.backward, mesh.dp.iallreduce_ = backward, iallreduce_
    x, y = random_batches(big, 1, B, seed=1)[0]
    rows = slice(0, 4) if mesh.dp_rank == 0 else slice(4, 8)
    engine.train_step(x[rows], y[rows], float((y >= 0).sum()))
    return events, mesh.dp.stats.as_dict()


events, stats = run_threads(watch, 2)[0]
for what, mb, t in events:
    print(f"{t * 1e3:7.2f} ms  {what}" + ("" if mb is None else f" (microbatch {mb})"))
print("dp traffic:", {op: (s["calls"], s["bytes"]) for op, s in stats.items()})

# %% [markdown]
# All buckets start inside the last microbatch's backward, in order from the end of the model;
# the same bytes as one big allreduce, in more calls. On a real cluster the early buckets travel
# while the GPU computes the first layers' gradients. The bucket size trades the two costs of
# lesson 2: too small and each call pays the latency alpha, too large and the first bucket is
# ready too late to overlap. (ZeRO-1/2 reduce-scatter their buckets the same way; ZeRO-3 already
# reduces each unit's gradients right after its backward.)
#
# ## 5. The same on real processes
#
# Everything above ran as threads. The training command runs the same engine as one process per
# rank; with no layout flags all ranks do data parallelism. Here ZeRO-3 on 2 ranks, with its
# memory line:

# %%
from minipar.lessons import mpirun  # noqa: E402

out = mpirun(2, ["-m", "minipar.train", "--model", "tiny", "--zero", "3", "--steps", "20",
                 "--eval-every", "20", "--quiet"], stream=False, timeout=120)
print("\n".join(ln for ln in out.splitlines() if ln.startswith(("minipar", "memory", "done"))))

# %% [markdown]
# **Takeaways.** Data parallelism is the serial run: sum the ranks' gradients of a globally
# normalized loss. Gradient accumulation adds microbatches without adding syncs. ZeRO turns the
# allreduce into reduce-scatter + allgather and keeps only a 1/dp slice of the optimizer state
# (stage 1), gradients (2) and parameters (3), for the same bytes (stages 1-2) or 1.5x per
# microbatch (stage 3).
# Buckets overlap the sync with the backward pass.
