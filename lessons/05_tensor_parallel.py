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
# # Lesson 5: tensor parallelism — splitting every matrix of a layer
#
# **Prerequisites.** Lesson 1 (the block's kernels and their backward passes) and lesson 2
# (allreduce, `run_threads`, `CommStats`). Matrix products by blocks: (x W)[:, cols] = x W[:, cols].
#
# **You will be able to** split an MLP and an attention layer over tp ranks, say where the two
# collectives f and g go and why, predict the bytes a block moves per microbatch, and compute a
# softmax loss over a vocabulary split over ranks.
#
# Data parallelism copies the whole model to every rank. When one layer's weights (or its
# activations) no longer fit, we split the *matrices themselves* over a group of ranks, the
# tensor-parallel (tp) group. Megatron-LM (Shoeybi et al. 2019) found a split of the
# Transformer that needs only two small collectives per half-block. In this lesson we
#
# 1. split a linear layer by columns and by rows by hand, on an in-process world of ranks,
# 2. see what goes wrong without the two conjugate operators f and g, and why they work,
# 3. use minipar's column- and row-parallel layers and count their collectives,
# 4. split attention by heads, and
# 5. compute the loss over a vocabulary split over ranks, without ever gathering the logits;
# 6. then train the whole model with tp = 2 and check it against the serial run, number for
#    number, in threads and under `mpirun`.
#
# Shapes follow `minipar/nn/functional.py`: B batch, T tokens, C width, F MLP width,
# V vocabulary; `/tp` marks a rank's share.

# %%
import numpy as np

from minipar.dist.comm import local_comm, run_threads
from minipar.nn import functional as F

rng = np.random.default_rng(0)
B, T, C, FF, TP = 2, 4, 8, 16, 2
x = rng.normal(size=(B, T, C))  # (B, T, C)
W1 = rng.normal(0.0, 0.3, size=(C, FF))  # (C, F): the MLP's first matrix
W2 = rng.normal(0.0, 0.3, size=(FF, C))  # (F, C): its second


def mlp_serial(x):
    h, _ = F.linear_fwd(x, W1)  # (B, T, F)
    a, _ = F.gelu_fwd(h)  # (B, T, F)
    y, _ = F.linear_fwd(a, W2)  # (B, T, C)
    return y


y_serial = mlp_serial(x)

# %% [markdown]
# ## 1. Columns, then rows
#
# Cut `W1` by **columns**: rank r holds `W1[:, cols_r]`, multiplies the *whole* input by it and
# gets its own slice of the output, `h[..., cols_r]`. Concatenating the slices gives `x W1`.
# GELU acts elementwise, so each rank applies it to its slice with no communication.
#
# Cut `W2` by **rows** to match: rank r holds `W2[cols_r, :]`, exactly the rows that its slice
# of `a` multiplies. Each rank's product is a *partial sum* of the full output; adding the
# partial sums gives `a W2`. So one MLP needs a single sum over ranks, at the very end.

# %%
W1_cols = np.split(W1, TP, axis=1)  # TP pieces of (C, F/tp)
W2_rows = np.split(W2, TP, axis=0)  # TP pieces of (F/tp, C)
h_slices = [F.linear_fwd(x, w)[0] for w in W1_cols]  # each (B, T, F/tp)
print("column slices concatenated == x W1:",
      np.allclose(np.concatenate(h_slices, axis=-1), x @ W1))
partials = [F.linear_fwd(F.gelu_fwd(h)[0], w)[0] for h, w in zip(h_slices, W2_rows)]
print("partial sums added == serial MLP:", np.allclose(sum(partials), y_serial))

# %% [markdown]
# Now on real ranks: `run_threads(fn, n)` runs `fn(comm)` on n threads, one per rank, each with
# its own communicator. Every rank holds only its pieces of the weights; the sum of partial
# outputs is an **allreduce**.

# %%
def mlp_rank(comm):
    h, _ = F.linear_fwd(x, W1_cols[comm.rank])  # (B, T, F/tp): this rank's columns
    a, _ = F.gelu_fwd(h)  # (B, T, F/tp)
    partial, _ = F.linear_fwd(a, W2_rows[comm.rank])  # (B, T, C): a partial sum
    return comm.allreduce(partial)  # (B, T, C): the whole output, on every rank


for r, y in enumerate(run_threads(mlp_rank, TP)):
    print(f"rank {r}: output equals serial: {np.allclose(y, y_serial)}")

# %% [markdown]
# ## 2. Why the conjugate operators f and g
#
# Megatron names the two places where ranks talk:
#
# - **g**, after the row-parallel matrix: allreduce forward (add the partial sums), identity
#   backward (the output gradient is already whole on every rank);
# - **f**, before the column-parallel matrix: identity forward (every rank already has the
#   whole input), allreduce backward. Why? The input `x` feeds *every* rank's columns, so its
#   gradient is the sum of each rank's contribution `dh_r W1_r^T`.
#
# Each is the other's transpose ("conjugate").
#
# ### Break it: leave out f or g
#
# Run the backward pass by hand with f and g switched on or off, and with g wrongly summing in
# both directions.

# %%
dy = rng.normal(size=(B, T, C))  # the gradient arriving from the rest of the network


def serial_backward():
    h, c1 = F.linear_fwd(x, W1)
    a, cg = F.gelu_fwd(h)
    y, c2 = F.linear_fwd(a, W2)
    da, _, _ = F.linear_bwd(dy, c2)
    dx, _, _ = F.linear_bwd(F.gelu_bwd(da, cg), c1)
    return y, dx


def parallel_mlp(comm, g_forward=True, f_backward=True, g_backward=False):
    h, c1 = F.linear_fwd(x, W1_cols[comm.rank])  # f forward: identity
    a, cg = F.gelu_fwd(h)
    y, c2 = F.linear_fwd(a, W2_rows[comm.rank])
    if g_forward:
        y = comm.allreduce(y)  # g forward: sum the partial outputs
    dy_in = comm.allreduce(dy) if g_backward else dy  # g backward should be the identity
    da, _, _ = F.linear_bwd(dy_in, c2)
    dx, _, _ = F.linear_bwd(F.gelu_bwd(da, cg), c1)  # (B, T, C): this rank's contribution
    if f_backward:
        dx = comm.allreduce(dx)  # f backward: sum the contributions
    return y, dx


y_ref, dx_ref = serial_backward()


def rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


errors = {}
for label, kw in [("f and g (Megatron)", {}), ("no g", {"g_forward": False}),
                  ("no f", {"f_backward": False}),
                  ("g allreduces backward too", {"g_backward": True})]:
    y, dx = run_threads(lambda comm: parallel_mlp(comm, **kw), TP)[0]
    errors[label] = rel(y, y_ref), rel(dx, dx_ref)
    print(f"{label:28s} output error {errors[label][0]:.1e}   input-gradient error "
          f"{errors[label][1]:.1e}")
    if label.startswith("g allreduces"):
        assert np.allclose(dx, TP * dx_ref)  # exactly TP times too large, as said below
assert max(errors["f and g (Megatron)"]) < 1e-12
assert errors["no g"][0] > 0.1 and errors["no f"][1] > 0.1 and errors["no f"][0] < 1e-12

# %% [markdown]
# Without g each rank's output is only a partial sum (and the error reaches the loss). Without
# f each rank's input gradient misses the other ranks' columns. With g summing in backward as
# well, the gradient arrives tp times: it is exactly `TP x` too large. minipar writes the four
# halves as small named functions in `minipar/parallel/tensor.py`, with Megatron's names:
# f is `copy_to_tp`, g is `reduce_from_tp`:

# %%
from minipar.parallel import tensor

for fn in (tensor.copy_to_tp_fwd, tensor.copy_to_tp_bwd, tensor.reduce_from_tp_fwd,
           tensor.reduce_from_tp_bwd):
    print(f"{fn.__name__}: {fn.__doc__}")

# %% [markdown]
# ## 3. minipar's parallel layers, and what they cost
#
# `ColumnParallelLinear` is the serial kernel `linear_fwd` with f in front; `RowParallelLinear`
# is the serial kernel with g after it. Weights are drawn whole from (seed, name) and then cut
# to the rank's shard, so every layout starts from the serial weights. Each rank's
# communicator counts its calls and bytes (`comm.stats`): one MLP half costs one allreduce of
# (B, T, C) forward and one backward.

# %%
from minipar.nn.module import BuildContext
from minipar.parallel.tensor import ColumnParallelLinear, RowParallelLinear


def pair(comm):
    ctx = BuildContext(seed=0, dtype="float64", tp=comm)
    fc = ColumnParallelLinear(ctx, "fc", C, FF, 0.3)  # f, then x W1[:, cols]
    proj = RowParallelLinear(ctx, "proj", FF, C, 0.3)  # a W2[rows, :], then g
    y = proj.forward(fc.forward(x))
    forward = {op: (s["calls"], s["bytes"]) for op, s in comm.stats.as_dict().items()}
    comm.stats.reset()
    dx = fc.backward(proj.backward(dy))
    backward = {op: (s["calls"], s["bytes"]) for op, s in comm.stats.as_dict().items()}
    return y, dx, forward, backward, fc.w.data.shape


y1, dx1, _, _, full_shape = pair(local_comm("tp"))
y2, dx2, fwd, bwd, local_shape = run_threads(pair, TP)[0]
print("fc weight: serial", full_shape, "-> per rank", local_shape)
print("output and input gradient equal serial:", np.allclose(y1, y2), np.allclose(dx1, dx2))
print("forward (calls, bytes):", fwd, " backward:", bwd, " B*T*C*8 =", B * T * C * 8)
assert fwd == bwd == {"allreduce": (1, B * T * C * 8)}

# %% [markdown]
# ### Try: more tensor-parallel ranks
#
# With tp = 4 each rank holds a quarter of the columns of `fc` (C, F/4), computes a quarter
# of the work, and the allreduces stay the same size: they carry the (B, T, C) output, which
# does not depend on tp. On a real network the ring makes each rank send 2(tp-1)/tp of it
# (lesson 2), so the time grows a little with tp while the compute per rank shrinks as 1/tp.

# %%
TP_TRY = 4  # Try: 1, 2, 8 or 16 (must divide F = 16)
y4, dx4, fwd4, bwd4, shape4 = run_threads(pair, TP_TRY)[0]
print(f"tp={TP_TRY}: fc weight per rank {shape4}, forward {fwd4}, backward {bwd4}")
assert shape4 == (C, FF // TP_TRY) and np.allclose(y4, y1) and np.allclose(dx4, dx1)
assert fwd4 == bwd4 == ({"allreduce": (1, B * T * C * 8)} if TP_TRY > 1 else {})

# %% [markdown]
# ## 4. Attention, split by heads
#
# Heads are independent: head k's output needs only head k's queries, keys and values. So the
# fused `[Q | K | V]` projection is column-parallel *per head* (rank r takes the Q, K and V
# columns of its heads, not a contiguous third of the matrix), attention runs on the local
# heads with no communication, and the output projection is row-parallel. Again one allreduce
# forward and one backward. A whole block (attention + MLP) therefore costs exactly **2
# allreduces forward and 2 backward**.

# %%
from minipar.config import ModelConfig
from minipar.models.blocks import Block
from minipar.nn.module import init_full

cfg = ModelConfig(vocab_size=11, seq_len=T, n_layers=2, d_model=C, n_heads=4)
xb = rng.normal(size=(B, T, C))


def block_rank(comm):
    block = Block(BuildContext(0, "float64", comm), "blocks.0", cfg)
    y = block.forward(xb)
    fwd = {op: s["calls"] for op, s in comm.stats.as_dict().items()}
    comm.stats.reset()
    dxb = block.backward(np.ones_like(y))
    bwd = {op: s["calls"] for op, s in comm.stats.as_dict().items()}
    return y, dxb, fwd, bwd, block.attn.qkv.w.data, block.attn.local_heads


y_s, dx_s, *_ = block_rank(local_comm("tp"))
out = run_threads(block_rank, TP)
full_qkv = init_full(0, "blocks.0.attn.qkv.w", (C, 3 * C), 0.02, "float64")
d = C // cfg.n_heads
for r, (y, dxb, fwd, bwd, w_local, heads) in enumerate(out):
    mine = [part * C + (r * heads + k) * d + j for part in range(3) for k in range(heads)
            for j in range(d)]  # the Q, K and V columns of this rank's heads
    print(f"rank {r}: {heads} heads, qkv weight {w_local.shape} = full columns of its heads: "
          f"{np.array_equal(w_local, full_qkv[:, mine])}; block equals serial: "
          f"{np.allclose(y, y_s) and np.allclose(dxb, dx_s)}; collectives forward {fwd}, "
          f"backward {bwd}")
    assert fwd == bwd == {"allreduce": 2} and np.allclose(y, y_s)

# %% [markdown]
# ### Try: one head per rank
#
# With 4 heads on tp = 4 ranks each rank holds a single head: its Q, K and V columns are
# columns d k ... d (k+1) of each third of `qkv`. Still 2 allreduces forward and 2 backward,
# and still the serial block. Change `TP_HEADS` to 1, 2 or 4 (it must divide the 4 heads).

# %%
TP_HEADS = 4  # Try: 1, 2, 4
heads_out = run_threads(block_rank, TP_HEADS)
assert all(h == cfg.n_heads // TP_HEADS for *_, h in heads_out)
assert all(np.allclose(y, y_s) and np.allclose(g, dx_s) for y, g, *_ in heads_out)
print(f"tp={TP_HEADS}: {heads_out[0][5]} head(s) per rank, block equals serial on every rank")

# %% [markdown]
# ## 5. The vocabulary, split over ranks
#
# The embedding table (V, C) and the LM head (C, V) are the largest matrices of a small model.
# Each tp rank holds V/tp rows of the embedding: a token that lives elsewhere looks up zeros
# here, and g adds the ranks' pieces. The head is column-parallel: each rank computes the
# logits of its V/tp tokens only.
#
# Gathering the logits for the loss would move B x T x V numbers. The softmax needs only three
# numbers per token, each reduced over ranks with an allreduce of (B, T): the row maximum (for
# a stable exp), the sum of exponentials, and the target's logit (only the rank that holds the
# target contributes it). A vocabulary that tp does not divide is padded; padded logits are set
# to -inf, so they never change the loss. Below, 11 tokens over 4 ranks (12 slots, one padding
# slot on the last rank) filled with a large junk value on purpose.

# %%
from minipar.nn.module import Sharding
from minipar.parallel.tensor import VocabParallelCrossEntropy, padded_vocab

V, TPV = 11, 4
logits = rng.normal(size=(B, T, V)) * 2
targets = rng.integers(0, V, (B, T))
targets[0, :2] = -100  # ignored positions (padding of the batch, say)
loss_ref, cache = F.cross_entropy_fwd(logits.reshape(-1, V), targets.reshape(-1))
dlogits_ref = F.cross_entropy_bwd(1.0, cache).reshape(B, T, V)
slices = [Sharding(axis=2, parts=TPV, index=r, padded=padded_vocab(V, TPV)).local(logits)
          for r in range(TPV)]
slices[-1][..., -1] = 1e3  # junk in the padding slot


def loss_rank(comm):
    ce = VocabParallelCrossEntropy(BuildContext(0, "float64", comm), V)
    loss = ce.forward(slices[comm.rank].copy(), targets)
    moved = {op: (s["calls"], s["bytes"]) for op, s in comm.stats.as_dict().items()}
    return float(loss), ce.backward(), moved


out = run_threads(loss_rank, TPV)
dlogits = np.concatenate([d for _, d, _ in out], axis=-1)[..., :V]
print(f"serial loss {float(loss_ref):.12f}  vocab-parallel loss {out[0][0]:.12f}")
print("gradient equals serial:", np.allclose(dlogits, dlogits_ref))
print("collectives (calls, bytes):", out[0][2], f"vs gathering the logits: {B * T * V * 8} bytes")
assert np.isclose(out[0][0], float(loss_ref)) and np.allclose(dlogits, dlogits_ref)
assert out[0][2] == {"allreduce": (3, 3 * B * T * 8)}

# %% [markdown]
# At GPT-2 scale (V = 50257, B x T = 8 x 1024 tokens, 4-byte floats) the three allreduces
# move 3 x 32 KiB per step, while gathering the logits would move about 1.5 GiB.

# %%
print(f"3 x (B, T) floats: {3 * 8 * 1024 * 4 / 2**10:.0f} KiB;  (B, T, V) floats: "
      f"{8 * 1024 * 50257 * 4 / 2**30:.2f} GiB")

# %% [markdown]
# ## 6. The whole model, parallel == serial
#
# `minipar.compare.train_layout` trains any layout on the same batches as the serial run and
# returns losses, full (gathered) parameters and gradients, and each step's collectives.
# With tp = 2 (weights tied, a vocabulary that 2 does not divide) the two runs agree to
# float64 rounding, and the tp group moves exactly what `predict_comm_bytes` predicts: per
# microbatch 4 allreduces of (B, T, C) per block, one for the embedding, one for the head,
# and the loss's three of (B, T).

# %%
from minipar.compare import mismatches, random_batches, serial_reference, train_layout
from minipar.config import ParallelConfig
from minipar.sim.comm_volume import predict_comm_bytes

mcfg = ModelConfig(vocab_size=11, seq_len=8, n_layers=2, d_model=16, n_heads=4,
                   tie_weights=True)
par = ParallelConfig(tp=2)
batches = random_batches(mcfg, steps=3, batch=4, seed=0)
result = run_threads(lambda w: train_layout(w, mcfg, par, batches), par.world)[0]
reference = serial_reference(mcfg, batches)
print("losses  tp=2:", np.round(result.losses, 10))
print("losses serial:", np.round(reference.losses, 10))
print("differences beyond 1e-9:", mismatches(result, reference, rtol=1e-9))
got = {op: (s["calls"], s["bytes"]) for op, s in result.comm[0]["tp"].items()}
want = {op: (s["calls"], s["bytes"]) for op, s in predict_comm_bytes(mcfg, par, 4, 8)["tp"].items()}
print("tp traffic of one step:", got, " formula:", want)
assert got == want and not mismatches(result, reference, rtol=1e-9)

# %% [markdown]
# The same code runs one process per rank under MPI. The train CLI takes `--tp`:

# %%
from minipar.lessons import MPIRunError, mpirun, short_run_note

log = mpirun(2, ["-m", "minipar.train", "--model", "tiny", "--tp", "2", "--steps", "20",
                 "--eval-every", "20", "--quiet"], timeout=120, stream=False)
print(log)
print(short_run_note(log))

# %% [markdown]
# ### Break it: a tp that does not divide the heads
#
# Heads are the unit of the attention split, so tp must divide the number of heads (and the
# MLP width). A layout that breaks this is refused before any rank builds a layer or makes a
# collective: one line, naming the flag.

# %%
try:
    mpirun(3, ["-m", "minipar.train", "--model", "tiny", "--tp", "3", "--steps", "2",
               "--quiet"], timeout=60, stream=False)
    raise RuntimeError("--tp 3 with 4 heads was accepted")
except MPIRunError as exc:
    line = next(ln for ln in str(exc).splitlines() if "error:" in ln)
    print(line)
    assert "--tp 3" in line

# %% [markdown]
# ## What to remember
#
# - Column-parallel then row-parallel needs no communication in between; Megatron's f and g
#   (identity/allreduce and allreduce/identity) make the forward *and* the backward exact.
# - A block costs 2 allreduces of (B, T, C) forward and 2 backward; the vocabulary-parallel
#   loss costs 3 allreduces of (B, T), never the logits.
# - Weights are initialised whole and then sliced, so tp = 2 reproduces the serial run.
#
# Tensor parallelism splits the weights and the work, but look again at the block: the
# LayerNorms and the residual additions run on the whole (B, T, C) on *every* rank, and their
# activations are stored tp times. Lesson 6 removes that waste with sequence parallelism.
