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
# # Lesson 2: collectives, and what they cost
#
# Every kind of parallelism in this course is the serial model plus a few *collectives*: calls
# that every rank of a group makes together. Data parallelism sums gradients with an
# **allreduce**; ZeRO cuts that allreduce into a **reduce-scatter** and an **allgather**;
# tensor parallelism puts an allreduce inside every block. So before any of them, we learn
#
# 1. what the collectives compute, on an in-process world of threads,
# 2. how an allreduce is built from nothing but send and receive: the ring,
# 3. what it costs in bytes, read from `CommStats`, which counts every byte minipar moves, and
# 4. how fast this machine moves them, measured under a real `mpirun -n 2`.

# %%
import os
import tempfile

import matplotlib.pyplot as plt
import numpy as np

from minipar.dist.comm import run_threads

out_dir = tempfile.mkdtemp(prefix="minipar-lesson2-")

# %% [markdown]
# ## 1. Four ranks in one notebook
#
# `run_threads(fn, p)` runs `fn(comm)` on p threads, one per rank, and returns each rank's
# result. `comm` has the same interface as the MPI communicator used under `mpirun`
# (`minipar.dist.comm`). Rank r holds the vector `[r, r, r, r] + [0, 1, 2, 3]`:

# %%
P = 4


def show(comm):
    x = np.full(P, float(comm.rank)) + np.arange(P)  # (P,) this rank's data
    return {"x": x,
            "allreduce": comm.allreduce(x),  # every rank: the sum over ranks
            "allgather": comm.allgather(x[:1]),  # every rank: element 0 of each rank
            "reduce_scatter": comm.reduce_scatter(x)}  # rank r: element r of the sum


for r, out in enumerate(run_threads(show, P)):
    print(f"rank {r}: " + "  ".join(f"{k} {v.tolist()}" for k, v in out.items()))

# %% [markdown]
# An allreduce is exactly a reduce-scatter (rank r ends with piece r of the sum) followed by an
# allgather (everybody collects every piece). Keep that in mind: it is the whole idea of ZeRO in
# lesson 3, and of the ring below.
#
# ## 2. An allreduce from scratch: the ring
#
# The obvious way: every rank sends its n numbers to rank 0, rank 0 adds them and sends the sum
# back. Rank 0 then receives (p-1) n numbers and sends (p-1) n: its link is the bottleneck,
# and the time grows with p. Let's write it with send/recv and count:

# %%
def naive_allreduce(comm, x):
    if comm.rank == 0:
        total = x.copy()
        for src in range(1, comm.size):
            total += comm.recv(x.shape, x.dtype, src)
        for dst in range(1, comm.size):
            comm.send(total, dst)
        return total
    comm.send(x, 0)
    return comm.recv(x.shape, x.dtype, 0)


N = 1 << 16  # elements per rank


def run(fn, comm):
    x = np.random.default_rng(comm.rank).normal(size=N)
    comm.stats.reset()
    y = fn(comm, x)
    sent = comm.stats.ops.get("send")
    return y, sent.bytes if sent else 0


naive = run_threads(lambda c: run(naive_allreduce, c), P)
print("bytes sent per rank, naive:", [b for _, b in naive], f"(n = {N * 8} bytes)")

# %% [markdown]
# The **ring** (Patarasuk & Yuan 2009; the algorithm behind Baidu's ring allreduce and NCCL)
# cuts the vector into p chunks and lets every rank send to its right neighbour at the same
# time. In p-1 steps of *reduce-scatter* each chunk travels once around the ring, picking up one
# rank's contribution per hop, until rank r holds the full sum of chunk r; in p-1 steps of
# *allgather* the finished chunks travel around once more. Every rank sends 2(p-1) chunks of
# n/p numbers: 2(p-1)/p x n, whatever p is. `minipar.dist.algorithms` spells it out with
# `isend`/`recv` only (read it: it is 40 lines):

# %%
from minipar.dist.algorithms import chunk_bounds, ring_allreduce  # noqa: E402

print("chunks of 10 elements on 4 ranks:", [(b.start, b.stop) for b in chunk_bounds(10, 4)])
ring = run_threads(lambda c: run(lambda comm, x: ring_allreduce(comm, x), c), P)
library = run_threads(lambda c: c.allreduce(np.random.default_rng(c.rank).normal(size=N)), P)
print("ring == library allreduce on every rank:",
      all(np.allclose(y, lib) for (y, _), lib in zip(ring, library)))
print("bytes sent per rank, ring: ", [b for _, b in ring])
print("2 (p-1)/p x n =", 2 * (P - 1) * N * 8 // P)

# %% [markdown]
# ## 3. The cost in bytes, for any p
#
# `CommStats` records, for every call, the bytes of the array (`bytes`) and what this rank sends
# on the wire with the bandwidth-optimal algorithm (`wire_bytes`): 2(p-1)/p x n for an
# allreduce and (p-1)/p x n for an allgather or a reduce-scatter. The ring we just ran *measures*
# the same figure that the library call *records*:

# %%
print(f"{'p':>3} {'naive (rank 0)':>15} {'ring (measured)':>16} {'allreduce wire_bytes':>21}")
for p in (2, 4, 8):
    naive_p = run_threads(lambda c: run(naive_allreduce, c), p)
    ring_p = run_threads(lambda c: run(lambda comm, x: ring_allreduce(comm, x), c), p)

    def recorded(c):
        c.allreduce(np.zeros(N))
        return c.stats.ops["allreduce"].wire_bytes
    print(f"{p:3d} {naive_p[0][1]:15,d} {max(b for _, b in ring_p):16,d} "
          f"{run_threads(recorded, p)[0]:21,d}")

# %% [markdown]
# The ring's bytes per rank approach 2n as p grows: they barely grow at all, which is why data
# parallelism scales to thousands of GPUs. What does grow is the number of steps, 2(p-1), each
# paying the network's *latency*. So the time of an allreduce is roughly
#
#     t(n) = alpha + 2 (p-1)/p x n / beta
#
# with alpha the latency and beta the bandwidth of one link. Small messages are latency-bound,
# big ones bandwidth-bound. That is why lesson 3 sends gradients in buckets of megabytes, not
# one tensor at a time.
#
# ## 4. This machine, measured
#
# Threads share one address space, so timing them says little about a network. Here are two real
# processes under `mpirun -n 2` (through `minipar.lessons.mpirun`, which uses the MPI installed
# next to this Python and kills the job if it fails). `minipar.bench.comm` times minipar's
# in-place allreduce (the call data parallelism makes) against the raw mpi4py call on the same
# buffer, from 4 KiB to 16 MiB. On a laptop or a single node this is shared memory, not a
# network, but the shape of the curve is the same.

# %%
import json  # noqa: E402

from minipar.bench.comm import table  # noqa: E402
from minipar.lessons import mpirun  # noqa: E402

text = mpirun(2, ["-m", "minipar.bench.comm", "--worker", "--ops", "allreduce_",
                  "--min-kib", "4", "--max-mib", "16", "--trials", "3", "--budget", "0.15"],
              stream=False, timeout=120)
rows = json.loads(next(ln for ln in text.splitlines()
                       if ln.startswith("MINIPAR_BENCH ")).split(" ", 1)[1])
print(table(rows))

# %% [markdown]
# Fit the alpha-beta model to the measured times (least squares on t = alpha + w / beta, w the
# wire bytes per rank) and plot the bandwidth each size achieves:

# %%
size = np.array([r["bytes"] for r in rows], dtype=float)
t = np.array([r["minipar_s"] for r in rows])
wire = size * 2 * (2 - 1) / 2  # p = 2
inv_beta, alpha = np.polyfit(wire, t, 1)
print(f"latency alpha ~ {alpha * 1e6:.1f} us, bandwidth beta ~ {1 / inv_beta / 1e9:.2f} GB/s")

fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot(size, wire / t / 1e9, "o-", label="minipar allreduce_ (measured)")
ax.plot(size, [r["raw_busbw"] / 1e9 for r in rows], "x--", label="raw mpi4py (measured)")
ax.plot(size, wire / (alpha + wire * inv_beta) / 1e9, ":", label="alpha-beta fit")
ax.set_xscale("log", base=2)
ax.set_xlabel("message size (bytes)")
ax.set_ylabel("bus bandwidth (GB/s)")
ax.set_title("allreduce on 2 ranks of this machine")
ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(out_dir, "bandwidth.png"), dpi=120)
plt.show()

# %% [markdown]
# Small messages reach a fraction of the bandwidth: their time is mostly alpha. From about a
# megabyte on, the curve flattens at beta. For the full table (allgather and reduce-scatter too,
# 4 KiB to 64 MiB, 2 and 4 ranks) run
#
#     python -m minipar.bench --collectives --ranks 2 4
#
# **Takeaways.** A collective is one call that every rank of a group makes. An allreduce is a
# reduce-scatter plus an allgather; the ring does each in p-1 steps and sends 2(p-1)/p x n bytes
# per rank, nearly independent of p. Its time is latency plus bytes over bandwidth, so big
# messages are efficient and tiny ones are not. `CommStats` counts every byte, so from now on
# every parallel layout can be checked against its theory number for number.
