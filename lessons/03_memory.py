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
# # Lesson 3: where the memory of one rank goes
#
# **Prerequisites.** Lesson 1 (a block's forward and backward from kernels, what a module
# caches for its backward pass, the AdamW step). Python and NumPy; no MPI, everything here runs
# on one rank.
#
# Every parallel method in the lessons that follow exists because something does not fit: data
# parallelism with ZeRO shards the *model state*, tensor, sequence and pipeline parallelism
# split the *activations* and the weights. Before splitting anything, we measure what one rank
# holds, from the real buffers:
#
# 1. the model state: weights, gradients and AdamW's two moments, read from the `Param` and
#    optimizer arrays and from `Engine.memory()`, against the parameter count;
# 2. the activations: the bytes the caches keep alive for the backward pass, measured by the
#    executor after every pass, against batch size and sequence length, with an exact formula;
# 3. what mixed precision would make of it: 2 + 2 + 12 bytes per parameter (ZeRO, Rajbhandari
#    et al. 2019), the figure the cost model uses and lessons on data parallelism and scaling
#    rely on.
#
# minipar computes in float32 or float64 today; mixed precision is the cost model's formula,
# not a measurement.

# %%
import matplotlib.pyplot as plt
import numpy as np

from minipar.config import ModelConfig, ParallelConfig, replace
from minipar.dist.mesh import Mesh
from minipar.engine import Engine
from minipar.lessons import out_dir
from minipar.sim import costmodel as cm
from minipar.sim.activations import activation_breakdown
from minipar.sim.costmodel import activation_bytes_per_layer

OUT = out_dir("03")
MiB = 2 ** 20
cfg = ModelConfig(vocab_size=64, seq_len=64, n_layers=2, d_model=64, n_heads=4)


def run_one_step(cfg: ModelConfig, batch: int, dtype: str = "float32",
                 microbatches: int = 1) -> Engine:
    """One training step of a serial engine on random tokens; the engine then knows its
    model-state bytes and the activation peak the executor measured during that step."""
    engine = Engine(cfg, ParallelConfig(microbatches=microbatches), Mesh.serial(), dtype=dtype)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, cfg.seq_len))  # (B, T)
    engine.train_step(ids, ids, float(ids.size))
    return engine


# %% [markdown]
# ## 1. Model state: 16 bytes per parameter in float32
#
# An engine on the 1 x 1 x 1 mesh is the serial run. `Engine.memory()` reports what it keeps
# between steps; we add up the same bytes from the arrays themselves: every `Param`'s data, the
# flat gradient buffer, and AdamW's state (`m` and `v` per parameter).

# %%
engine = run_one_step(cfg, batch=8)
mem = engine.memory()
n_params = cm.param_count(cfg)
weights = sum(p.data.nbytes for p in engine.params)
adam = sum(a.nbytes for st in engine.dp.optimizer.state.values() for a in st.values())
print(f"parameters N = {n_params:,}")
for kind, nbytes in (("weights", mem["params"]), ("gradients", mem["grads"]),
                     ("AdamW m and v", mem["optimizer"])):
    print(f"  {kind:14s} {nbytes:>10,d} B = {nbytes / n_params:4.1f} bytes per parameter")
states = mem["params"] + mem["grads"] + mem["optimizer"]
print(f"  model state    {states:>10,d} B = {states / n_params:4.1f} bytes per parameter")
assert weights == mem["params"] == 4 * n_params and adam == mem["optimizer"] == 8 * n_params
assert cm.zero_model_state_bytes(n_params, 1, 0, "fp32") == {
    "weights": mem["params"], "gradients": mem["grads"], "optimizer": mem["optimizer"]}

# %% [markdown]
# Four float32 numbers per parameter: its value, its gradient, and Adam's first and second
# moments. The cost model's `zero_model_state_bytes(N, dp=1, zero=0, "fp32")` gives exactly
# these bytes (the assert above): in a single precision the weights are their own master copy
# and ZeRO's K (optimizer bytes per parameter) is just the two moments, 2 x 4 = 8.
#
# ## 2. Activations against batch size
#
# The executor measures, after every forward and backward pass, the bytes that the module
# caches keep alive (each buffer counted once, weights excluded); `Engine.memory()` reports the
# peak as `activations_peak`. The sequence-parallelism lesson derives the exact bytes one
# block keeps (no tensor parallelism: e [sbh (8 + 3F/h) + 2sb + as^2 b], with e bytes per
# value and F the MLP width); `activation_bytes_per_layer` is that formula (with minipar's
# choices: e bytes a value, no dropout, LayerNorm's 1/std kept). The rest sits in the
# embedding and the head: per token the final LayerNorm's input and 1/std (h + 1 values), the
# head's input (h), the exponentiated logits and their sum (V + 1), plus 18 bytes of integers
# and masks (the int64 token ids, the int64 target index, two boolean masks).
# `activation_breakdown` shows each piece:

# %%
def activation_formula(cfg: ModelConfig, batch: int, e: int) -> dict:
    """Bytes the caches of a serial step keep at their peak (after the forward pass)."""
    tokens = batch * cfg.seq_len
    blocks = cfg.n_layers * activation_bytes_per_layer(
        cfg, batch, 1, False, value_bytes=e, dropout=False, layernorm_rstd=True)
    ends = tokens * (e * (2 * cfg.d_model + cfg.vocab_size + 2) + 18)
    return {"blocks": blocks, "embedding + head": ends}


# A forward pass alone through a fresh model leaves exactly the caches of the peak.
chunk = Engine(cfg, ParallelConfig(), Mesh.serial(), dtype="float32").chunks[0]
ids = np.zeros((8, cfg.seq_len), dtype=np.int64)  # (B, T)
chunk.forward(ids, targets=ids, normalizer=float(ids.size))
parts = activation_breakdown(chunk)
ends = {k: v for k, v in parts.items() if not k.startswith("blocks")}
print("embedding and head caches:", ends)
formula = activation_formula(cfg, 8, 4)
assert sum(ends.values()) == formula["embedding + head"]
assert sum(parts.values()) == sum(formula.values()) == mem["activations_peak"]
print(f"measured peak {mem['activations_peak']:,} B = formula {sum(formula.values()):,} B")

# %%
BATCHES = [1, 2, 4, 8, 16]
by_batch = {b: run_one_step(cfg, b).memory()["activations_peak"] for b in BATCHES}
for b in BATCHES:
    assert by_batch[b] == sum(activation_formula(cfg, b, 4).values())
per_seq = by_batch[1]
crossing = states / per_seq
print(f"activations per sequence: {per_seq / MiB:.3f} MiB; model state {states / MiB:.3f} MiB")
print(f"the activations exceed the model state from a batch of {int(crossing) + 1} on")

fig, ax = plt.subplots(figsize=(7, 3.5))
x = np.arange(len(BATCHES))
bottom = np.zeros(len(BATCHES))
for kind, nbytes in (("weights", mem["params"]), ("gradients", mem["grads"]),
                     ("AdamW m, v", mem["optimizer"])):
    ax.bar(x, [nbytes / MiB] * len(BATCHES), bottom=bottom, label=kind)
    bottom += nbytes / MiB
ax.bar(x, [by_batch[b] / MiB for b in BATCHES], bottom=bottom, label="activations (measured)")
ax.plot(x, bottom + [sum(activation_formula(cfg, b, 4).values()) / MiB for b in BATCHES], "k_",
        markersize=25, label="formula total")
ax.set_xticks(x, [str(b) for b in BATCHES])
ax.set_xlabel("batch size B (sequences of T = 64 tokens)")
ax.set_ylabel("memory of one rank (MiB)")
ax.set_title(f"One rank, float32: {n_params:,} parameters, {cfg.n_layers} layers")
ax.legend(fontsize=8)
fig.tight_layout()
path = OUT / "memory_vs_batch.png"
fig.savefig(path, dpi=120)
print("saved", path)
plt.show()

# %% [markdown]
# The model state does not depend on the batch; the activations grow exactly linearly with it
# (every measured point equals the formula, asserted above). For this small model the
# activations overtake the model state at a batch of a few sequences, printed above. That line
# is what gradient accumulation and pipelining move: only the microbatch that is in flight
# keeps activations.
#
# ## 3. Activations against sequence length
#
# Per sequence, most terms grow with T, but the attention probabilities grow with T^2: a x T x T
# values per block (one row of scores per query and head).

# %%
SEQS = [16, 32, 48, 64, 96, 128]
B = 4
by_seq, quad = {}, {}
for t in SEQS:
    c = replace(cfg, seq_len=t)
    by_seq[t] = run_one_step(c, B).memory()["activations_peak"]
    assert by_seq[t] == sum(activation_formula(c, B, 4).values())
    quad[t] = 4 * c.n_layers * B * c.n_heads * t * t  # the softmax of every block
lin = {t: by_seq[t] - quad[t] for t in SEQS}
for t in SEQS:
    print(f"T = {t:4d}: {by_seq[t] / MiB:7.3f} MiB, of which attention probabilities "
          f"{quad[t] / by_seq[t]:.0%}")
assert all(lin[t] * SEQS[0] == lin[SEQS[0]] * t for t in SEQS)  # the rest is linear in T

fig, ax = plt.subplots(figsize=(7, 3.5))
ax.stackplot(SEQS, [lin[t] / MiB for t in SEQS], [quad[t] / MiB for t in SEQS],
             labels=["terms linear in T", "attention probabilities (a T^2 per block)"],
             alpha=0.7)
ax.plot(SEQS, [by_seq[t] / MiB for t in SEQS], "ko", label="measured peak")
ax.set_xlabel("sequence length T (tokens)")
ax.set_ylabel("activations (MiB)")
ax.set_title(f"Activations of one rank, batch {B}, float32")
ax.legend(fontsize=8)
fig.tight_layout()
path = OUT / "activations_vs_seq_len.png"
fig.savefig(path, dpi=120)
print("saved", path)
plt.show()

# %% [markdown]
# The quadratic term is why long sequences need more than the methods of this course:
# selective recomputation (Korthikanti et al. 2022) drops exactly these a s^2 values and
# recomputes them in backward; FlashAttention never stores them.
#
# ## 4. Mixed precision: 2 + 2 + 12 bytes per parameter
#
# Mixed-precision training (Micikevicius et al. 2018) computes in 16 bits but keeps an fp32
# master copy of the weights for the update. ZeRO (Rajbhandari et al. 2019, section 3.1)
# counts, per parameter: 2 bytes of 16-bit weights, 2 of 16-bit gradients and K = 12 of
# optimizer state (fp32 master weights, momentum and variance): 16 bytes, *the same as float32
# training*. Mixed precision does not shrink the model state; it halves the activations and
# runs on the 16-bit tensor cores. The cost model states this once, in
# `minipar.sim.costmodel.zero_model_state_bytes`, and lessons on data parallelism and scaling
# use it. Check it against the paper's own example (figure 1: 7.5B parameters, N_d = 64):

# %%
per_param = cm.zero_model_state_bytes(1, 1, 0, "bf16")
print("bytes per parameter, mixed precision:", per_param)
assert per_param == {"weights": 2, "gradients": 2, "optimizer": 12}
paper = {0: 120.0, 1: 31.4, 2: 16.6, 3: 1.9}  # GB per GPU, ZeRO figure 1
for zero, gb in paper.items():
    ours = sum(cm.zero_model_state_bytes(7.5e9, 64, zero, "bf16").values()) / 1e9
    print(f"ZeRO stage {zero}: {ours:6.2f} GB per GPU (paper: {gb} GB)")
    assert round(ours, 1) == gb

# %% [markdown]
# The same count for the model measured above, at batch 8: measured in float32, and what mixed
# precision would hold (model state by the formula, floating-point activations at 2 bytes; the
# 18 bytes of integers and masks per token stay).

# %%
fp32 = {"model state": states, "activations": by_batch[8]}
mixed = {"model state": sum(cm.zero_model_state_bytes(n_params, 1, 0, "bf16").values()),
         "activations": sum(activation_formula(cfg, 8, 2).values())}
for k in fp32:
    print(f"{k:12s} float32 (measured) {fp32[k] / MiB:6.3f} MiB   mixed precision (formula) "
          f"{mixed[k] / MiB:6.3f} MiB")
assert mixed["model state"] == fp32["model state"]

fig, ax = plt.subplots(figsize=(6, 3.2))
names = ["float32\n(measured)", "mixed precision\n(formula)"]
ax.bar(names, [fp32["model state"] / MiB, mixed["model state"] / MiB], label="model state")
ax.bar(names, [fp32["activations"] / MiB, mixed["activations"] / MiB],
       bottom=[fp32["model state"] / MiB, mixed["model state"] / MiB], label="activations")
ax.set_ylabel("memory of one rank (MiB)")
ratio = mixed["activations"] / fp32["activations"]
ax.set_title(f"Batch 8: the same model state, {ratio:.2f} x the activations")
ax.legend(fontsize=8)
fig.tight_layout()
path = OUT / "mixed_precision.png"
fig.savefig(path, dpi=120)
print("saved", path)
plt.show()

# %% [markdown]
# ## Try it
#
# **Try:** train in float64 (`dtype="float64"`). Expect every floating-point byte to double:
# 32 bytes of model state per parameter, and activations of 2 x the float32 floats (the 18
# bytes of integers per token do not change). The cell checks both.

# %%
e64 = run_one_step(cfg, 8, dtype="float64").memory()
assert e64["params"] + e64["grads"] + e64["optimizer"] == 32 * n_params
assert e64["activations_peak"] == sum(activation_formula(cfg, 8, 8).values())
print(f"float64: {(e64['params'] + e64['grads'] + e64['optimizer']) / n_params:.0f} bytes per "
      f"parameter, activations {e64['activations_peak'] / by_batch[8]:.3f} x float32's")

# %% [markdown]
# **Try:** keep the batch of 16 but split it into 4 microbatches (gradient accumulation,
# `microbatches=4`). Expect the activation peak of a batch of 4, a quarter, and the model state
# unchanged: a serial step runs each microbatch's forward and backward before the next one.

# %%
accumulated = run_one_step(cfg, 16, microbatches=4).memory()
print(f"batch 16 in one piece: {by_batch[16] / MiB:.3f} MiB; in 4 microbatches: "
      f"{accumulated['activations_peak'] / MiB:.3f} MiB")
assert accumulated["activations_peak"] == by_batch[4]
assert accumulated["params"] + accumulated["grads"] + accumulated["optimizer"] == states

# %% [markdown]
# **Try:** double the heads (`n_heads=8`, same width). Expect the parameters to stay the same
# and only the attention probabilities to grow: by (8 - 4) x T^2 values per sequence and block.

# %%
heads8 = replace(cfg, n_heads=8)
more = run_one_step(heads8, 4).memory()
grown = more["activations_peak"] - by_seq[64]
print(f"8 heads: parameters {cm.param_count(heads8):,} (4 heads: {n_params:,}), activations "
      f"+{grown:,} B")
assert cm.param_count(heads8) == n_params
assert grown == 4 * cfg.n_layers * 4 * (8 - 4) * 64 * 64

# %% [markdown]
# ## Break it: a batch too large for the device
#
# A real device has a fixed memory; an allocation beyond it fails in the middle of a step, after
# minutes of start-up on a cluster. The formulas above tell before anything is allocated. Say
# our device has 8 MiB and we ask for a batch of 32:

# %%
BUDGET = 8 * MiB


def check_fits(cfg: ModelConfig, batch: int, microbatches: int, budget: int, e: int = 4) -> int:
    """Bytes one serial rank needs (model state + one microbatch's activations), or a
    one-line MemoryError naming the flag to change, before any array is allocated."""
    need = 4 * e * cm.param_count(cfg) + sum(
        activation_formula(cfg, batch // microbatches, e).values())
    if need > budget:
        raise MemoryError(f"batch {batch} in {microbatches} microbatch(es) needs "
                          f"{need / MiB:.2f} MiB > {budget / MiB:.2f} MiB; raise --microbatches")
    return need


try:
    check_fits(cfg, 32, 1, BUDGET)
    raise AssertionError("a batch of 32 should not fit in 8 MiB")
except MemoryError as err:
    print("MemoryError:", err)

# %% [markdown]
# The fix is the previous "try": accumulate. The smallest number of microbatches that fits is
# found from the formula, and the measured step then stays within the budget.

# %%
m = next(m for m in (1, 2, 4, 8, 16, 32) if 4 * 4 * n_params + sum(
    activation_formula(cfg, 32 // m, 4).values()) <= BUDGET)
need = check_fits(cfg, 32, m, BUDGET)
run = run_one_step(cfg, 32, microbatches=m).memory()
used = run["params"] + run["grads"] + run["optimizer"] + run["activations_peak"]
print(f"{m} microbatches: predicted {need / MiB:.2f} MiB, measured {used / MiB:.2f} MiB of "
      f"{BUDGET / MiB:.0f} MiB")
assert used == need <= BUDGET

# %% [markdown]
# What next: the data-parallelism lesson shards the 16 bytes of model state over the dp ranks
# with ZeRO; the tensor, sequence and pipeline lessons split the activations; "scaling up"
# carries the same formulas to GPT-3 on a thousand GPUs.
