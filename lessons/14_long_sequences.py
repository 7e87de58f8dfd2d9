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
# # Lesson 14: long sequences — attention's square, blockwise softmax, recomputation
#
# **Prerequisites.** Lesson 1 (attention's forward and backward by hand), lesson 3 (what a
# rank's memory holds) and lesson 6 (a block's activation bytes term by term, Korthikanti et
# al.'s table 2).
#
# **You will be able to** measure how attention's time and memory grow with the sequence
# length T, compute a softmax one block at a time with a running maximum and normaliser, say
# what the blockwise (flash-attention) kernel keeps for backward and why it skips half the
# work, and predict, then measure, the activation bytes of a block with no, selective and full
# recomputation.
#
# The source material names the Transformer's bottleneck: self-attention compares every token
# with every other, so its compute and its memory grow with the square of the sequence. Long
# texts are what parallelism must make possible. Two tools that need no extra ranks come first:
#
# 1. the **blockwise attention kernel** (Dao et al. 2022, FlashAttention, with the online
#    softmax of Milakov & Gimelshein 2018) never forms the (T, T) matrix and keeps O(T) per head;
# 2. **activation recomputation** (Korthikanti et al. 2022) keeps less and reruns forward work
#    in backward: *selective* reruns the attention core, *full* reruns the whole block.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

from minipar.config import ModelConfig, ParallelConfig, replace
from minipar.lessons import save_figure
from minipar.nn import blockwise, flops
from minipar.nn import functional as F
from minipar.sim.activations import measure_block_activations
from minipar.sim.costmodel import activation_bytes_per_layer, block_activation_terms

E = 8  # bytes per float64 value
OURS = {"value_bytes": E, "dropout": False, "layernorm_rstd": True}  # what minipar's Block keeps


def median_seconds(fn, repeats: int = 5) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[repeats // 2]


# %% [markdown]
# ## 1. Attention's square, measured
#
# The plain kernel (`functional.attention_fwd`) computes s = q k^T / sqrt(D) for all (T, T)
# pairs, applies the causal mask, takes the softmax p and keeps p for backward. Per (batch,
# head) that is T^2 values kept and 4 T^2 D FLOPs for q k^T and p v. Doubling T should
# quadruple both. The kernels count their FLOPs as they run (`minipar.nn.flops`).

# %%
rng = np.random.default_rng(0)
B, H, D = 1, 4, 32
TS = [128, 256, 512, 1024]
rows = []
for t in TS:
    q, k, v, dy = (rng.normal(size=(B, H, t, D)) for _ in range(4))
    with flops.counting() as counted:
        _, cache = F.attention_fwd(q, k, v)
    kept = cache[3].nbytes  # the softmax p, (B*H, T, T)
    sec = median_seconds(lambda: F.attention_bwd(dy, F.attention_fwd(q, k, v)[1]), 3)
    rows.append((t, counted[0], kept, sec))
print(f"{'T':>5s} {'fwd FLOPs':>12s} {'softmax kept':>13s} {'fwd+bwd ms':>11s}")
for t, fl, kept, sec in rows:
    print(f"{t:5d} {fl:12,d} {kept / 2**20:10.1f} MiB {sec * 1e3:11.1f}")
for (t0, f0, k0, _), (t1, f1, k1, _) in zip(rows, rows[1:]):
    assert f1 == 4 * f0 and k1 == 4 * k0  # exactly quadratic
print("time ratio per doubling:", [round(b[3] / a[3], 1) for a, b in zip(rows, rows[1:])])

# %% [markdown]
# FLOPs and the kept softmax grow exactly 4x per doubling; time grows close to 4x too once the
# (T, T) arrays stop fitting in cache. At T = 1024 one head of one sequence already keeps 8 MiB.
#
# ## 2. A softmax one block at a time
#
# Softmax needs the row's maximum (for stability) and its sum before any output is final. The
# online softmax keeps both as running values. For scores seen so far, m is their maximum,
# l = sum exp(s - m) and acc = sum exp(s - m) v. A new block s_j with values v_j updates them:
#
#     m' = max(m, max s_j);   l' = exp(m - m') l + sum exp(s_j - m')
#     acc' = exp(m - m') acc + exp(s_j - m') v_j
#
# and at the end y = acc / l: exactly softmax(s) v. By hand, for one query row of 9 scores:

# %%
s_row = rng.normal(size=9) * 3
v_row = rng.normal(size=(9, 2))
m, l, acc = -np.inf, 0.0, np.zeros(2)
for lo in range(0, 9, 3):  # three blocks of three keys
    sj, vj = s_row[lo:lo + 3], v_row[lo:lo + 3]
    m_new = max(m, sj.max())
    alpha = np.exp(m - m_new)  # rescales what earlier blocks summed (0 for the first block)
    l = alpha * l + np.exp(sj - m_new).sum()
    acc = alpha * acc + np.exp(sj - m_new) @ vj
    m = m_new
    print(f"keys {lo}..{lo + 2}: m = {m:6.3f}, l = {l:7.4f}")
p = np.exp(s_row - s_row.max())
p /= p.sum()
print("blockwise:", acc / l, " plain:", p @ v_row)
assert np.allclose(acc / l, p @ v_row)
lse = m + np.log(l)  # the log-sum-exp: what backward keeps instead of p
assert np.allclose(np.exp(s_row - lse), p)

# %% [markdown]
# Backward keeps only m + log l, the **log-sum-exp**, one number per query: each block's
# probabilities come back exactly as p_j = exp(s_j - lse). `minipar/nn/blockwise.py` is this
# update over (batch, head) pairs (`forward_step`), its gradient (`backward_step`), and the loop
# over one sequence's key blocks. With the causal mask, the queries before a key block would
# see only -inf there, so each key block meets only the queries at or after its first key, in
# one product. For T = 256 in blocks of 64, the (query, key) tiles that run:

# %%
T_SMALL, BLOCK = 256, 64
nb = T_SMALL // BLOCK
for i in range(nb):
    kinds = [blockwise.relation(i * BLOCK, BLOCK, j * BLOCK, BLOCK) for j in range(nb)]
    print(f"queries {i * BLOCK:3d}..: " + " ".join({"full": "##", "diagonal": "\\\\",
                                                    "skip": ".."}[k] for k in kinds))
print(f"key blocks start at {[a for a, _ in blockwise.key_blocks(T_SMALL, BLOCK)]}: FLOPs "
      f"{blockwise.pair_flops(T_SMALL, 64, BLOCK) / (4 * T_SMALL ** 2 * 64):.3f} of the plain "
      f"kernel's (which multiplies the full square and masks afterwards)")
assert blockwise.pair_flops(T_SMALL, 64, BLOCK) == nb * (nb + 1) // 2 * 4 * BLOCK ** 2 * 64

# %% [markdown]
# The two kernels agree to rounding, forward and backward, and the blockwise one is timed
# against the plain one on the `small` preset's attention shapes (batch 8, 6 heads, T = 256,
# head width 64, float32). Backward needs the output y too: the block's output projection keeps
# it anyway as its input, so the model passes that one in (nothing stored twice).

# %%
Bs, Hs, Ts, Ds = 8, 6, 256, 64
q, k, v, dy = (rng.normal(size=(Bs, Hs, Ts, Ds)).astype("float32") for _ in range(4))
y_plain, c_plain = F.attention_fwd(q, k, v)
y_blk, c_blk = blockwise.attention_fwd(q, k, v)
assert np.allclose(y_blk, y_plain, atol=1e-5)
for g_blk, g_plain in zip(blockwise.attention_bwd(dy, y_blk, c_blk), F.attention_bwd(dy, c_plain)):
    assert np.allclose(g_blk, g_plain, atol=1e-4)
kernels = {"plain": lambda: F.attention_bwd(dy, F.attention_fwd(q, k, v)[1]),
           "blockwise": lambda: blockwise.attention_bwd(dy, *blockwise.attention_fwd(q, k, v))}
times = {name: [] for name in kernels}
for _ in range(11):  # interleaved, so a busy moment of the machine slows both alike
    for name, fn in kernels.items():
        times[name].append(median_seconds(fn, 1))
t_plain, t_blk = (sorted(times[name])[5] for name in kernels)
print(f"plain {t_plain * 1e3:.1f} ms, blockwise {t_blk * 1e3:.1f} ms per forward + backward: "
      f"ratio {t_blk / t_plain:.2f}")

# %% [markdown]
# (A ratio under 1 means the blockwise kernel is faster here. It does 0.625 of the FLOPs, and
# its backward recomputes q k^T (5 products against the plain kernel's 4), in products of
# 64-wide blocks that run a little below the plain kernel's GEMM speed; measured on a 2-core
# machine: about 0.9. Numbers on a shared machine are noisy: rerun the cell.)
#
# ## 3. Activation memory against sequence length: none, selective, full
#
# What one block keeps for backward per microbatch (lesson 6's table, for tp = 1), per the
# recomputation mode:
#
# - **none**, plain kernel: e [sbh (16 + as/h) + 2sb]; the softmax, a s^2 b values, grows as T^2;
# - **none**, blockwise kernel: the softmax is replaced by the log-sum-exp, a s b values: O(T);
# - **selective**: keep [Q|K|V] and rerun the attention core in backward: no term in s^2 (or
#   in a s b) is left, e sbh (16 + 2/h);
# - **full**: keep only the block's input, e sbh, and rerun the whole block in backward.
#
# Measured (the one meter, `activation_breakdown`) beside the formula
# (`costmodel.block_activation_terms`, which the simulator uses too):

# %%
cfg0 = ModelConfig(vocab_size=16, seq_len=16, n_layers=1, d_model=32, n_heads=4)
Bm = 2
SEQS = [16, 32, 64, 128]
MODES = [("plain", "none"), ("blockwise", "none"), ("plain", "selective"), ("plain", "full")]
measured = {mode: [] for mode in MODES}
formula = {mode: [] for mode in MODES}
for t in SEQS:
    cfg_t = replace(cfg0, seq_len=t)
    for attention, rc in MODES:
        got = measure_block_activations(cfg_t, 1, False, Bm, recompute=rc,
                                        attention=attention)[0]
        measured[(attention, rc)].append(sum(got.values()))
        formula[(attention, rc)].append(activation_bytes_per_layer(
            cfg_t, Bm, 1, False, rc, attention=attention, **OURS))
print(f"{'T':>5s}" + "".join(f"{a + '/' + r:>18s}" for a, r in MODES) + "   (KiB, measured)")
for i, t in enumerate(SEQS):
    print(f"{t:5d}" + "".join(f"{measured[m][i] / 2**10:18.1f}" for m in MODES))
assert measured == formula  # every mode, every length, to the byte
h, a = cfg0.d_model, cfg0.n_heads
for i, t in enumerate(SEQS):
    sbh, sb = t * Bm * h, t * Bm
    assert measured[("plain", "none")][i] == E * (sbh * (16 + a * t / h) + 2 * sb)
    assert measured[("blockwise", "none")][i] == E * (sbh * 16 + 2 * sb + a * sb)
    assert measured[("plain", "selective")][i] == E * (sbh * 16 + 2 * sb)
    assert measured[("plain", "full")][i] == E * sbh

# %%
fig, ax = plt.subplots(figsize=(7, 4))
for mode, style in zip(MODES, ("o-", "s-", "^-", "v-")):
    ax.plot(SEQS, np.array(measured[mode]) / 2**10, style,
            label=f"{mode[0]} kernel, recompute {mode[1]}")
ax.set_xscale("log", base=2)
ax.set_yscale("log", base=2)
ax.set_xlabel("sequence length T")
ax.set_ylabel("KiB kept per block (measured = formula)")
ax.set_title(f"What one block keeps for backward (B={Bm}, C={h}, {a} heads, float64)")
ax.legend()
save_figure(fig, "14", "activations_vs_seq_len.png")

# %% [markdown]
# Only the plain kernel without recomputation bends upwards (its T^2 softmax); the others grow
# linearly. Selective recomputation and the blockwise kernel differ only by the log-sum-exp,
# a s b values. Full recomputation keeps 16x less than selective here, but pays for it in time:
#
# ## 4. What recomputation costs, and that it changes no number
#
# The kernels count the forward FLOPs a step runs, and which of them ran again in backward.
# Full recomputation reruns every block's forward; selective only the attention core. And since
# rerunning the same forward on the same inputs gives the same bits, every loss, gradient and
# updated weight is identical, not merely close.

# %%
from minipar.compare import random_batches, train_layout  # noqa: E402
from minipar.dist.comm import local_comm  # noqa: E402
from minipar.dist.mesh import Mesh  # noqa: E402
from minipar.engine import Engine  # noqa: E402

mcfg = ModelConfig(vocab_size=11, seq_len=64, n_layers=2, d_model=32, n_heads=4)
batches = random_batches(mcfg, steps=2, batch=4, seed=1)
x, y = batches[0]
results, counted = {}, {}
for rc in ("none", "selective", "full"):
    par = ParallelConfig(recompute=rc)
    engine = Engine(mcfg, par, Mesh.serial(), seed=0, dtype="float64")
    engine.train_step(x, y, int((y >= 0).sum()))
    counted[rc] = engine.forward_flops
    results[rc] = train_layout(local_comm(), mcfg, par, batches, seed=0)
for rc, (fwd, again) in counted.items():
    print(f"recompute {rc:9s}: forward {fwd / 1e6:7.2f} MFLOP per step, {again / 1e6:6.2f} of it "
          f"rerun in backward (+{again / counted['none'][0]:.0%})")
for rc in ("selective", "full"):
    assert results[rc].losses == results["none"].losses
    assert all(np.array_equal(results[rc].params[n], results["none"].params[n])
               for n in results["none"].params)
print("losses and updated weights identical, bit for bit, in all three modes")

# %% [markdown]
# Selective recomputation is cheap where the core is a small part of the FLOPs (short T) and
# the memory it saves is largest where T is long; Korthikanti et al. report that it removes
# over 90% of full recomputation's time overhead at the scale of their models.
#
# ### Try: a longer sequence
#
# Predict first: at T = 256 (4x longer), by how much does the plain kernel's softmax grow, and
# by how much the blockwise kernel's log-sum-exp? Change `T_TRY` and check.

# %%
T_TRY = 256  # Try: 128, 512
cfg_try = replace(cfg0, seq_len=T_TRY)
core = {att: measure_block_activations(cfg_try, 1, False, Bm, attention=att)[0]["attn"]
        - E * 3 * Bm * T_TRY * h for att in ("plain", "blockwise")}
print(f"T = {T_TRY}: softmax {core['plain']:,d} B, log-sum-exp {core['blockwise']:,d} B, "
      f"ratio {core['plain'] // core['blockwise']} = T")
assert core["plain"] == core["blockwise"] * T_TRY

# %% [markdown]
# ### Break it: forget to rescale the running sum
#
# The classic mistake in an online softmax: when a new block raises the maximum, the earlier
# sums were taken against the old maximum and must be multiplied by exp(m - m'). Leave that
# out and the result is silently wrong whenever a later block holds a larger score; the
# comparison with the plain kernel (the check every minipar kernel test makes) finds it.

# %%
def broken_online(s, v, block=3):
    m, l, acc = -np.inf, 0.0, np.zeros(v.shape[1])
    for lo in range(0, len(s), block):
        m = max(m, s[lo:lo + block].max())  # the new maximum, but no exp(m_old - m) rescale
        l = l + np.exp(s[lo:lo + block] - m).sum()
        acc = acc + np.exp(s[lo:lo + block] - m) @ v[lo:lo + block]
    return acc / l


s_up = np.arange(9.0)  # every block raises the maximum
p_up = np.exp(s_up - s_up.max()) / np.exp(s_up - s_up.max()).sum()
err = np.abs(broken_online(s_up, v_row) - p_up @ v_row).max()
print(f"without the rescale: off by {err:.3f}")
assert err > 1e-2

# %% [markdown]
# ## 5. Context parallelism (ring attention)
#
# *To come (issue 14, item 1): split the sequence over ranks; each rank keeps its query block
# and passes key/value blocks around a ring, folding each one in with
# `blockwise.forward_step` (and `backward_step` in backward) exactly as in section 2, with the
# zig-zag split that balances the causal work; activation memory per rank against cp = 1, 2, 4
# measured beside the formulas.*
#
# ## Summary
#
# - Plain attention keeps a (T, T) softmax per head and does 4 T^2 D FLOPs, masked half
#   included: both grow 4x when T doubles (measured).
# - The online softmax folds key blocks in one at a time with a running max and normaliser;
#   backward needs only the log-sum-exp. Blocks above the causal diagonal never run.
# - Per block: none keeps e [sbh (16 + as/h) + 2sb], blockwise replaces as/h by a/h, selective
#   drops it, full keeps e sbh; measured = formula to the byte, and no number changes.
