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
# # Lesson 4: data parallelism and ZeRO
#
# **Prerequisites.** Lesson 1 (a training step: forward, backward, gradients, AdamW) and lesson
# 2 (allreduce = reduce-scatter + allgather, bytes on the wire per rank, the alpha-beta model).
#
# **You will be able to** explain why data-parallel ranks *sum* their gradients, check a layout
# against the serial run, predict the memory per rank of ZeRO stages 1-3 from the paper's
# formulas and the bytes each stage moves, and choose a bucket size for overlapping the sync.
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
import matplotlib.pyplot as plt
import numpy as np

from minipar.compare import mismatches, random_batches, serial_reference, train_layout
from minipar.config import ModelConfig, ParallelConfig
from minipar.dist.comm import run_threads
from minipar.lessons import save_figure, short_run_note

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
assert not mismatches(dp4, serial, 1e-9)

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
dp_wire = step["dp"]["allreduce"]["wire_bytes"]
assert dp_wire == 2 * 3 * n_params * 8 // 4

# %% [markdown]
# ### Break it: average the ranks' mean losses
#
# The tempting alternative is for each rank to divide its loss by its *own* number of scored
# tokens, and then average the ranks' gradients. That is the mean of the ranks' means, and it
# equals the global mean only when every rank scores the same number of tokens. Here some
# targets are ignored (padding, or the prompt of a task), so the two halves of the batch score
# different numbers of tokens. minipar's tests compare every layout with the serial run; this
# is the report they would give:

# %%
from minipar.compare import RunResult  # noqa: E402
from minipar.dist.mesh import Mesh  # noqa: E402
from minipar.engine import Engine  # noqa: E402


x0, y0 = batches[0]
y0 = y0.copy()
y0[4:, :4] = -100  # rank 1's sequences score fewer tokens (say, longer prompts)


def one_step(world, own_mean):
    mesh = Mesh(world, dp=2)
    engine = Engine(cfg, ParallelConfig(dp=2), mesh, dtype="float64", lr=1e-2,
                    weight_decay=0.01, grad_clip=1.0)  # train_layout's settings
    rows = slice(0, 4) if mesh.dp_rank == 0 else slice(4, 8)
    mine, everyone = int((y0[rows] >= 0).sum()), int((y0 >= 0).sum())
    # BUG when own_mean: divide by this rank's own tokens (x dp: the sum of the ranks'
    # gradients is then the mean of their mean-loss gradients)
    loss = engine.train_step(x0[rows], y0[rows], mine * 2 if own_mean else everyone).loss
    return mine, RunResult([loss], engine.full_params(), engine.full_params(grads=True))


reference = serial_reference(cfg, [(x0, y0)])
(tokens0, broken), (tokens1, _) = run_threads(lambda w: one_step(w, own_mean=True), 2)
right = run_threads(lambda w: one_step(w, own_mean=False), 2)[0][1]
report = mismatches(broken, reference, 1e-9)
print(f"scored tokens: rank 0 {tokens0}, rank 1 {tokens1}")
print("global normaliser:", mismatches(right, reference, 1e-9) or "no differences")
print("mean of means:    \n  " + "\n  ".join(report[:4])
      + f"\n  ... {len(report)} differences from the serial run")
assert tokens0 != tokens1 and report and not mismatches(right, reference, 1e-9)

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
assert not mismatches(acc, serial, 1e-9) and all(c["dp"]["allreduce"]["calls"] == 1
                                                 for c in acc.comm)

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
print(f"{'layout':7s} {'mismatches':>10s}  dp traffic per step, per rank: calls x op, bytes on "
      "the wire")
print(f"{'DP':7s} {'[]':>10s}  1 x allreduce {dp_wire:,d} B")
wire = {0: dp_wire}
for zero in (1, 2, 3):
    par = ParallelConfig(dp=4, zero=zero, microbatches=2)
    res = run_threads(lambda w: train_layout(w, cfg, par, batches), par.world)[0]
    ops = res.comm[0]["dp"]
    wire[zero] = sum(s["wire_bytes"] for s in ops.values())
    calls = " + ".join(f"{s['calls']} x {op} {s['wire_bytes']:,d} B" for op, s in ops.items())
    print(f"ZeRO-{zero:<2d} {str(mismatches(res, serial, 1e-9)):>10s}  {calls} = {wire[zero]:,d} B")
    assert not mismatches(res, serial, 1e-9)
assert wire[1] == wire[2] == wire[0]  # 7,232 parameters: dp = 4 divides them, no padding
print(f"ZeRO-3 moves {wire[3] / wire[0]:.2f}x the bytes of plain data parallelism with "
      f"{par.microbatches} microbatches")
assert abs(wire[3] / wire[0] - 1.5 * par.microbatches) < 0.05

# %% [markdown]
# (`CommStats` records two numbers per call: `bytes`, the size of the array passed in, and
# `wire_bytes`, what this rank sends with the bandwidth-optimal ring of lesson 2. Compare wire
# bytes: an allreduce's array is the whole gradient, a reduce-scatter's too, but the
# reduce-scatter sends half as much.)
#
# ZeRO-1 and 2 move exactly the bytes of plain data parallelism: the reduce-scatter of the
# padded gradient and the allgather of the padded parameters each send (p-1)/p x n per rank,
# together 2(p-1)/p x n, one allreduce. ZeRO-3 gathers the parameters twice per microbatch
# (forward and backward) and reduce-scatters the gradients once per microbatch: 1.5x the bytes
# per microbatch, so 3x here with 2 microbatches.
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
    assert [mem[zero][k] for k in kinds] == expect

fig, ax = plt.subplots(figsize=(7, 3.5))
bottom = np.zeros(4)
for kind, colour in zip(kinds, ("tab:blue", "tab:orange", "tab:green")):
    values = np.array([mem[z][kind] for z in range(4)]) / 1024
    ax.bar(range(4), values, bottom=bottom, color=colour, label=f"{kind} (measured)")
    bottom += values
ax.hlines([sum(formula(z)) * B / 1024 for z in range(4)], np.arange(4) - 0.4,
          np.arange(4) + 0.4, colors="k", lw=2, label="ZeRO formula, total")
ax.set_xticks(range(4), [f"ZeRO-{z}" for z in range(4)])
ax.set_xlabel("stage (what a rank keeps between steps)")
ax.set_ylabel("KiB per rank")
ax.set_title(f"model states per rank: dp={DP}, {formula(0)[0]:,d} parameters, AdamW, float64")
ax.legend()
fig.tight_layout()
save_figure(fig, "04", "zero_memory.png")

# %% [markdown]
# From 4 Psi b to about 4 Psi b / dp. What this chart leaves out is *activation* memory, which
# ZeRO does not touch (lessons 6 and 7 do), and the buffers that live only *during* a step:
# ZeRO-3's gathered unit while it runs, and ZeRO-2's full gradient.
#
# ### Between steps is not the peak: ZeRO-2's gradient
#
# `memory()` reports what a rank keeps *between* steps. Within a step, minipar's ZeRO-2 still
# needs somewhere for backward to add the full gradient: it allocates the full flat gradient
# at the start of the step and drops it once the reduce-scatter has filled the rank's shard.
# So at the moment of the sync a ZeRO-2 rank holds the full gradient *and* its shard: its peak
# gradient memory is ZeRO-1's plus 1/dp, and the saving is between steps only. (The paper's
# stage 2 goes further: it reduces each bucket as soon as backward has produced it and frees
# it, so the full gradient never exists at once.) Let us measure the gradient buffers a rank
# holds right when `sync_grads` starts:

# %%
def grad_bytes_held(dp):
    """The gradient buffers a rank holds now: the full flat gradient while it exists, and
    ZeRO-2's shard."""
    held = (dp.flat_grad, getattr(dp, "grad_shard", None))
    return sum(int(a.nbytes) for a in held if a is not None)


def grad_peak(zero):
    def rank(world):
        engine = Engine(big, ParallelConfig(dp=DP, zero=zero), Mesh(world, dp=DP),
                        dtype="float64")
        at_sync, sync = [], engine.dp.sync_grads

        def sync_grads():
            at_sync.append(grad_bytes_held(engine.dp))
            sync()
        engine.dp.sync_grads = sync_grads
        x, y = random_batches(big, 1, B, seed=1)[0]
        rows = slice(engine.mesh.dp_rank * 2, engine.mesh.dp_rank * 2 + 2)
        engine.train_step(x[rows], y[rows], float((y >= 0).sum()))
        return at_sync[0], engine.memory()["grads"]
    return run_threads(rank, DP)[0]


print(f"{'stage':>5} {'grads at the sync (peak)':>25} {'grads between steps':>20}")
peak = {}
for zero in (0, 1, 2):
    peak[zero], between = grad_peak(zero)
    print(f"{zero:5d} {peak[zero]:25,d} {between:20,d}")
full = formula(1)[1] * B
assert peak[1] == full and peak[2] == full + full // DP and mem[2]["grads"] == full // DP
print(f"ZeRO-2 holds {peak[2] / peak[1]:.2f}x ZeRO-1's gradient bytes at the sync and "
      f"{mem[2]['grads'] / mem[1]['grads']:.2f}x between steps.")
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
order = [what for what, _, _ in events]
last_start = order.index("backward start", order.index("backward end"))
assert all(last_start < i < len(order) - 1 for i, w in enumerate(order) if w.startswith("bucket"))

# %% [markdown]
# All buckets start inside the last microbatch's backward, in order from the end of the model;
# the same bytes as one big allreduce, in more calls. On a real cluster the early buckets travel
# while the GPU computes the first layers' gradients. The bucket size trades the two costs of
# lesson 2: too small and each call pays the latency alpha, too large and the first bucket is
# ready too late to overlap. (ZeRO-1/2 reduce-scatter their buckets the same way; ZeRO-3 already
# reduces each unit's gradients right after its backward.)
#
# ### Try: the bucket size
#
# The flat gradient is cut into ceil(gradient bytes / bucket bytes) near-equal buckets. Halve
# the bucket and expect about twice the calls for the same total bytes; make it larger than
# the gradient and expect one call. Change `BUCKET_MB` and check.

# %%
BUCKET_MB = 0.1  # Try: 0.5, 4
grad_bytes = formula(0)[1] * B
par = ParallelConfig(dp=2, microbatches=2, bucket_mb=BUCKET_MB)
_, stats_try = run_threads(watch, 2)[0]
expect = max(1, int(np.ceil(grad_bytes / (BUCKET_MB * 2**20))))
print(f"{BUCKET_MB} MiB buckets: {stats_try['allreduce']['calls']} allreduces of "
      f"{stats_try['allreduce']['bytes']:,d} B in all; expected {expect} calls")
assert stats_try["allreduce"]["calls"] == expect
assert stats_try["allreduce"]["bytes"] == grad_bytes

# %% [markdown]
# ### Try: more ranks, and more microbatches
#
# With dp = 8, ZeRO-1's optimizer state per rank should be K Psi' / 8 b: half of dp = 4's.
# And gradient accumulation with 4 microbatches per rank still makes one allreduce per step.

# %%
DP_TRY = 8  # Try: 2, 16


def optimizer_bytes(dp):
    def rank(world):
        par = ParallelConfig(dp=dp, zero=1)
        return Engine(big, par, Mesh(world, dp=dp), dtype="float64").memory()["optimizer"]
    return run_threads(rank, dp)[0]


psi = formula(0)[0]
padded = -(-psi // DP_TRY) * DP_TRY
got = optimizer_bytes(DP_TRY)
print(f"dp={DP_TRY}: optimizer {got:,d} B per rank, formula {2 * padded // DP_TRY * B:,d} B")
assert got == 2 * padded // DP_TRY * B

par = ParallelConfig(dp=2, microbatches=4)  # Try: 1, 2, 4 (each rank has 4 rows)
acc4 = run_threads(lambda w: train_layout(w, cfg, par, batches), par.world)[0]
calls = [c["dp"]["allreduce"]["calls"] for c in acc4.comm]
print(f"{par.microbatches} microbatches: mismatches {mismatches(acc4, serial, 1e-9)}, "
      f"allreduces per step {calls}")
assert calls == [1] * len(batches) and not mismatches(acc4, serial, 1e-9)
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
print(short_run_note(out))

# %% [markdown]
# ## 6. Fine-tuning: start from a checkpoint, freeze what you keep
#
# Fine-tuning trains a model that has already been trained, often on another task. minipar's
# checkpoints hold every full tensor by name, so weights saved by *any* layout can start a new
# run in any other: `python -m minipar.train --init-from RUN_DIR` cuts each rank's shard out of
# them, with a fresh optimizer (zero moments, step 0) and a fresh learning-rate schedule (unlike
# `--resume`, which continues a run). `--freeze embed,blocks.0` keeps those parameters fixed.
#
# What does freezing change for data parallelism? A frozen parameter never leaves its rank: no
# gradient buffer, no allreduce, no optimizer state. Every rank holds it whole, also under ZeRO,
# and it stays right on every rank because nothing ever writes it. Below: weights trained at
# dp = 2 with ZeRO-3 (the full tensors a checkpoint would hold) fine-tuned at dp = 2 with ZeRO-1
# on other batches, with the embedding and the first block frozen, against the serial
# fine-tuning run.

# %%
from minipar.nn.module import matches_prefix  # noqa: E402

zero3 = ParallelConfig(dp=2, zero=3)
pretrained = run_threads(lambda w: train_layout(w, cfg, zero3, batches), 2)[0].params
other = random_batches(cfg, steps=3, batch=8, seed=1)  # "another task": other batches
freeze = ("embed", "blocks.0")
zero1 = ParallelConfig(dp=2, zero=1)
tuned = run_threads(lambda w: train_layout(w, cfg, zero1, other, init=pretrained,
                                           freeze=freeze), 2)[0]
serial_tuned = serial_reference(cfg, other, init=pretrained, freeze=freeze)
frozen = [n for n in pretrained if any(matches_prefix(n, f) for f in freeze)]
print(f"frozen: {len(frozen)} tensors; unchanged after 3 steps: "
      f"{all(np.array_equal(tuned.params[n], pretrained[n]) for n in frozen)}; "
      f"mismatches against serial: {mismatches(tuned, serial_tuned, 1e-9)}")
assert all(np.array_equal(tuned.params[n], pretrained[n]) for n in frozen)
assert not mismatches(tuned, serial_tuned, 1e-9)

# %% [markdown]
# The gradient traffic is the trained parameters' alone. ZeRO-1 reduce-scatters the flat
# gradient padded to a multiple of dp, 8 bytes per float64 element (the `dp` group's bytes of
# one step, as `CommStats` recorded them):

# %%
n_all = sum(a.size for a in pretrained.values())
n_trained = n_all - sum(pretrained[n].size for n in frozen)
moved = tuned.comm[0]["dp"]["reduce_scatter"]["bytes"]
print(f"{n_trained:,} of {n_all:,} parameters trained: reduce-scatter {moved:,} B per step "
      f"= 8 x {moved // 8:,}")
assert moved == 8 * (-(-n_trained // 2) * 2)

# %% [markdown]
# **Try:** freeze the second block too (`("embed", "blocks")`). Predict the bytes before you
# run it: only the positions, the final LayerNorm and the head are left. The cell checks you.

# %%
more_frozen = ("embed", "blocks")
left = sum(a.size for n, a in pretrained.items()
           if not any(matches_prefix(n, f) for f in more_frozen))
more = run_threads(lambda w: train_layout(w, cfg, zero1, other[:1], init=pretrained,
                                          freeze=more_frozen), 2)[0]
print(f"{left:,} parameters left to train: reduce-scatter "
      f"{more.comm[0]['dp']['reduce_scatter']['bytes']:,} B")
assert more.comm[0]["dp"]["reduce_scatter"]["bytes"] == 8 * (-(-left // 2) * 2)

# %% [markdown]
# **Break it:** fine-tune from a checkpoint whose vocabulary differs. The command compares the
# checkpoint with the model its flags build, tensor by tensor, before any collective, and says
# which tensor differs and both shapes, in one line. Here a checkpoint of this lesson's model
# (16 tokens) meets a text file (256 byte values). A vocabulary is never re-initialised
# silently; a task with fewer tokens than the checkpoint fits it with `--vocab 16`.

# %%
import shutil  # noqa: E402
import tempfile  # noqa: E402
from dataclasses import asdict  # noqa: E402

from minipar import checkpoint  # noqa: E402
from minipar.dist.comm import local_comm  # noqa: E402
from minipar.train.cli import main  # noqa: E402

run_dir = tempfile.mkdtemp(prefix="minipar-lesson04-")
checkpoint.write(run_dir, 3, pretrained, {}, {
    "model": asdict(cfg), "layout": asdict(zero3), "optimizer_steps": 3, "run_id": "lesson",
    "task": "random", "seed": 0, "optimizer": "adamw", "dtype": "float64"})
text = f"{run_dir}/book.txt"
with open(text, "w") as fh:
    fh.write("the quick brown fox jumps over the lazy dog. " * 4)
code = main(["--data", text, "--seq-len", "8", "--d-model", "16", "--heads", "2",
             "--init-from", run_dir, "--quiet"], world=local_comm())
assert code == 2  # the one line above (on stderr) names embed.w, (16, 16) and (256, 16)
shutil.rmtree(run_dir)

# %% [markdown]
# **Takeaways.** Data parallelism is the serial run: sum the ranks' gradients of a globally
# normalized loss. Gradient accumulation adds microbatches without adding syncs. ZeRO turns the
# allreduce into reduce-scatter + allgather and keeps only a 1/dp slice of the optimizer state
# (stage 1), gradients (2) and parameters (3), for the same bytes (stages 1-2) or 1.5x per
# microbatch (stage 3).
# Buckets overlap the sync with the backward pass. Fine-tuning starts from any layout's
# checkpoint; frozen parameters cost no gradient traffic and no optimizer state.
