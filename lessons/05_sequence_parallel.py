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
# # Lesson 5: sequence parallelism — stop storing the same activations tp times
#
# Tensor parallelism (lesson 4) splits every matrix of a block over the tp group, but between
# the matrices it leaves work that every rank repeats on the whole (B, T, C) tensor: the two
# LayerNorms and the residual additions. Their activations are stored, identical, on every
# rank. Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
# Models") split those regions along the **sequence**: each rank keeps T/tp tokens there. In
# this lesson we
#
# 1. measure what one block keeps for its backward pass, tensor by tensor, under plain TP,
# 2. see how sequence parallelism replaces g and f with a reduce-scatter and an allgather,
# 3. measure the activation bytes per rank against tp, with and without sequence parallelism,
#    next to the exact formula for this model and the paper's table 2, and
# 4. check that training with sequence parallelism still equals the serial run.

# %%
import os
import tempfile

import matplotlib.pyplot as plt
import numpy as np

from minipar.config import ModelConfig
from minipar.sim.activations import measure_block_activations
from minipar.sim.costmodel import activation_bytes_per_layer, block_activation_terms

out_dir = tempfile.mkdtemp(prefix="minipar-lesson5-")
cfg = ModelConfig(vocab_size=16, seq_len=16, n_layers=1, d_model=32, n_heads=8)
B, E = 2, 8  # sequences per microbatch; bytes per float64 value
OURS = {"value_bytes": E, "dropout": False, "layernorm_rstd": True}  # what minipar's Block keeps
s, h, a = cfg.seq_len, cfg.d_model, cfg.n_heads
sbh = s * B * h

# %% [markdown]
# ## 1. What a block keeps, under plain tensor parallelism
#
# Every module caches what its backward pass needs. `measure_block_activations` builds one
# block on an in-process tp world, runs its forward and reads every rank's caches with
# `activation_breakdown`: each buffer counted once (the Q, K and V head views are one fused
# buffer), weights left out. Values are in units of sbh = B x T x C values.

# %%
TPS = [1, 2, 4, 8]
plain = {t: measure_block_activations(cfg, t, False, B)[0] for t in TPS}
print(f"{'cache':10s}" + "".join(f"{'tp=' + str(t):>10s}" for t in TPS) + "   (units of sbh)")
for name in plain[1]:
    print(f"{name:10s}" + "".join(f"{plain[t][name] / (E * sbh):10.3f}" for t in TPS))

# %% [markdown]
# The attention output, the softmax and the MLP's inner activations shrink with tp. Four rows
# do not: `ln1` and `ln2` (each LayerNorm keeps its normalised input, sbh, and 1/std, sb) and
# the inputs of the QKV matrix and of the MLP's first matrix (`attn.qkv`, `mlp.fc`, sbh each).
# That is 4 sbh + 2 sb stored on every rank, whatever tp is: the paper's "10" (in 16-bit bytes,
# with two dropout masks that minipar does not have).
#
# ## 2. Sequence parallelism: reduce-scatter and allgather instead of allreduce
#
# An allreduce is a reduce-scatter followed by an allgather. Sequence parallelism stops in the
# middle: after the row-parallel matrix, **g becomes a reduce-scatter along T** (each rank
# keeps the sum for its T/tp tokens), LayerNorm and the residual run on those tokens only, and
# before the next column-parallel matrix **f becomes an allgather along T** (the matrix needs
# every token). In backward they swap: allgather for g, reduce-scatter for f. Forward, the
# bytes on the wire are exactly those of the allreduces they replace.
#
# One more trick from the paper (section 4.2.2): the column-parallel matrix needs the whole
# input again in backward for its weight gradient dW = x^T dy. Rather than store the gathered
# copy (sbh on every rank), it keeps its T/tp shard and allgathers it again in backward: one
# more allgather per column-parallel matrix buys a block whose *every* cache is divided by tp.

# %%
from minipar.dist.comm import run_threads
from minipar.models.blocks import Block
from minipar.nn.module import BuildContext

x_full = np.random.default_rng(0).normal(size=(B, s, h))


def block_traffic(comm, sp):
    block = Block(BuildContext(0, "float64", comm, sp), "blocks.0", cfg)
    t = s // comm.size if sp else s
    lo = comm.rank * t if sp else 0
    y = block.forward(x_full[:, lo:lo + t].copy())
    fwd = comm.stats.as_dict()
    comm.stats.reset()
    block.backward(np.ones_like(y))
    return fwd, comm.stats.as_dict()


for sp in (False, True):
    fwd, bwd = run_threads(lambda comm: block_traffic(comm, sp), 4)[0]
    for label, stats in (("forward", fwd), ("backward", bwd)):
        calls = ", ".join(f"{op} x{d['calls']}" for op, d in stats.items())
        wire = sum(d["wire_bytes"] for d in stats.values())
        print(f"sequence parallel {sp!s:5s} {label:8s}: {calls:40s} wire {wire:7d} bytes")

# %% [markdown]
# ## 3. Activation memory per rank against tp
#
# With sequence parallelism the four replicated rows are split too. For this model (no
# dropout, GELU's tanh recomputed in backward, e bytes per value, MLP width F = 4h) the exact
# count per block is
#
# - plain TP: e [sbh (4 + 16/t + as/(ht)) + 2sb]
# - TP + SP:  e [sbh (20 + as/h) + 2sb] / t, the serial block divided by t,
#
# and Korthikanti et al.'s table 2 (16-bit values, 1-byte dropout masks) reads
# sbh (10 + 24/t + 5as/(ht)) and sbh (34/t + 5as/(ht)) bytes. Without dropout the paper's
# count is sbh (8 + 24/t + 2as/(ht)) bytes at 2 bytes a value, which is ours, value for value,
# except LayerNorm's 1/std (2 sb values). Below: measured bytes, our formula, and the paper
# without dropout converted to 8-byte values.

# %%
measured = {sp: [sum(measure_block_activations(cfg, t, sp, B)[0].values()) for t in TPS]
            for sp in (False, True)}
formula = {sp: [activation_bytes_per_layer(cfg, B, t, sp, **OURS) for t in TPS]
           for sp in (False, True)}
paper = {sp: [activation_bytes_per_layer(cfg, B, t, sp, dropout=False) * E / 2 for t in TPS]
         for sp in (False, True)}
print(f"{'tp':>3s} {'TP measured':>12s} {'formula':>9s} {'paper':>9s}   "
      f"{'TP+SP measured':>14s} {'formula':>9s} {'paper':>9s}   SP/TP")
for i, t in enumerate(TPS):
    print(f"{t:3d} {measured[False][i]:12d} {formula[False][i]:9d} {paper[False][i]:9.0f}   "
          f"{measured[True][i]:14d} {formula[True][i]:9d} {paper[True][i]:9.0f}   "
          f"{measured[True][i] / measured[False][i]:.3f}")
assert measured == formula  # exact, every tp, with and without SP

# %%
fig, ax = plt.subplots(figsize=(7, 4))
for sp, color, label in ((False, "tab:red", "tensor parallel"),
                         (True, "tab:blue", "tensor + sequence parallel")):
    ax.plot(TPS, np.array(measured[sp]) / 2**10, "o", color=color, label=f"{label}: measured")
    ax.plot(TPS, np.array(formula[sp]) / 2**10, "-", color=color, label=f"{label}: formula")
    ax.plot(TPS, np.array(paper[sp]) / 2**10, ":", color=color,
            label=f"{label}: paper, no dropout")
ax.axhline(4 * sbh * E / 2**10, color="gray", lw=0.8, ls="--")
ax.annotate("replicated 4 sbh", (TPS[-1], 4 * sbh * E / 2**10), ha="right", va="bottom")
ax.set_xscale("log", base=2)
ax.set_xticks(TPS, [str(t) for t in TPS])
ax.set_xlabel("tensor-parallel ranks t")
ax.set_ylabel("KiB kept per rank per block")
ax.set_title(f"Activation memory of one block (B={B}, T={s}, C={h}, {a} heads, float64)")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(os.path.join(out_dir, "activation_memory.png"), dpi=120)
plt.show()
plt.close(fig)

# %% [markdown]
# Without sequence parallelism the curve flattens towards the replicated 4 sbh, however many
# ranks we add; with it the bytes fall as 1/t all the way. The saving is the replicated part
# times (1 - 1/t).
#
# ## 4. The ratio, ours and the paper's
#
# How much does sequence parallelism save, SP / TP? Ours and the paper's without dropout differ
# only by LayerNorm's 2 sb, a fraction 1/h of the rest, so the ratios meet as the model widens.
# The paper's own numbers (with dropout masks) are a little different, because dropout adds
# replicated bytes. At GPT-3 scale (s = 2048, h = 12288, a = 96, t = 8) sequence parallelism
# alone cuts the activations of a layer from 23 sbh to about 14 sbh bytes: the rest is
# the attention softmax, which selective recomputation (the paper's other half) removes.

# %%
print(f"{'width h':>8s} {'ours':>8s} {'paper (no dropout)':>19s} {'paper (dropout)':>16s}")
for width in (32, 256, 2048, 12288):
    wide = ModelConfig(vocab_size=16, seq_len=2048, n_layers=1, d_model=width,
                       n_heads=max(width // 128, 8))
    ours = (activation_bytes_per_layer(wide, 1, 8, True, **OURS)
            / activation_bytes_per_layer(wide, 1, 8, False, **OURS))
    nd = (activation_bytes_per_layer(wide, 1, 8, True, dropout=False)
          / activation_bytes_per_layer(wide, 1, 8, False, dropout=False))
    wd = activation_bytes_per_layer(wide, 1, 8, True) / activation_bytes_per_layer(wide, 1, 8)
    print(f"{width:8d} {ours:8.4f} {nd:19.4f} {wd:16.4f}")
gpt3 = ModelConfig(vocab_size=16, seq_len=2048, n_layers=1, d_model=12288, n_heads=96)
for sp in (False, True):
    per = activation_bytes_per_layer(gpt3, 1, 8, sp) / (2048 * 12288)
    print(f"GPT-3, t = 8, sequence parallel {sp}: {per:.1f} sbh bytes per layer")

# %% [markdown]
# ## 5. Still the serial run, number for number
#
# Sequence parallelism changes where tokens live, not what is computed. Trained with tp = 2,
# sequence parallelism on and a data-parallel pair, the model matches the serial run to
# float64 rounding, and its tp group moves exactly what `predict_comm_bytes` predicts. The
# LayerNorm, bias and position gradients are now partial sums (each rank saw only its tokens):
# one extra allreduce per step adds them up.

# %%
from minipar.compare import mismatches, random_batches, serial_reference, train_layout
from minipar.config import ParallelConfig
from minipar.sim.comm_volume import predict_comm_bytes

mcfg = ModelConfig(vocab_size=11, seq_len=8, n_layers=2, d_model=16, n_heads=4)
par = ParallelConfig(dp=2, tp=2, sequence_parallel=True)
batches = random_batches(mcfg, steps=3, batch=4, seed=1)
result = run_threads(lambda w: train_layout(w, mcfg, par, batches, seed=1), par.world)[0]
print("differences beyond 1e-9:", mismatches(result, serial_reference(mcfg, batches, seed=1),
                                            rtol=1e-9))
got = {op: (d["calls"], d["bytes"]) for op, d in result.comm[0]["tp"].items()}
predicted = predict_comm_bytes(mcfg, par, batch_size=4, dtype_bytes=8)["tp"]
want = {op: (d["calls"], d["bytes"]) for op, d in predicted.items()}
print("tp traffic of one step:", dict(sorted(got.items())))
print("formula:               ", dict(sorted(want.items())), got == want)
print("terms of one block, tp = 2 with SP (bytes):",
      block_activation_terms(mcfg, 2, 2, True, **OURS))

# %% [markdown]
# ## What to remember
#
# - Plain tensor parallelism stores the LayerNorm inputs and the inputs of the column-parallel
#   matrices on every rank: 4 sbh (+ 2 sb) values per layer that do not shrink with tp.
# - Sequence parallelism turns each allreduce into a reduce-scatter and an allgather along the
#   sequence (same forward volume), keeps only T/tp tokens in those regions, and re-gathers a
#   column-parallel input in backward instead of storing it: a layer keeps the serial bytes / t.
# - Measured bytes equal the formula exactly; the paper's table 2 without dropout is the same
#   count up to LayerNorm's 1/std.
