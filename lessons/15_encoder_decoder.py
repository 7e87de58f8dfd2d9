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
# # Lesson 15: the encoder-decoder — the classic Transformer, trained and split over ranks
#
# **Prerequisites.** Lesson 1 (attention's forward and backward by hand) and lesson 5 (tensor
# parallelism: column/row-parallel linears, f and g, `comm.stats`).
#
# **You will be able to** write cross-attention (queries from one sequence, keys and values
# from another) and its backward, check it by central differences, train the encoder-decoder of
# Vaswani et al. 2017 to translate, decode with a key/value cache (greedy and beam search), and
# count the extra tensor-parallel traffic the encoder and the cross-attentions bring, and the
# extra pipeline traffic of carrying the encoder's output to every decoder stage.
#
# The Transformer of "Attention Is All You Need" has two stacks. The **encoder** reads the whole
# source with bidirectional self-attention (no causal mask; only padding is masked). The
# **decoder** writes the target one token at a time: causal self-attention, then
# **cross-attention** whose queries come from the decoder and whose keys and values come from
# the encoder's output (the *memory*), then the MLP. minipar builds it from the GPT's parts
# (`minipar/models/encdec.py`); the one new kernel pair is `functional.cross_attention_fwd/bwd`.

# %%
import numpy as np

from minipar.config import ModelConfig, ParallelConfig
from minipar.dist.comm import run_threads
from minipar.nn import functional as F

rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. Cross-attention by hand
#
# Per head: y = softmax(q k^T / sqrt(D) + bias) v, with q (Tq, D) from the decoder and k, v
# (Tk, D) from the memory; the bias is -inf on the source's padding. Tq and Tk differ: the
# score matrix is (Tq, Tk), not square, and there is no causal mask (the whole source is known).

# %%
B, TQ, TK, H, D = 2, 3, 5, 2, 4
q = rng.normal(size=(B, TQ, H * D))
kv = rng.normal(size=(B, TK, 2 * H * D))  # [K | V]
valid = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], bool)  # row 1: a 3-token source
bias = F.padding_bias(valid, "float64")  # (B, 1, TK)


def by_hand(q, kv, bias):
    k, v = kv[..., :H * D], kv[..., H * D:]
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            cols = slice(h * D, (h + 1) * D)
            s = q[b, :, cols] @ k[b, :, cols].T / np.sqrt(D) + bias[b]  # (TQ, TK)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            out[b, :, cols] = (p / p.sum(axis=1, keepdims=True)) @ v[b, :, cols]
    return out


y, cache = F.cross_attention_fwd(q, kv, H, bias)
print("kernel == by hand:", np.allclose(y, by_hand(q, kv, bias)))
assert np.allclose(y, by_hand(q, kv, bias))

# %% [markdown]
# ## 2. Its backward, checked by central differences
#
# Backward gives dq and d[K|V]: dv = p^T dy, dp = dy v^T, ds = p (dp - rowsum(dp p)) (the
# gradient of the scores), dq = ds k / sqrt(D), dk = ds^T q / sqrt(D). We check every entry
# against (L(x + h) - L(x - h)) / 2h for the loss L = sum(y * w) with a random w, in float64.
# Padded keys must get exactly zero gradient.

# %%
w = rng.normal(size=y.shape)
dq, dkv = F.cross_attention_bwd(w, cache)


def numeric(x, which, h=1e-6):
    g = np.zeros_like(x)
    for i in np.ndindex(*x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        args = (up, kv) if which == "q" else (q, up)
        lo = (down, kv) if which == "q" else (q, down)
        g[i] = ((F.cross_attention_fwd(*args, H, bias)[0] * w).sum()
                - (F.cross_attention_fwd(*lo, H, bias)[0] * w).sum()) / (2 * h)
    return g


err_q = np.abs(dq - numeric(q, "q")).max()
err_kv = np.abs(dkv - numeric(kv, "kv")).max()
print(f"max |analytic - numeric|: dq {err_q:.1e}, d[K|V] {err_kv:.1e}")
print("padded keys' gradient:", np.abs(dkv[1, 3:]).max())
assert err_q < 1e-7 and err_kv < 1e-7 and np.abs(dkv[1, 3:]).max() == 0

# %% [markdown]
# In the model, each decoder layer's cross-attention adds its share to the memory's gradient:
# the encoder's backward starts from the **sum** over decoder layers (`EncoderDecoder.backward`).

# %% [markdown]
# ## 3. Training a translator
#
# `--task translate` writes numbers in words, units before tens ("four hundred two and thirty
# thousand seven") and asks for the digits: word order changes and every digit agrees with the
# words around it. Held out: sources whose hash is 0 mod 16, never drawn for training. `--show`
# decodes held-out rows with the key/value cache; `--beam K` uses beam search instead.

# %%
from minipar.lessons import mpirun

log = mpirun(1, ["-m", "minipar.train", "--arch", "encdec", "--task", "translate", "--steps",
                 "300", "--eval-every", "100", "--quiet", "--threads", "1", "--show", "3",
                 "--beam", "2"], timeout=240, stream=False)
print(log)
assert "show    |" in log

# %% [markdown]
# ## 4. Question answering, and a bias that knows positions
#
# `--task qa` reads `? C A 3 7 C 0 1` and must answer `0 1`: find the asked key C among the
# facts, then copy **the two digits to its right**. Matching the key is content, which
# attention does well. "To its right" is position: before the decoder can match anything, the
# encoder must carry each key onto the digits after it, so every digit attends to the token one
# or two places to its left, whatever the tokens are. With positions only added to the token
# vectors a head learns that shift slowly, and until it does the model can only guess among
# the facts (about 0.2 held-out exact match, for thousands of steps).
#
# `--pos-bias` (on by default for qa) gives each encoder head a learned table `bias[h, i, j]`
# added to its scores: (H, S, S) numbers per layer, zero at the start. A head that raises
# `bias[h, i, i - 1]` looks one place left. T5 (Raffel et al. 2020) and Shaw et al. 2018 learn
# such biases by relative distance j - i; this is the plain absolute table. The kernel takes it
# as `head_bias`, and since it is added to the scores its gradient is the scores' gradient,
# summed over the batch: one more output of the same backward. Below, a head whose queries and
# keys are all zero (so its scores carry no content at all) and a bias that says "one left".

# %%
S_DEMO, D1 = 5, 1
vals = np.arange(1.0, S_DEMO + 1).reshape(1, S_DEMO, 1)  # the values 1 .. 5, one a position
zeros = np.zeros((1, S_DEMO, D1))
left = np.full((1, S_DEMO, S_DEMO), -1e9)  # head 0: position i sees position i - 1 only
left[0, np.arange(1, S_DEMO), np.arange(S_DEMO - 1)] = 0.0
left[0, 0, 0] = 0.0  # the first position has no left neighbour: itself
no_pad = F.padding_bias(np.ones((1, S_DEMO), bool), "float64")
shifted, cache = F.cross_attention_fwd(zeros, np.concatenate([zeros, vals], -1), 1, no_pad,
                                       left)
print("values:", vals.ravel(), "-> one place left:", shifted.ravel())
assert np.allclose(shifted.ravel(), [1, 1, 2, 3, 4])

# and the bias's gradient, by central differences like the others
hb = rng.normal(size=(H, TQ, TK))
y_b, cache_b = F.cross_attention_fwd(q, kv, H, bias, hb)
dq_b, dkv_b, dhb = F.cross_attention_bwd(w, cache_b)
num_hb = np.zeros_like(hb)
for i in np.ndindex(*hb.shape):
    up, down = hb.copy(), hb.copy()
    up[i] += 1e-6
    down[i] -= 1e-6
    num_hb[i] = ((F.cross_attention_fwd(q, kv, H, bias, up)[0] * w).sum()
                 - (F.cross_attention_fwd(q, kv, H, bias, down)[0] * w).sum()) / 2e-6
print(f"max |analytic - numeric|: d head_bias {np.abs(dhb - num_hb).max():.1e}")
assert np.abs(dhb - num_hb).max() < 1e-7

# %% [markdown]
# The bias alone is not the whole story: a head must also be able to tell its keys apart
# from the first step. GPT-2's initialisation (0.02 for every weight, `--weight-init gpt2`) starts
# every score near 0, so every softmax is flat and its gradient small. The encoder-decoder's
# default `--weight-init fan-in` draws each linear at 1 / sqrt(fan in), the token tables too,
# and multiplies the embedded tokens by sqrt(d_model) as the paper does (section 3.4): tokens
# enter at unit scale, scores start at O(1), and a table tied to the head (`--tie-weights`)
# starts as an untied head would. Measured with `python -m minipar.train --arch encdec --task qa`
# (`--model default`, seed 0): 1.0 held-out exact match after 1000 steps; 0.23 after 3000 with
# `--no-pos-bias`; 0.39 after 3000 with `--weight-init gpt2`. Here, 500 steps with the bias and
# without:

# %%
matched = {}
for flag in ("--pos-bias", "--no-pos-bias"):
    log = mpirun(1, ["-m", "minipar.train", "--arch", "encdec", "--task", "qa", "--steps", "500",
                     "--eval-every", "500", "--quiet", "--threads", "1", flag], timeout=240,
                 stream=False)
    matched[flag] = float(log.split("held-out exact match ")[-1].split()[0])
    print(f"{flag:>14}: held-out exact match {matched[flag]:.3f} after 500 steps")
assert matched["--pos-bias"] > matched["--no-pos-bias"] + 0.5

# %% [markdown]
# ## 5. The same model under tensor parallelism, and its traffic
#
# Heads split over tp in all three attentions: Q, [K|V] and [Q|K|V] are column-parallel,
# the output projections row-parallel. Each row-parallel output is an allreduce in forward (g);
# each column-parallel input an allreduce in backward (f). Per step, on a batch of B rows with
# source length S and target length T (C floats a token):
#
# - the GPT's block: 4 allreduces of (B, T, C) — 2 forward (attention, MLP), 2 backward;
# - an encoder layer: the same over S tokens, 4 of (B, S, C);
# - a decoder layer: its self-attention and MLP, 4 of (B, T, C), plus cross-attention's g in
#   forward and its Q's f in backward, 2 of (B, T, C), plus its [K|V]'s f in backward: **the
#   memory's gradient summed over the tp group, one (B, S, C) per decoder layer**;
# - the embeddings (one each, (B, S, C) and (B, T, C)), the head (one (B, T, C)) and the
#   vocab-parallel loss (three of (B, T)).

# %%
from minipar.compare import serial_reference, train_layout, mismatches
from minipar.seq2seq import make_seq2seq_task

task = make_seq2seq_task("translate", seed=0)
L, C, BATCH = 2, 16, 8
S, T = task.src_len, task.seq_len
ed = ModelConfig(vocab_size=task.vocab_size, seq_len=T, src_len=S, n_layers=L, d_model=C,
                 n_heads=4, arch="encdec")
batches = [task.batch(step, BATCH) for step in range(2)]
par = ParallelConfig(tp=2)
run = run_threads(lambda w: train_layout(w, ed, par, batches), 2)[0]
print("tp=2 == serial (losses, gradients, weights):",
      not mismatches(run, serial_reference(ed, batches), rtol=1e-9))
moved = run.comm[0]["tp"]["allreduce"]
e = 8  # float64
want_calls = 2 + 1 + 3 + 4 * L + 6 * L + L
want_bytes = e * BATCH * C * (S + T + T + 4 * L * S + 6 * L * T + L * S) + 3 * e * BATCH * T
print(f"encoder-decoder, tp=2: {moved['calls']} allreduces, {moved['bytes']:,} bytes "
      f"(formula: {want_calls}, {want_bytes:,})")
assert (moved["calls"], moved["bytes"]) == (want_calls, want_bytes)

# %% [markdown]
# A GPT of about the same size: 2L blocks (its parameters are the encoder's and decoder's
# without cross-attention) over sequences of S + T tokens, the encoder-decoder's packed row.

# %%
gpt = ModelConfig(vocab_size=task.vocab_size, seq_len=S + T, n_layers=2 * L, d_model=C,
                  n_heads=4)
gpt_batches = [(x, np.concatenate([x[:, 1:], y[:, -1:]], axis=1)) for x, y in batches]
g = run_threads(lambda w: train_layout(w, gpt, par, gpt_batches), 2)[0].comm[0]["tp"]
print(f"GPT, tp=2: {g['allreduce']['calls']} allreduces, {g['allreduce']['bytes']:,} bytes")
print(f"encoder-decoder / GPT bytes: {moved['bytes'] / g['allreduce']['bytes']:.2f}")

# %% [markdown]
# The encoder-decoder's blocks each see only their own stream (S or T tokens, not S + T), so
# per block they move less; the cross-attentions add 2 (B, T, C) and 1 (B, S, C) per decoder
# layer. Under sequence parallelism each allreduce becomes a reduce-scatter and an all-gather
# of the same total size (lesson 6), and the memory is gathered once per cross-attention.
#

# %% [markdown]
# ## 6. The same model over a pipeline, and what the memory costs there
#
# Stages hold encoder layers, then decoder layers (`--pp N`, `--partition` to move the cut).
# The GPT's pipeline sends one tensor across each boundary; the encoder-decoder's decoder
# stages each need **two**: the decoder's stream and the encoder's output, because every
# decoder layer's cross-attention reads the memory. Megatron-LM (for T5) solves it the simple
# way, and so does minipar (`minipar/models/encdec_pipeline.py`): the last encoder stage sends
# the memory forward, and every decoder stage passes it on beside its own output, packed into
# one message (B, T + S, C). In backward each decoder stage adds its cross-attentions' share of
# the memory's gradient to the one it received and sends the sum back, so the last encoder
# stage receives the gradient summed over every decoder layer without any extra collective.
#
# What a boundary into global chunk g carries, per microbatch of b rows, each way:
#
# | the cut falls | message | values |
# |---|---|---|
# | inside the encoder | the encoder's stream | b S C |
# | at the encoder's end | the memory | b S C |
# | inside the decoder | decoder stream + memory | b (T + S) C |
#
# The price is b S C values per decoder boundary per direction: a GPT-sized message is
# b T C. Measured: pp = 4 over 2 + 2 layers (cuts inside the encoder, at its end, inside the
# decoder), 1F1B with 2 microbatches, every stage's sends counted by `CommStats`.

# %%
M = 2
b = BATCH // M
pp4 = ParallelConfig(pp=4, microbatches=M, schedule="1f1b")
runs = run_threads(lambda w: train_layout(w, ed, pp4, batches), 4)
print("pp=4 == serial (losses, gradients, weights):",
      not mismatches(runs[0], serial_reference(ed, batches), rtol=1e-9))
sent = sum(r.comm[0]["pp"]["send"]["bytes"] for r in runs)  # one step, all stages
want = 2 * M * e * b * C * (S + S + (T + S))  # activations forward, gradients back
print(f"pp=4, one step: {sent:,} bytes sent between stages (formula: {want:,})")
assert sent == want

gpt4 = run_threads(lambda w: train_layout(w, gpt, pp4, gpt_batches), 4)
gpt_sent = sum(r.comm[0]["pp"]["send"]["bytes"] for r in gpt4)
print(f"GPT over S + T tokens, pp=4: {gpt_sent:,} bytes; encoder-decoder / GPT: "
      f"{sent / gpt_sent:.2f}")

# %% [markdown]
# Against a GPT over the packed row of S + T tokens the encoder-decoder sends less (its early
# boundaries carry S tokens, not S + T); against a GPT over the T target tokens alone, each
# decoder boundary carries the S memory rows on top. `python -m minipar.simulate --arch encdec
# --pp 4` prints the same bytes for any model and cluster, with the schedule's bubble; the
# program checker (`program_checks.check_dataflow`) proves that every decoder chunk receives
# the memory it uses and that the messages match and cannot deadlock.
#
# **Exercises.** (1) Set `--norm post` (the paper's LayerNorm after each residual) and compare
# the held-out exact match after 300 steps. (2) Predict the traffic for tp = 4 and check it.
# (3) Decode with `--beam 4`: when can beam search beat greedy decoding on this task?
