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
# # Lesson 1: a Transformer by hand
#
# Before we split a model over many ranks we need a model whose every number we understand.
# minipar's GPT has no autograd: each operation is a pair of pure functions,
# `y, cache = op_fwd(x, ...)` and `dx, ... = op_bwd(dy, cache)`, written from the chain rule.
# In this lesson we
#
# 1. build one Transformer block's forward pass from those kernels, step by step,
# 2. write its backward pass by walking the same steps in reverse,
# 3. check every gradient against central differences, and
# 4. train the tiny model on the `sort` task for a few hundred steps.
#
# Shapes follow the legend at the top of `minipar/nn/functional.py`: B batch, T tokens,
# C model width, H heads, D head width, F MLP width, V vocabulary.

# %%
import numpy as np

from minipar.nn import functional as F

rng = np.random.default_rng(0)
B, T, C, H = 2, 5, 8, 2  # tiny, so that central differences are cheap
x = rng.normal(size=(B, T, C))  # (B, T, C): the residual stream entering the block

# %% [markdown]
# ## 1. The forward pass of a pre-LayerNorm block
#
# `h = x + Attention(LN1(x))`, then `y = h + MLP(LN2(h))`. Attention projects to a fused
# `[Q | K | V]` tensor, applies causal softmax attention per head, and projects back; the MLP is
# a linear layer, GELU, and another linear layer. We keep every cache: the backward pass needs
# them.

# %%
def init(*shape, std=0.2):
    return rng.normal(0.0, std, size=shape)


W = {
    "ln1_g": np.ones(C), "ln1_b": np.zeros(C),
    "qkv_w": init(C, 3 * C), "qkv_b": np.zeros(3 * C),
    "proj_w": init(C, C), "proj_b": np.zeros(C),
    "ln2_g": np.ones(C), "ln2_b": np.zeros(C),
    "fc_w": init(C, 4 * C), "fc_b": np.zeros(4 * C),
    "out_w": init(4 * C, C), "out_b": np.zeros(C),
}


def block_forward(x, W):
    caches = {}
    a, caches["ln1"] = F.layernorm_fwd(x, W["ln1_g"], W["ln1_b"])  # (B, T, C)
    qkv, caches["qkv"] = F.linear_fwd(a, W["qkv_w"], W["qkv_b"])  # (B, T, 3C)
    att, caches["mha"] = F.mha_fwd(qkv, H)  # (B, T, C)
    o, caches["proj"] = F.linear_fwd(att, W["proj_w"], W["proj_b"])  # (B, T, C)
    h = x + o  # (B, T, C) residual
    b, caches["ln2"] = F.layernorm_fwd(h, W["ln2_g"], W["ln2_b"])  # (B, T, C)
    f, caches["fc"] = F.linear_fwd(b, W["fc_w"], W["fc_b"])  # (B, T, 4C)
    g, caches["gelu"] = F.gelu_fwd(f)  # (B, T, 4C)
    m, caches["out"] = F.linear_fwd(g, W["out_w"], W["out_b"])  # (B, T, C)
    return h + m, caches  # (B, T, C)


y, caches = block_forward(x, W)
print("block output", y.shape, "mean", y.mean().round(4), "std", y.std().round(4))

# %% [markdown]
# ## 2. The backward pass, in reverse
#
# A residual `y = h + m` sends its gradient to both branches unchanged; the two gradients that
# arrive at `h` (through the MLP branch and straight through the skip) add up. Every `*_bwd`
# kernel returns the gradient for its input and for its weights.

# %%
def block_backward(dy, caches):
    grads = {}
    dg, grads["out_w"], grads["out_b"] = F.linear_bwd(dy, caches["out"])
    df = F.gelu_bwd(dg, caches["gelu"])
    db_, grads["fc_w"], grads["fc_b"] = F.linear_bwd(df, caches["fc"])
    dh_mlp, grads["ln2_g"], grads["ln2_b"] = F.layernorm_bwd(db_, caches["ln2"])
    dh = dy + dh_mlp  # the skip connection and the MLP branch meet here
    datt, grads["proj_w"], grads["proj_b"] = F.linear_bwd(dh, caches["proj"])
    dqkv = F.mha_bwd(datt, caches["mha"])
    da, grads["qkv_w"], grads["qkv_b"] = F.linear_bwd(dqkv, caches["qkv"])
    dx_att, grads["ln1_g"], grads["ln1_b"] = F.layernorm_bwd(da, caches["ln1"])
    return dh + dx_att, grads


probe = rng.normal(size=y.shape)  # the loss L = sum(y * probe) has dL/dy = probe
dx, grads = block_backward(probe, caches)

# %% [markdown]
# ## 3. Check every gradient against central differences
#
# For each weight entry w, `(L(w + eps) - L(w - eps)) / (2 eps)` approximates dL/dw with an
# error of order eps^2. In float64 the analytic and numeric gradients agree to ~1e-9: any
# mistake in a backward formula shows up as a large relative error.

# %%
def loss(W, x):
    return float((block_forward(x, W)[0] * probe).sum())


def numeric(array, eps=1e-6):
    g = np.zeros_like(array)
    for i in np.ndindex(array.shape):
        old = array[i]
        array[i] = old + eps
        up = loss(W, x)
        array[i] = old - eps
        down = loss(W, x)
        array[i] = old
        g[i] = (up - down) / (2 * eps)
    return g


def rel_err(a, b):
    return np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-12)


worst = 0.0
for name in W:
    err = rel_err(grads[name], numeric(W[name]))
    worst = max(worst, err)
    print(f"{name:7s} relative error {err:.1e}")
err_x = rel_err(dx, numeric(x))
print(f"input   relative error {err_x:.1e}")
assert max(worst, err_x) < 1e-6, "a backward formula is wrong"

# %% [markdown]
# ## 4. The same block inside minipar's GPT
#
# `minipar.nn` wraps these kernels in modules that own their parameters and keep one cache per
# microbatch, so the later lessons can split them over ranks. The test suite checks the whole
# model's gradients the same way (`tests/test_model.py`). Here we train the `default` preset on
# the `sort` task: the model reads 8 digits and a separator and must write them sorted. The
# loss counts only the answer tokens; exact match asks for every answer digit to be right.

# %%
import time

from minipar.config import MODEL_PRESETS, ParallelConfig, replace
from minipar.tasks import make_task
from minipar.dist.mesh import Mesh
from minipar.engine import Engine
from minipar.nn.optim import lr_at

task = make_task("sort", seed=0)
cfg = replace(MODEL_PRESETS["default"], vocab_size=task.vocab_size, seq_len=task.seq_len)
engine = Engine(cfg, ParallelConfig(), Mesh.serial(), seed=0, lr=3e-3)
inputs, targets = task.batch(0, 2)
print("an example:", task.render(inputs[0]), "->", task.render(targets[0][targets[0] >= 0]))

steps, losses, t0 = 200, [], time.perf_counter()
for step in range(steps):
    x_b, y_b = task.batch(step, 64)
    result = engine.train_step(x_b, y_b, task.n_scored(y_b), lr_at(step, 3e-3, 30, steps))
    losses.append(result.loss)
    if step % 100 == 0 or step == steps - 1:
        print(f"step {step:4d}  loss {result.loss:.4f}")
metrics = engine.evaluate(task.eval_batches(256))
print(f"{steps} steps in {time.perf_counter() - t0:.1f} s; held-out exact match "
      f"{metrics['exact_match']:.3f}")

# %%
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(6, 3))
ax.semilogy(losses)
ax.set_xlabel("step")
ax.set_ylabel("training loss")
ax.set_title("default preset learning to sort")
fig.tight_layout()
plt.show()

# %% [markdown]
# Next: lesson 2 shows how ranks talk (collectives and what they cost), and lesson 3 uses them
# to train this same model on several ranks with exactly the same result.
