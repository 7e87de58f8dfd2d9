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
# **Prerequisites.** Python and NumPy (array shapes, broadcasting, `@`), the chain rule of
# calculus, and the parts of a Transformer block by name (self-attention, MLP, LayerNorm,
# residual connections; figure 1 of "Attention Is All You Need" is enough). Nothing about
# parallel computing yet.
#
# **You will be able to** write a layer's backward pass from its forward pass, check it against
# central differences, and tell from the check which formula is wrong.
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


def check_gradients(backward, names=(*W, "input"), tol=1e-6, quiet=False):
    """Compare ``backward``'s gradients with central differences; raise if any is off."""
    dx, grads = backward(probe, block_forward(x, W)[1])
    errors = {}
    for name in names:
        analytic, array = (dx, x) if name == "input" else (grads[name], W[name])
        errors[name] = rel_err(analytic, numeric(array))
        if not quiet:
            print(f"{name:7s} relative error {errors[name]:.1e}")
    bad = {k: f"{v:.1e}" for k, v in errors.items() if v > tol}
    assert not bad, f"a backward formula is wrong: relative errors above {tol:g}: {bad}"
    return max(errors.values())


worst = check_gradients(block_backward)
print(f"every gradient agrees with central differences (worst {worst:.1e})")

# %% [markdown]
# ### Break it: forget the skip connection in backward
#
# The most common slip in a hand-written backward pass is to forget one of the two paths at a
# residual: here `dh = dh_mlp` instead of `dh = dy + dh_mlp`. The forward pass is untouched, so
# nothing looks wrong until the gradient check runs. Every gradient upstream of `h` is now off:
# the attention weights and the input.

# %%
def backward_without_skip(dy, caches):
    grads = {}
    dg, grads["out_w"], grads["out_b"] = F.linear_bwd(dy, caches["out"])
    df = F.gelu_bwd(dg, caches["gelu"])
    db_, grads["fc_w"], grads["fc_b"] = F.linear_bwd(df, caches["fc"])
    dh, grads["ln2_g"], grads["ln2_b"] = F.layernorm_bwd(db_, caches["ln2"])  # BUG: no dy +
    datt, grads["proj_w"], grads["proj_b"] = F.linear_bwd(dh, caches["proj"])
    dqkv = F.mha_bwd(datt, caches["mha"])
    da, grads["qkv_w"], grads["qkv_b"] = F.linear_bwd(dqkv, caches["qkv"])
    dx_att, grads["ln1_g"], grads["ln1_b"] = F.layernorm_bwd(da, caches["ln1"])
    return dh + dx_att, grads


try:
    check_gradients(backward_without_skip, names=("out_w", "proj_w", "input"))
    raise RuntimeError("the broken backward passed the gradient check")
except AssertionError as exc:
    print("caught:", exc)
    assert "proj_w" in str(exc) and "out_w" not in str(exc)  # what the text below says

# %% [markdown]
# The MLP's own weight `out_w` is still right (its gradient does not pass through `h`); the
# attention projection and the input are wrong by order one. That pattern (right below a
# point, wrong above it) locates the bug. The test suite runs the same check on every kernel
# (`tests/test_functional.py`) and on the whole model (`tests/test_model.py`).
#
# ### Try: the step size of the central difference
#
# The error of `(L(w + eps) - L(w - eps)) / (2 eps)` has two parts: truncation, which grows as
# eps^2, and float64 rounding of L, which grows as 1e-16 / eps. Expect a U: too large an eps
# and too small an eps both lose digits, and around 1e-5 both are small. We check `fc_w`, whose
# path to the loss goes through GELU; L is *linear* in `out_w`, so there the difference
# quotient is exact up to rounding (try it). Change the list and check.

# %%
EPS = [1e-1, 1e-3, 1e-5, 1e-8, 1e-11]  # Try: other values, or "out_w" below
err_eps = {eps: rel_err(grads["fc_w"], numeric(W["fc_w"], eps)) for eps in EPS}
for eps, err in err_eps.items():
    print(f"eps {eps:.0e}: relative error of fc_w {err:.1e}")
best = min(err_eps, key=err_eps.get)
assert err_eps[best] < min(err_eps[EPS[0]], err_eps[EPS[-1]]), "expected a U-shaped error"
print(f"smallest error at eps = {best:.0e}: the two ends of the list lose "
      f"{np.log10(err_eps[EPS[0]] / err_eps[best]):.0f} and "
      f"{np.log10(err_eps[EPS[-1]] / err_eps[best]):.0f} digits")

# %% [markdown]
# ### Try: more heads
#
# `mha_fwd` splits the C = 8 channels into H heads of D = C / H channels each. Nothing in the
# backward pass depends on H, so the check must pass for H = 1, 4 or 8 too (H must divide C).

# %%
H = 4  # Try: 1, 2, 4 or 8
worst_h = check_gradients(block_backward, names=("qkv_w", "proj_w", "input"), quiet=True)
print(f"H = {H}, head width {C // H}: gradients agree (worst relative error {worst_h:.1e})")
H = 2  # back to the block we built above

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
assert losses[-1] < losses[0] / 10, "training did not bring the loss down"
print(f"The loss fell from {losses[0]:.2f} (about ln {task.vocab_size} = "
      f"{np.log(task.vocab_size):.2f}, a uniform guess over the {task.vocab_size} tokens) to "
      f"{losses[-1]:.3f}, and {metrics['exact_match']:.0%} of the held-out sequences come out "
      "sorted with every digit right.")

# %%
import matplotlib.pyplot as plt

from minipar.lessons import save_figure

fig, ax = plt.subplots(figsize=(6, 3))
ax.semilogy(losses)
ax.set_xlabel("step")
ax.set_ylabel("training loss (nats per answer token)")
ax.set_title("default preset learning to sort (log scale)")
fig.tight_layout()
save_figure(fig, "01", "loss.png")

# %% [markdown]
# ### Try: the loss before any training
#
# A freshly initialised model predicts nearly uniform probabilities (its weights are small),
# so its loss is about ln V, whatever the task. `add` has 13 tokens, `sort` and `reverse` 11.
# Expect ln 13 = 2.56 and ln 11 = 2.40, within a few hundredths.

# %%
for name in ("sort", "reverse", "add"):  # Try: other tasks, other seeds
    t = make_task(name, seed=1)
    fresh = Engine(replace(cfg, vocab_size=t.vocab_size, seq_len=t.seq_len), ParallelConfig(),
                   Mesh.serial(), seed=1)
    untrained = fresh.evaluate([t.batch(0, 32)])["loss"]
    print(f"{name:8s} V = {t.vocab_size}: untrained loss {untrained:.3f}, "
          f"ln V = {np.log(t.vocab_size):.3f}")
    assert abs(untrained - np.log(t.vocab_size)) < 0.1

# %% [markdown]
# Next: lesson 2 shows how ranks talk (collectives and what they cost), and lesson 4 uses them
# to train this same model on several ranks with exactly the same result.
