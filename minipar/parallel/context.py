"""Context parallelism: each sequence split over the cp ranks, attention computed as a ring.

Every layer of a block but attention is token-local (LayerNorm, the projections, the MLP act on
each token alone), so a cp rank runs them on its own T/cp tokens and nothing moves. Attention
needs every earlier key: ring attention (Liu et al. 2023, "Ring Attention with Blockwise
Transformers") keeps each rank's queries in place and passes the key/value blocks around the cp
ring, one hop per step; after cp steps every query has met every key block, folded in with the
online log-sum-exp softmax of ``minipar.nn.blockwise`` (``forward_step``), so the result is
exactly softmax(q k^T / sqrt(D) + causal) v without any rank holding more than two K/V blocks.
Backward sends the key/value blocks around again, and with them their gradient accumulators
dK/dV: each rank adds its queries' share, passes the sum on, and after cp hops every block's
gradient is back home.

Each step posts the next block's receive and sends the current block (``irecv``/``isend`` on
the cp group, counted by ``CommStats``) before computing on the current one, so the transfer
overlaps the step's products where the world allows it.

The causal mask makes the cut matter. Cut contiguously (rank r holds tokens [r T/cp, (r+1)
T/cp)), the last rank's queries meet every key block while the first rank's meet one: the work
per rank grows 1 : 2 : ... : cp. The zig-zag cut (Megatron-LM's context parallelism; Brandon et
al. 2023, "Striped Attention", for the idea) cuts T into 2 cp chunks and gives rank r chunks r
and 2 cp - 1 - r, an early and a late one, so every rank runs 2 cp + 1 chunk pairs
(``pair_counts``).

Dropout of the attention probabilities goes inside the block update (``blockwise``): the tile of
this rank's query chunk against a key chunk from rank src draws the serial run's mask at those
global rows and keys (``dropout.TileMasks``; under zig-zag each of the two chunks is its own
contiguous run of rows), and backward draws it again from the same address.
"""

from __future__ import annotations

import math

import numpy

from minipar import backend
from minipar.nn import flops
from minipar.nn.blockwise import State, backward_step, finish, forward_step, init_state, relation
from minipar.nn.functional import merge_heads, split_heads

TAG_KV, TAG_DKV = 41, 42  # the key/value ring and the dK/dV ring


# ------------------------------------------------------------------------------ the sequence cut
def segments(t: int, cp: int, rank: int, split: str = "zigzag") -> list[tuple[int, int]]:
    """The (start, stop) global token ranges rank ``rank`` holds, in its local order (all of
    them, in order, when cp = 1)."""
    if cp == 1:
        return [(0, t)]
    if split == "zigzag":
        c = t // (2 * cp)
        return [(rank * c, (rank + 1) * c), ((2 * cp - 1 - rank) * c, (2 * cp - rank) * c)]
    c = t // cp
    return [(rank * c, (rank + 1) * c)]


def token_indices(t: int, cp: int, rank: int, split: str = "zigzag") -> numpy.ndarray:
    """Global positions of the rank's tokens, in local order (T/cp,) int64; a host array."""
    return numpy.concatenate([numpy.arange(a, b) for a, b in segments(t, cp, rank, split)])


def dropout_tokens(ctx, t: int) -> tuple | None:
    """What ``dropout.Dropout`` needs under context parallelism: (this rank's global token
    positions, T), or None without cp (the rank then holds the whole sequence)."""
    if ctx.cp is None or ctx.cp.size == 1:
        return None
    return token_indices(t, ctx.cp.size, ctx.cp.rank, ctx.cp_split), t


def _pairs_run(t: int, cp: int, rank: int, split: str):
    """Every (query range, key range) pair a rank computes over a whole ring pass."""
    mine = segments(t, cp, rank, split)
    for src in range(cp):
        for qa, qb in mine:
            for ka, kb in segments(t, cp, src, split):
                if relation(qa, qb - qa, ka, kb - ka) != "skip":
                    yield (qa, qb), (ka, kb)


def ring_flops(t: int, d: int, cp: int, rank: int, split: str = "zigzag") -> int:
    """Forward attention FLOPs of one rank per (batch, head): q k^T and p v, 2 Tq Tk D each,
    over the chunk pairs it runs (a diagonal pair is computed whole, then masked)."""
    return sum(4 * (qb - qa) * (kb - ka) * d for (qa, qb), (ka, kb) in
               _pairs_run(t, cp, rank, split))


def busiest_share(t: int, cp: int, split: str = "zigzag") -> float:
    """The busiest rank's attention work over a plain kernel's on its own T/cp tokens alone:
    (2 cp + 1) / 4 for zig-zag, cp for the contiguous cut (its last rank). The time model
    scales the attention core of a T/cp-token block by it."""
    worst = max(ring_flops(t, 1, cp, r, split) for r in range(cp))
    return worst / (4 * (t // cp) ** 2)


def pair_counts(t: int, cp: int, split: str = "zigzag") -> list[int]:
    """How many (query chunk, key chunk) pairs each rank computes: the causal imbalance."""
    return [sum(1 for _ in _pairs_run(t, cp, r, split)) for r in range(cp)]


# ------------------------------------------------------------------------------- the ring kernel
class Ring:
    """The ring of one cp group: its Comm and how the sequence of length ``seq_len`` is cut."""

    def __init__(self, comm, split: str, seq_len: int):
        self.comm, self.split, self.seq_len = comm, split, seq_len
        self.n, self.rank = comm.size, comm.rank
        self.next, self.prev = (self.rank + 1) % self.n, (self.rank - 1) % self.n

    def layout(self, rank: int) -> list[tuple[int, int, int]]:
        """(global start, local offset, length) of each segment rank ``rank`` holds."""
        out, off = [], 0
        for a, b in segments(self.seq_len, self.n, rank, self.split):
            out.append((a, off, b - a))
            off += b - a
        return out

    def _shift(self, buf, tag: int):
        """Start passing ``buf`` to the next rank and receiving the previous rank's buffer."""
        recv = self.comm.irecv(buf.shape, buf.dtype, self.prev, tag)
        return recv, self.comm.isend(buf, self.next, tag)

    def forward(self, q, k, v, drop=None):
        """q, k, v (n, Tl, D): this rank's tokens -> y (n, Tl, D), lse (n, Tl, 1); ``drop``
        (``dropout.TileMasks`` or None) drops out the attention probabilities."""
        xp = backend.xp()
        scale = 1.0 / math.sqrt(q.shape[-1])
        state = init_state(q)  # (n, Tl, 1), (n, Tl, 1), (n, Tl, D)
        kv = xp.stack([k, v])  # (2, n, Tl, D): what travels
        mine = self.layout(self.rank)
        for j in range(self.n):
            src = (self.rank - j) % self.n  # whose block this rank holds at step j
            moving = self._shift(kv, TAG_KV) if j < self.n - 1 else None
            for qa, qo, ql in mine:
                st = State(*(a[:, qo:qo + ql] for a in state))  # views: updated in place
                for ka, ko, kl in self.layout(src):
                    if relation(qa, ql, ka, kl) == "skip":
                        continue
                    flops.add(4 * q.shape[0] * ql * kl * q.shape[-1])
                    forward_step(q[:, qo:qo + ql], kv[0, :, ko:ko + kl], kv[1, :, ko:ko + kl],
                                 st, scale, qa, ka, *_tile(drop, q.shape[0], qa, ql, ka, kl))
            if moving is not None:
                recv, send = moving
                kv = recv.wait()  # (2, n, Tl, D): the previous rank's block
                send.wait()
        return finish(state)

    def backward(self, q, k, v, dy, lse, delta, drop=None):
        """dq, dk, dv (n, Tl, D) of this rank's tokens; dy (n, Tl, D), lse and delta (n, Tl, 1)."""
        xp = backend.xp()
        scale = 1.0 / math.sqrt(q.shape[-1])
        dq = xp.zeros_like(q)  # (n, Tl, D)
        kv = xp.stack([k, v])  # (2, n, Tl, D)
        mine = self.layout(self.rank)
        arriving, sends = None, []
        for j in range(self.n):
            src = (self.rank - j) % self.n
            moving = self._shift(kv, TAG_KV) if j < self.n - 1 else None
            part = xp.zeros_like(kv)  # (2, n, Tl, D): this rank's share of src's dK, dV
            for qa, qo, ql in mine:
                qs = slice(qo, qo + ql)
                for ka, ko, kl in self.layout(src):
                    ks = slice(ko, ko + kl)
                    if relation(qa, ql, ka, kl) == "skip":
                        continue
                    backward_step(q[:, qs], kv[0, :, ks], kv[1, :, ks], dy[:, qs], lse[:, qs],
                                  delta[:, qs], scale, (dq[:, qs], part[0, :, ks], part[1, :, ks]),
                                  qa, ka, *_tile(drop, q.shape[0], qa, ql, ka, kl))
            if arriving is not None:  # src's dK, dV summed by the ranks before this one
                acc = arriving.wait()
                acc += part
            else:
                acc = part
            sends.append(self.comm.isend(acc, self.next, TAG_DKV))
            arriving = self.comm.irecv(acc.shape, acc.dtype, self.prev, TAG_DKV)
            if moving is not None:
                recv, send = moving
                kv = recv.wait()
                sends.append(send)
        dkv = arriving.wait()  # this rank's own block, with every rank's share: home again
        for s in sends:
            s.wait()
        return dq, dkv[0], dkv[1]


def _tile(drop, n: int, q_start: int, tq: int, k_start: int, tk: int):
    """(keep (n, tq, tk), P) of one chunk pair for all n (batch, head) pairs, or (None, 0)."""
    return (None, 0.0) if drop is None else (drop(slice(0, n), q_start, tq, k_start, tk), drop.p)


# ------------------------------------------------------------------- the ring as data, checked
def ring_program(cp: int, recompute: str = "none") -> list[list[tuple[str, int, int]]]:
    """Per rank, the point-to-point calls one block's forward and backward make on the cp
    group, in the order ``Ring`` makes them: ("send", next, tag) at each ``isend`` and
    ("recv", previous, tag) where it waits for an ``irecv``. Selective or full recomputation
    runs the forward ring again at the start of backward. ``program_checks.check_messages``
    proves the list finishes and that every send is received; a test records ``Ring`` and
    compares."""
    def forward(nxt, prev):
        return [c for _ in range(cp - 1) for c in (("send", nxt, TAG_KV), ("recv", prev, TAG_KV))]

    def backward(nxt, prev):
        out = []
        for j in range(cp):
            out += [("send", nxt, TAG_KV)] if j < cp - 1 else []
            out += [("recv", prev, TAG_DKV)] if j > 0 else []
            out += [("send", nxt, TAG_DKV)]
            out += [("recv", prev, TAG_KV)] if j < cp - 1 else []
        return out + [("recv", prev, TAG_DKV)]  # this rank's own dK, dV, home again

    rerun = recompute in ("selective", "full")
    return [forward((r + 1) % cp, (r - 1) % cp) * (2 if rerun else 1)
            + backward((r + 1) % cp, (r - 1) % cp) for r in range(cp)]


# ------------------------------------------------------- fused [Q | K | V] in, merged heads out
def mha_fwd(qkv, n_heads: int, ring: Ring, drop=None):
    """(B, Tl, 3*H*D) laid out [Q | K | V] -> (B, Tl, H*D), as ``functional.mha_fwd`` on the
    whole sequence would give for this rank's tokens. The cache keeps q, k, v and the
    log-sum-exp: O(T/cp) per head, and ``drop``, the address of the dropout masks."""
    xp = backend.xp()
    b, t, c3 = qkv.shape
    d = c3 // (3 * n_heads)
    qkv5 = qkv.reshape(b, t, 3, n_heads, d).transpose(2, 0, 3, 1, 4)  # (3, B, H, Tl, D)
    q, k, v = (xp.ascontiguousarray(a).reshape(b * n_heads, t, d) for a in qkv5)  # (n, Tl, D)
    y, lse = ring.forward(q, k, v, drop)  # (n, Tl, D), (n, Tl, 1)
    return merge_heads(y.reshape(b, n_heads, t, d)), (q, k, v, lse, n_heads, drop)


def mha_bwd(dy, y, cache, ring: Ring):
    """dy and the forward's output y, both merged (B, Tl, H*D) -> dqkv (B, Tl, 3*H*D)."""
    q, k, v, lse, n_heads, drop = cache
    b, t, c = dy.shape
    heads = (b, t, n_heads, c // n_heads)
    delta = (dy.reshape(heads) * y.reshape(heads)).sum(-1)  # (B, Tl, H)
    delta = delta.transpose(0, 2, 1).reshape(b * n_heads, t, 1)  # (n, Tl, 1)
    dy3 = backend.xp().ascontiguousarray(split_heads(dy, n_heads)).reshape(q.shape)  # (n, Tl, D)
    grads = backend.xp().stack(ring.backward(q, k, v, dy3, lse, delta, drop))  # (3, n, Tl, D)
    grads = grads.reshape(3, b, n_heads, t, c // n_heads)  # (3, B, H, Tl, D)
    return grads.transpose(1, 3, 0, 2, 4).reshape(b, t, 3 * c)  # (B, Tl, 3C)


__all__ = ["TAG_KV", "TAG_DKV", "segments", "token_indices", "dropout_tokens", "ring_flops",
           "busiest_share", "pair_counts", "ring_program",
           "Ring", "mha_fwd", "mha_bwd"]
