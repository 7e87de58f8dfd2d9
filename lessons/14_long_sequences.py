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
# Recomputation and the blockwise kernel shrink what one rank keeps, but every rank still sees
# all T tokens. Context parallelism (`--cp N`, `minipar/parallel/context.py`) splits every
# sequence over N ranks for the *whole* block. LayerNorm, the projections and the MLP act on
# each token alone, so they run on the rank's T/N tokens and nothing moves. Attention needs the
# earlier keys: **ring attention** (Liu et al. 2023) keeps each rank's queries in place and
# passes the key/value blocks around the ring, one hop per step, each block folded in with
# `blockwise.forward_step`, the online softmax of section 2. After N steps every query has met
# every key. Backward sends K/V around again, and beside them the gradient accumulators dK/dV:
# each rank adds its queries' share and passes the sum on; one last hop brings every block's
# gradient home.
#
# ### Which tokens a rank holds
#
# The causal mask makes the cut matter. Cut contiguously, rank 0's queries see only its own
# keys while the last rank's see all of them. The **zig-zag** cut (Megatron-LM's context
# parallelism) cuts T into 2N chunks and gives rank r chunks r and 2N-1-r, an early and a late
# one. Count the (query chunk, key chunk) pairs each rank computes, and the FLOPs:

# %%
from minipar.dist.comm import run_threads  # noqa: E402
from minipar.parallel import context  # noqa: E402

T_CP, D_CP = 64, 16
for split in ("contiguous", "zigzag"):
    print(f"{split:10s} rank 0 holds tokens "
          f"{context.token_indices(T_CP, 4, 0, split)[[0, -1]].tolist()} (first, last); "
          f"chunk pairs per rank {context.pair_counts(T_CP, 4, split)}")
ring_work = {split: [context.ring_flops(T_CP, D_CP, 4, r, split) for r in range(4)]
             for split in ("contiguous", "zigzag")}
for split, per in ring_work.items():
    print(f"{split:10s} forward attention FLOPs per rank {per}: busiest / mean = "
          f"{max(per) / np.mean(per):.2f}")
assert context.pair_counts(T_CP, 4, "zigzag") == [2 * 4 + 1] * 4  # (r + 1) + (2N - r) each
assert context.pair_counts(T_CP, 4, "contiguous") == [1, 2, 3, 4]


# %% [markdown]
# And in time: each rank's kernel work alone (its queries against the key blocks the ring
# brings it, forward and backward, no communication), timed one rank after the other:

# %%
def rank_kernel_work(t: int, cp: int, rank: int, split: str, n: int = 4, d: int = 32):
    """A function running one rank's ring kernels (forward_step + backward_step for every key
    block the ring brings it) with no messages: the work the causal cut gives that rank."""
    rng = np.random.default_rng(0)
    q, k, v, dy = (rng.normal(size=(n, t, d)) for _ in range(4))
    mine = context.segments(t, cp, rank, split)
    others = [context.segments(t, cp, r, split) for r in range(cp)]
    scale = 1 / np.sqrt(d)

    def once():
        for qa, qb in mine:
            st = blockwise.init_state(q[:, qa:qb])
            grads = (np.zeros((n, qb - qa, d)), np.zeros((n, t, d)), np.zeros((n, t, d)))
            for segs in others:
                for ka, kb in segs:
                    blockwise.forward_step(q[:, qa:qb], k[:, ka:kb], v[:, ka:kb], st, scale,
                                           qa, ka)
            _, lse = blockwise.finish(st)
            for segs in others:
                for ka, kb in segs:
                    blockwise.backward_step(q[:, qa:qb], k[:, ka:kb], v[:, ka:kb],
                                            dy[:, qa:qb], lse, lse * 0, scale,
                                            (grads[0], grads[1][:, ka:kb], grads[2][:, ka:kb]),
                                            qa, ka)
    return once


T_TIME, CP_TIME, REPEATS = 1024, 4, 5
work = {(split, r): rank_kernel_work(T_TIME, CP_TIME, r, split)
        for split in ("contiguous", "zigzag") for r in range(CP_TIME)}
samples: dict = {key: [] for key in work}
for _ in range(REPEATS):  # interleaved: a busy moment of the machine slows every rank alike
    for key, fn in work.items():
        t0 = time.process_time()  # CPU time: other processes on a shared machine do not count
        fn()
        samples[key].append(time.process_time() - t0)
timed = {split: [float(np.median(samples[split, r])) for r in range(CP_TIME)]
         for split in ("contiguous", "zigzag")}
for split, secs in timed.items():
    print(f"{split:10s} T {T_TIME}, cp {CP_TIME}: kernel CPU ms per rank "
          f"{[round(1e3 * x, 1) for x in secs]}; busiest / mean {max(secs) / np.mean(secs):.2f}")

fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
for ax, (what, data, unit) in zip(axes, (("forward FLOPs (T 64)", ring_work, 1e6),
                                         (f"kernel CPU time, T {T_TIME}", timed, 1e-3))):
    for i, (split, per) in enumerate(data.items()):
        ax.bar(np.arange(len(per)) + 0.4 * i, np.array(per) / unit, 0.4, label=split)
    ax.set_xlabel("cp rank")
    ax.set_title(what + (" (M)" if unit == 1e6 else " (ms)"))
axes[0].legend()
save_figure(fig, "14", "cp_balance.png")

# %% [markdown]
# The contiguous cut leaves rank 0 nearly idle and rank 3 with four times its work: every
# ring step waits for the slowest rank, so the step runs at the busiest rank's pace. Zig-zag
# gives every rank the same 2N + 1 chunk pairs. The times follow the FLOPs only roughly: the
# machine is shared, and small products run at a lower rate than large ones; the FLOP counts
# are exact.
#
# ### The ring, by hand
#
# Four ranks in an in-process world, each with its T/4 tokens of q, k, v. Put the pieces back
# in sequence order and compare with the plain kernel on the whole sequence:

# %%
def ring_on_threads(q, k, v, cp, split):
    """Run the ring forward on cp thread ranks; the output in sequence order, and what each
    rank's cp group recorded."""
    t = q.shape[1]

    def rank(comm):
        idx = context.token_indices(t, cp, comm.rank, split)
        ring = context.Ring(comm, split, t)
        y, _ = ring.forward(*(np.ascontiguousarray(a[:, idx]) for a in (q, k, v)))
        return idx, y, comm.stats.as_dict()

    out = np.zeros_like(q)
    stats = []
    for idx, y_r, st in run_threads(rank, cp):
        out[:, idx] = y_r
        stats.append(st)
    return out, stats


rng = np.random.default_rng(3)
qh, kh, vh = (rng.normal(size=(6, T_CP, D_CP)) for _ in range(3))
y_ring, ring_stats = ring_on_threads(qh, kh, vh, 4, "zigzag")
y_plain, _ = F.attention_fwd(qh[None], kh[None], vh[None])
print(f"ring attention vs plain: max difference {np.abs(y_ring - y_plain[0]).max():.1e}")
print(f"rank 0 sent {ring_stats[0]['send']['calls']} messages of "
      f"{ring_stats[0]['send']['bytes'] // ring_stats[0]['send']['calls']:,d} B "
      f"(its K and V: 2 x 6 heads x {T_CP // 4} tokens x {D_CP} x 8 B)")
assert np.allclose(y_ring, y_plain[0], rtol=1e-12, atol=1e-12)
assert ring_stats[0]["send"]["calls"] == 3  # N - 1 hops forward

# %% [markdown]
# ### A traced run: the ring on the timeline
#
# `--cp 4` under `mpirun`, with `--trace` (Chrome trace) and `--plot` (the last step's
# timeline). On the cp group, every `isend`/`irecv` of the ring and every wait for a block is
# an event of its own:

# %%
import json  # noqa: E402

from minipar.lessons import mpirun, out_dir, show_image  # noqa: E402

OUT14 = out_dir("14")
book = OUT14 / "book.txt"
book.write_text("It was the best of times, it was the worst of times. " * 400)
log = mpirun(4, ["-m", "minipar.train", "--quiet", "--cp", "4", "--task", "text", "--data",
                 book, "--seq-len", "256", "--steps", "3", "--eval-every", "3",
                 "--batch-size", "4", "--trace", OUT14 / "cp_trace.json", "--plot", OUT14],
             stream=False)
print("\n".join(ln for ln in log.splitlines() if ln.startswith(("minipar", "context", "done",
                                                                "memory"))))

# %%
show_image(OUT14 / "timeline.png")

# %%
trace = [e for e in json.loads((OUT14 / "cp_trace.json").read_text())["traceEvents"]
         if e.get("ph") == "X" and e.get("args", {}).get("group") == "cp"]
by_name: dict = {}
for e in trace:
    by_name.setdefault(e["name"], []).append(e.get("dur", 0.0) / 1e3)
for name, durs in sorted(by_name.items()):
    print(f"{name:16s} {len(durs):5d} events, {sum(durs):8.1f} ms in all")

# %% [markdown]
# Per step and block, each rank posts N - 1 = 3 key/value hops forward and 3 + 4 in backward
# (K/V again, and dK/dV, whose last hop brings each block's gradient home), the counts
# `sim.comm_volume.cp_ring` predicts and the tests check against `CommStats` call for call.
# Inside a forward box the ring's sends start before the block's products and the waits come
# after them: the transfer overlaps the compute.
#
# ### Activation memory per rank against T: cp = 1, 2, 4
#
# With cp ranks, a block keeps what the blockwise kernel keeps for a sequence T/cp long: every
# term of section 3 with s replaced by s/cp, so cp times less per rank. Measured on every rank
# of an in-process cp world (`measure_block_activations(..., cp=)`) beside the formula
# (`block_activation_terms(..., cp=)`):

# %%
CPS = [1, 2, 4]
cp_measured = {cp: [] for cp in CPS}
cp_formula = {cp: [] for cp in CPS}
for t in SEQS:
    cfg_t = replace(cfg0, seq_len=t)
    for cp in CPS:
        ranks = measure_block_activations(cfg_t, 1, False, Bm, attention="blockwise", cp=cp)
        cp_measured[cp].append(max(sum(r.values()) for r in ranks))  # the busiest rank
        cp_formula[cp].append(activation_bytes_per_layer(cfg_t, Bm, 1, False, "none",
                                                         attention="blockwise", cp=cp, **OURS))
print(f"{'T':>5s}" + "".join(f"{'cp ' + str(cp):>12s}" for cp in CPS) + "   (KiB per rank)")
for i, t in enumerate(SEQS):
    print(f"{t:5d}" + "".join(f"{cp_measured[cp][i] / 2**10:12.1f}" for cp in CPS))
assert cp_measured == cp_formula
for cp in CPS:
    assert all(one == cp * mine for one, mine in zip(cp_measured[1], cp_measured[cp]))

fig, ax = plt.subplots(figsize=(7, 4))
for cp, style in zip(CPS, ("o-", "s-", "^-")):
    ax.plot(SEQS, np.array(cp_measured[cp]) / 2**10, style, label=f"cp {cp} (measured)")
    ax.plot(SEQS, np.array(cp_formula[cp]) / 2**10, "k:", linewidth=0.8)
ax.set_xscale("log", base=2)
ax.set_yscale("log", base=2)
ax.set_xlabel("sequence length T")
ax.set_ylabel("KiB one rank's block keeps")
ax.set_title("Context parallelism: activations per rank fall as 1/cp (dotted: formula)")
ax.legend()
save_figure(fig, "14", "activations_vs_cp.png")

# %% [markdown]
# And it changes no number beyond rounding: a cp = 2 run trains to the serial run's losses,
# gradients and weights (the tests check every cp layout, with dp, tp + sp and pp, both cuts
# and every recomputation mode, in threads and under `mpirun`):

# %%
from minipar.compare import mismatches, serial_reference  # noqa: E402

cp_par = ParallelConfig(cp=2, recompute="selective")
cp_run = run_threads(lambda w: train_layout(w, mcfg, cp_par, batches, seed=0), 2)[0]
assert not mismatches(cp_run, serial_reference(mcfg, batches, seed=0), rtol=1e-9)
print(f"cp 2 (zig-zag, selective recomputation) losses {np.round(cp_run.losses, 6).tolist()} "
      f"== serial")

# %% [markdown]
# ### Try: cp = 8
#
# Predict first: with T = 64 and cp = 8 under zig-zag, how many chunk pairs does each rank
# compute, and how many with the contiguous cut on its last rank? Change `CP_TRY`.

# %%
CP_TRY = 8  # Try: 2, 16
print(f"cp {CP_TRY}: zig-zag {context.pair_counts(T_CP, CP_TRY, 'zigzag')}, contiguous "
      f"{context.pair_counts(T_CP, CP_TRY, 'contiguous')}")
assert context.pair_counts(T_CP, CP_TRY, "zigzag") == [2 * CP_TRY + 1] * CP_TRY

# %% [markdown]
# ## Summary
#
# - Plain attention keeps a (T, T) softmax per head and does 4 T^2 D FLOPs, masked half
#   included: both grow 4x when T doubles (measured).
# - The online softmax folds key blocks in one at a time with a running max and normaliser;
#   backward needs only the log-sum-exp. Blocks above the causal diagonal never run.
# - Per block: none keeps e [sbh (16 + as/h) + 2sb], blockwise replaces as/h by a/h, selective
#   drops it, full keeps e sbh; measured = formula to the byte, and no number changes.
# - Context parallelism splits the sequence over cp ranks for the whole block; ring attention
#   passes K/V blocks (and dK/dV in backward) around the ring with the same online softmax.
#   The zig-zag cut gives every rank 2cp + 1 chunk pairs; contiguous gives 1, 2, ..., cp.
#   Activations per rank are the blockwise terms at s/cp: measured = formula, cp times less.
