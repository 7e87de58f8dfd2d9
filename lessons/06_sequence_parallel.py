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
# # Lesson 6: sequence parallelism — stop storing the same activations tp times
#
# **Prerequisites.** Lesson 5 (column- and row-parallel layers, f and g, heads over ranks) and
# lesson 2 (allreduce = reduce-scatter + allgather). What a layer caches for its backward pass
# (lesson 1).
#
# **You will be able to** count the activation bytes a Transformer layer keeps, term by term,
# under tensor parallelism with and without sequence parallelism, check the count against a
# measurement and against Korthikanti et al.'s table, and say which collectives replace f and g.
#
# Tensor parallelism (lesson 5) splits every matrix of a block over the tp group, but between
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
import matplotlib.pyplot as plt
import numpy as np

from minipar.config import ModelConfig
from minipar.lessons import save_figure
from minipar.sim.activations import measure_block_activations
from minipar.sim.costmodel import activation_bytes_per_layer, block_activation_terms

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


wire = {}
for sp in (False, True):
    fwd, bwd = run_threads(lambda comm: block_traffic(comm, sp), 4)[0]
    for label, stats in (("forward", fwd), ("backward", bwd)):
        calls = ", ".join(f"{op} x{d['calls']}" for op, d in stats.items())
        wire[sp, label] = sum(d["wire_bytes"] for d in stats.values())
        print(f"sequence parallel {sp!s:5s} {label:8s}: {calls:40s} wire "
              f"{wire[sp, label]:7d} bytes")
assert wire[True, "forward"] == wire[False, "forward"]  # same bytes as the allreduces
print(f"Backward, the two re-gathers add {wire[True, 'backward'] / wire[False, 'backward'] - 1:.0%}"
      " to the wire bytes: the price of storing no replicated activation.")

# %% [markdown]
# ## 3. Activation memory per rank against tp
#
# With sequence parallelism the four replicated rows are split too. For this model (no
# dropout, GELU's tanh recomputed in backward, e bytes per value, MLP width F = 4h) the exact
# count per block is, from the rows of the table above (ln1 + ln2 + attn.qkv + mlp.fc = 4 sbh
# + 2 sb; attn = 3 sbh/t + as^2 b/t; attn.proj = sbh/t; mlp and mlp.proj = 4 sbh/t each):
#
# - plain TP: e [sbh (4 + 12/t + as/(ht)) + 2sb]
# - TP + SP:  e [sbh (16 + as/h) + 2sb] / t, the serial block divided by t,
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
sb = s * B
for i, t in enumerate(TPS):  # the two lines of the text above, value for value
    assert measured[False][i] == E * (sbh * (4 + 12 / t + a * s / (h * t)) + 2 * sb)
    assert measured[True][i] == E * (sbh * (16 + a * s / h) + 2 * sb) / t
    assert measured[False][i] - measured[True][i] == E * (4 * sbh + 2 * sb) * (1 - 1 / t)
print(f"tp=1: {measured[False][0]:,d} B = {measured[False][0] / (E * sbh):.2f} sbh values "
      f"= 4 + 12 + as/h ({a * s / h:g}) + 2sb/sbh ({2 / h:.2f})")

# %%
# Measured and formula are equal (asserted above), and the paper's count without dropout
# differs from ours by 2sb in 4 sbh: drawn, the three curves would sit on top of each other.
# So each mode is one curve, the measurement as dots joined by the formula.

# %%
fig, ax = plt.subplots(figsize=(7, 4))
for sp, color, label in ((False, "tab:red", "tensor parallel"),
                         (True, "tab:blue", "tensor + sequence parallel")):
    ax.plot(TPS, np.array(measured[sp]) / 2**10, "o-", color=color,
            label=f"{label}: measured (dots) = formula (line)")
ax.axhline(4 * sbh * E / 2**10, color="gray", lw=0.8, ls="--")
ax.annotate("replicated 4 sbh", (TPS[0], 4 * sbh * E / 2**10), ha="left", va="bottom")
ax.set_xscale("log", base=2)
ax.set_xticks(TPS, [str(t) for t in TPS])
ax.set_xlabel("tensor-parallel ranks t")
ax.set_ylabel("KiB kept per rank per block")
ax.set_title(f"Activation memory of one block (B={B}, T={s}, C={h}, {a} heads, float64)")
ax.legend(fontsize=8)
fig.tight_layout()
save_figure(fig, "06", "activation_memory.png")

# %% [markdown]
# Without sequence parallelism the curve flattens towards the replicated 4 sbh, however many
# ranks we add; with it the bytes fall as 1/t all the way. The saving is the replicated part
# times (1 - 1/t) (asserted above).
#
# ### Try: batch and sequence length
#
# Every term of the count is proportional to sbh except the attention scores, as^2 b, which
# are proportional to sbh x as/h. So changing the batch B leaves every row of the table in
# units of sbh unchanged, while doubling the sequence doubles only the `attn` row's softmax
# part. Change `B_TRY` and `S_TRY` and check.

# %%
B_TRY, S_TRY = 3, 32  # Try: other batches, other sequence lengths (tp=4 must divide S_TRY)
long_cfg = ModelConfig(vocab_size=16, seq_len=S_TRY, n_layers=1, d_model=h, n_heads=a)
rows = measure_block_activations(long_cfg, 4, False, B_TRY)[0]
units = {k: v / (E * S_TRY * B_TRY * h) for k, v in rows.items()}
base = {k: v / (E * sbh) for k, v in measure_block_activations(cfg, 4, False, B)[0].items()}
print("tp=4, in units of sbh:", {k: round(v, 3) for k, v in units.items()})
for name in units:
    if name == "attn":  # 3/t for [Q|K|V], plus as/(ht) for the softmax
        assert np.isclose(units[name], 3 / 4 + a * S_TRY / (h * 4))
    else:  # LayerNorms: 1 + 1/h; the rest: whole multiples of sbh / t
        assert np.isclose(units[name], base[name])
print(f"only attn changed: {base['attn']:.3f} -> {units['attn']:.3f} sbh (as/(ht) = "
      f"{a * S_TRY / (h * 4):.3f})")

# %% [markdown]
# ### Try: many more ranks
#
# With 16 heads the block splits over up to 16 ranks. Expect TP+SP to keep exactly the serial
# bytes / t at every t, while plain TP approaches the replicated 4 sbh + 2 sb and its share of
# the total grows. Change `T_TRY`.

# %%
T_TRY = 16  # Try: 2, 4, 8 (must divide the 16 heads and the 16 tokens)
cfg16 = ModelConfig(vocab_size=16, seq_len=s, n_layers=1, d_model=h, n_heads=16)
serial16 = sum(measure_block_activations(cfg16, 1, False, B)[0].values())
sp16 = sum(measure_block_activations(cfg16, T_TRY, True, B)[0].values())
tp16 = sum(measure_block_activations(cfg16, T_TRY, False, B)[0].values())
replicated = E * (4 * sbh + 2 * s * B)
print(f"t={T_TRY}: TP+SP {sp16:,d} B = serial {serial16:,d} B / {serial16 / sp16:g}; plain TP "
      f"{tp16:,d} B, of which {replicated / tp16:.0%} is the replicated 4 sbh + 2 sb")
assert sp16 * T_TRY == serial16
assert tp16 == activation_bytes_per_layer(cfg16, B, T_TRY, False, **OURS)
#
# ## 4. The ratio, ours and the paper's
#
# How much does sequence parallelism save, SP / TP? Ours and the paper's without dropout differ
# only by LayerNorm's 2 sb, a fraction 1/h of the rest, so the ratios meet as the model widens.
# The paper's own numbers (with dropout masks) are a little different, because dropout adds
# replicated bytes. At GPT-3 scale (s = 2048, h = 12288, a = 96, t = 8), the last lines below
# give the paper's bytes per layer with and without sequence parallelism; most of what SP
# leaves is the attention softmax, 5as/(ht) sbh, which selective recomputation (the paper's
# other half) removes.

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
per = {sp: activation_bytes_per_layer(gpt3, 1, 8, sp) / (2048 * 12288) for sp in (False, True)}
softmax = 5 * 96 * 2048 / (12288 * 8)
print(f"GPT-3, t = 8: {per[False]:.1f} sbh bytes per layer with tensor parallelism, "
      f"{per[True]:.1f} sbh with sequence parallelism too, of which the softmax is "
      f"{softmax:.1f} sbh ({softmax / per[True]:.0%})")
assert softmax > per[True] / 2  # "most of what SP leaves"

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
assert got == want

# %% [markdown]
# ### Break it: forget that the LayerNorm gradients are partial sums
#
# Under sequence parallelism each tp rank runs the LayerNorms (and adds the biases of the
# row-parallel layers) on its own T/tp tokens only, so its gradient for those parameters is
# a partial sum. Parameters know it (`Param.tp_partial_grad`), and the data-parallel sync
# adds the partial sums over tp. Clear the mark and that one allreduce disappears. The step
# still runs without any error; only the comparison with the serial run (the check every
# minipar test makes) finds it, and names exactly the parameters concerned.

# %%
from minipar.compare import RunResult  # noqa: E402
from minipar.dist.mesh import Mesh  # noqa: E402
from minipar.engine import Engine  # noqa: E402

sp_par = ParallelConfig(tp=2, sequence_parallel=True)
x1, y1 = batches[0]


def forget_partial(world):
    engine = Engine(mcfg, sp_par, Mesh(world, tp=2), seed=1, dtype="float64", lr=1e-2,
                    weight_decay=0.01, grad_clip=0.0)
    partial = sorted({p.name for p in engine.params if p.tp_partial_grad})
    for p in engine.params:
        p.tp_partial_grad = False  # BUG: treat the partial sums as whole gradients
    loss = engine.train_step(x1, y1, int((y1 >= 0).sum())).loss
    return partial, RunResult([loss], engine.full_params(), engine.full_params(grads=True))


partial, broken = run_threads(forget_partial, 2)[0]
one_step = serial_reference(mcfg, [(x1, y1)], seed=1, grad_clip=0.0)
report = [r for r in mismatches(broken, one_step, rtol=1e-9) if r.startswith("grads")]
print(f"{len(report)} gradients differ from the serial run, e.g.\n  " + "\n  ".join(report[:3]))
named = {r.split()[1].rstrip(":") for r in report}
print("all of them partial sums under SP:", named <= set(partial))
assert report and named <= set(partial)

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
