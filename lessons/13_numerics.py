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
# # Lesson 13: numerics the big systems use
#
# **Prerequisites.** Lesson 3 (what one rank holds), lesson 4 (data parallelism and ZeRO).
#
# Every production trainer (Megatron-LM, DeepSpeed, PyTorch AMP) trains in 16 bits with fp32
# master weights: mixed precision (Micikevicius et al. 2018). minipar does too, with
# `--precision bf16` or `--precision fp16`; which dtype each tensor has, and why, is written in
# one place, `minipar.nn.precision`. This lesson:
#
# 1. the float formats and their ranges;
# 2. why the weights need an fp32 master copy;
# 3. fp16's dynamic loss scale, in a run with forced overflows;
# 4. ZeRO's 16 bytes per parameter, measured from the real buffers;
# 5. dropout whose masks every layout draws alike, so parallel still equals serial.

# %%
import matplotlib.pyplot as plt
import numpy as np

from minipar.compare import random_batches
from minipar.config import ModelConfig, ParallelConfig
from minipar.dist.comm import local_comm, run_threads
from minipar.dist.mesh import Mesh
from minipar.engine import Engine
from minipar.lessons import OUT_DIR
from minipar.nn.precision import format_range, policy
from minipar.sim.comm_volume import model_state_bytes
from minipar.tasks import IGNORE

OUT_DIR.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## 1. Float formats
#
# bf16 keeps fp32's 8 exponent bits (the same range) and has only 7 mantissa bits; fp16 has 10
# mantissa bits but 5 exponent bits: nothing above 65504, and nothing below about 6e-8.

# %%
for name in ("fp64", "fp32", "bf16", "fp16"):
    r = format_range(name)
    print(f"{name}: {r['bits']} bits, exponent {r['exponent']}, mantissa {r['mantissa']}, "
          f"max {r['max']:.3g}, smallest normal {r['tiny']:.3g}, eps {r['eps']:.3g} "
          f"(~{r['decimal_digits']} decimal digits)")

# %% [markdown]
# ## 2. Why master weights
#
# An update of lr x g = 1e-4 to a weight of 1.0 is below half of bf16's eps (2^-8 = 0.0039):
# added in bf16 it vanishes, every time. The fp32 master copy keeps it, and the 16-bit working
# copy is the master rounded once per step.

# %%
bf16 = policy("bf16").dtype
w16 = np.array([1.0], dtype=bf16)
master = np.array([1.0], dtype=np.float32)
for _ in range(100):
    w16 = (w16 - np.array([1e-4], dtype=bf16)).astype(bf16)
    master -= 1e-4
print(f"100 updates of -1e-4: in bf16 {float(w16[0])}, in fp32 master {master[0]:.4f}, "
      f"working copy {float(master.astype(bf16)[0])}")
assert float(w16[0]) == 1.0 and abs(master[0] - 0.99) < 1e-4

# %% [markdown]
# ## 3. fp16's dynamic loss scale, with forced overflows
#
# fp16 gradients below 6e-8 flush to zero, so the loss is multiplied by a scale S before
# backward, and the gradients divided by S in fp32 before the update. Too large an S overflows:
# the step's global grad_sq (already summed by the step's one world allreduce) is inf on every
# rank, so every rank skips the step and halves S; after N clean steps S doubles. Here N = 4,
# and at steps 8 and 30 we force overflows by setting S to 2^28 (2^28 / 64 scored tokens
# already exceeds 65504 in the loss gradient).

# %%
cfg = ModelConfig(vocab_size=11, seq_len=8, n_layers=2, d_model=16, n_heads=2)
eng = Engine(cfg, ParallelConfig(), Mesh(local_comm()), precision="fp16", loss_scale=2.0 ** 10,
             loss_scale_window=4, lr=1e-2)
scales, skipped = [], []
for i, (x, y) in enumerate(random_batches(cfg, 48, 8, seed=0)):
    if i in (8, 30):
        eng.scaler.scale = 2.0 ** 28
    r = eng.train_step(x, y, int((y != IGNORE).sum()))
    scales.append(r.loss_scale)
    skipped.append(r.skipped)
print("skipped steps:", [i for i, s in enumerate(skipped) if s])

fig, ax = plt.subplots(figsize=(7, 3))
ax.semilogy(scales, drawstyle="steps-post", label="loss scale used")
ax.plot([i for i, s in enumerate(skipped) if s], [scales[i] for i, s in enumerate(skipped) if s],
        "rx", label="overflow: step skipped")
ax.set_xlabel("step")
ax.legend()
fig.savefig(OUT_DIR / "13_loss_scale.png", dpi=100, bbox_inches="tight")

# %% [markdown]
# ## 4. ZeRO's 16 bytes per parameter, measured
#
# With AdamW in bf16: 2 bytes of working weight, 2 of gradient, 12 of fp32 master, m and v.
# ZeRO-1 shards the 12, ZeRO-2 also the gradient, ZeRO-3 also the weights. `Engine.memory()`
# reads the real buffers; `model_state_bytes` is the cost model's prediction (with ZeRO's
# padding); they are equal for every stage.


# %%
def measured(world, precision, zero):
    eng = Engine(cfg, ParallelConfig(dp=2, zero=zero), Mesh(world, dp=2), precision=precision)
    mem = eng.memory()
    return {k: mem[k] for k in ("params", "grads", "optimizer")}


n = sum(p.data.size for p in Engine(cfg, ParallelConfig(), Mesh(local_comm())).params)
for precision in ("fp32", "bf16"):
    for zero in range(4):
        mem = run_threads(lambda w: measured(w, precision, zero), 2)[0]
        want = model_state_bytes(cfg, ParallelConfig(dp=2, zero=zero), 0, precision)
        assert mem == want, (mem, want)
        print(f"{precision} ZeRO-{zero}: {sum(mem.values()) / n:5.2f} bytes per parameter "
              f"per rank ({mem})")

# %% [markdown]
# ## 5. Dropout that every layout draws the same
#
# Dropout (Srivastava et al. 2014) zeroes each activation with probability P while training and
# scales the survivors by 1 / (1 - P), so that the expected output is the input and evaluation
# simply leaves it out. GPT-2 and Megatron-LM drop three things: the attention probabilities,
# each block's output before it joins the residual stream, and the embedding. With
# `--dropout P` minipar does the same.
#
# Randomness is where parallel training usually stops being comparable with the serial run.
# A generator such as `numpy.random.default_rng(seed)` hands out numbers *in the order they are
# asked for*. The serial run asks for the whole (B, H, T, T) mask of the attention
# probabilities at once; a tensor-parallel rank holds only its H/tp heads, so the numbers it
# gets first are not the ones the serial run gave to those heads.

# %%
import matplotlib.pyplot as plt
import numpy as np

from minipar.lessons import save_figure
from minipar.nn.dropout import keep_mask, philox_words, site_key, threshold

B, H, T, TP, P = 1, 4, 8, 2, 0.3
serial = np.random.default_rng(0).random((B, H, T, T)) >= P  # (B, H, T, T) the serial mask
heads = H // TP
for rank in range(TP):
    stateful = np.random.default_rng(0).random((B, heads, T, T)) >= P  # what this rank draws
    mine = serial[:, rank * heads:(rank + 1) * heads]  # what the serial run used for its heads
    print(f"tp rank {rank}: a stateful generator gives the serial mask of its heads? "
          f"{np.array_equal(stateful, mine)}")

# %% [markdown]
# Rank 0 happens to agree (it asks first), rank 1 does not. Megatron-LM (Shoeybi et al. 2019)
# keeps the ranks *consistent with each other* with an **RNG tracker**: one generator state,
# seeded alike on every tp rank, for the replicated regions (the residual stream, where every
# rank must drop the same elements or the copies drift apart), and one state per tp rank,
# seeded with the rank, for the sharded regions (each rank's own heads), switched around each
# dropout call. That is correct training, but the masks depend on the layout: a tp = 2 run
# drops other probabilities than tp = 1, so it cannot be compared with the serial run number
# for number, and changing the layout changes the run.
#
# **Counter-based generators** remove the order altogether. Philox (Salmon et al. 2011,
# "Parallel random numbers: as easy as 1, 2, 3") is a pure function of a counter and a key:
# Philox4x64-10(counter, key) gives 256 random bits, with no state in between. So minipar
# *addresses* the random number of each element instead of drawing it in turn:
#
#     key    = hash(seed, step, site)          site: the layer's name, "blocks.0.attn.probs"
#     word g = 32-bit word (g mod 8) of Philox4x64-10(counter = g div 8, key)
#     keep g = word g >= floor(P 2^32)
#
# where g is the element's index in the **global** tensor of the step: rows numbered over the
# whole global batch (a dp rank's microbatch starts at its first global row), all heads, all
# tokens. A rank computes the global indices of its own elements and evaluates the generator
# only there: its heads (tp), its tokens (sequence parallelism), its rows (dp, microbatches),
# its layers (pp: the site names the layer). Its elements are a few contiguous runs of the
# global order, one per row, and each run is one call of NumPy's `Philox` with its counter set
# to the run's start. No tracker, no forking, and no communication about randomness.

# %%
key = site_key(seed=0, step=0, site="blocks.0.attn.probs")
whole = keep_mask(key, P, (B, H, T, T), (0, 0, 0, 0), (H, T, T))  # (B, H, T, T) serial
for rank in range(TP):
    h0 = rank * heads
    mine = keep_mask(key, P, (B, heads, T, T), (0, h0, 0, 0), (H, T, T))  # this rank only
    print(f"tp rank {rank}: heads {h0}..{h0 + heads - 1} drawn alone equal the serial slice? "
          f"{np.array_equal(mine, whole[:, h0:h0 + heads])}")

# One element by hand: head 3, query 5, key 2 has global index g; its word decides it.
g = ((0 * H + 3) * T + 5) * T + 2
word = int(philox_words(key, g, 1)[0])
print(f"element (0, 3, 5, 2): g = {g}, word {word} >= {threshold(P)}? {word >= threshold(P)}; "
      f"the mask says {bool(whole[0, 3, 5, 2])}")

# %% [markdown]
# The picture: the attention-probability mask of one sequence, heads side by side, each tp
# rank's heads framed in its colour (above the diagonal the causal mask has already zeroed the
# probabilities, so dropping them changes nothing). Under sequence parallelism the residual
# mask is cut along the tokens instead, and each rank again draws only its rows of it.

# %%
colors = ["tab:blue", "tab:orange"]
fig, axes = plt.subplots(1, H, figsize=(2.2 * H, 2.6))
for h, ax in enumerate(axes):
    ax.imshow(whole[0, h], cmap="gray", vmin=0, vmax=1)
    ax.set_title(f"head {h}: tp rank {h // heads}", fontsize=9, color=colors[h // heads])
    ax.set_xticks([]), ax.set_yticks([])
    for side in ax.spines.values():
        side.set_color(colors[h // heads])
        side.set_linewidth(3)
fig.suptitle(f"attention dropout mask, P = {P} (white = kept), cut over tp = {TP} ranks")
fig.tight_layout()
save_figure(fig, "13", "dropout_mask_over_tp.png")

# %% [markdown]
# Because each mask is the serial run's, every layout with dropout trains exactly as the serial
# run does. Here 2 steps on three layouts, compared number for number (losses, the gradients
# of the last step, the updated weights), and an evaluation, which draws no mask at all.

# %%
from minipar.compare import mismatches, random_batches, serial_reference, train_layout
from minipar.config import ModelConfig, ParallelConfig
from minipar.dist.comm import run_threads
from minipar.dist.mesh import Mesh
from minipar.engine import Engine

cfg = ModelConfig(vocab_size=11, seq_len=8, n_layers=4, d_model=16, n_heads=4, dropout=0.1)
batches = random_batches(cfg, steps=2, batch=8, seed=0)
reference = serial_reference(cfg, batches)
for par in (ParallelConfig(tp=2, sequence_parallel=True, dp=2),
            ParallelConfig(pp=2, schedule="1f1b", microbatches=4, dp=2, zero=1),
            ParallelConfig(dp=2, tp=2, pp=2, microbatches=2, sequence_parallel=True)):
    got = run_threads(lambda w: train_layout(w, cfg, par, batches), par.world)[0]
    print(f"dp {par.dp} x tp {par.tp} x pp {par.pp}: differences from serial "
          f"{mismatches(got, reference, rtol=1e-9)}")

with_dropout = Engine(cfg, ParallelConfig(), Mesh.serial(), dtype="float64")
without = Engine(ModelConfig(**{**cfg.__dict__, "dropout": 0.0}), ParallelConfig(),
                 Mesh.serial(), dtype="float64")
print("evaluation equal with and without dropout:",
      with_dropout.evaluate(batches) == without.evaluate(batches))

# %% [markdown]
# **What backward keeps.** The backward pass multiplies by the same mask, so the forward keeps
# it: one byte per element (a boolean array in the layer's cache, which the activation meter
# of lesson 6 counts), as Megatron does and as Korthikanti et al. 2022 count it. Regenerating
# it in backward would save that byte but draw Philox a second time, which costs more than the
# multiply it feeds. The attention keeps the softmax output and the mask, not the dropped
# probabilities (Korthikanti's table keeps those too, e bytes per score): they are recomputed
# in backward as one elementwise product.
#
# **Exercise.** In `minipar/engine.py` make every dp rank number its rows from 0
# (`first = 0` in `Engine.gradients`) and run `pytest tests/test_dropout_layouts.py`: which
# layouts stop equalling the serial run, and why does tp = 2 still pass?
