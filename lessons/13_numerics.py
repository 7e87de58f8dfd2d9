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
# 4. ZeRO's 16 bytes per parameter, measured from the real buffers.

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
# ## 5. Dropout that agrees across layouts
#
# (Reserved: the dropout section, a counter-based mask drawn from global indices and one mask
# cut over tp ranks, is added here by the dropout work.)
