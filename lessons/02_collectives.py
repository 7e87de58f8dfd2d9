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
# **Prerequisites.** NumPy, and the idea of a process (a running program with its own memory).
# No MPI knowledge: this lesson introduces it. Lesson 1 is not needed here, but lesson 4 uses
# both.
#
# **You will be able to** say what allreduce, reduce-scatter and allgather compute, build an
# allreduce from sends and receives as a ring, predict its bytes per rank exactly, and fit and
# use the alpha-beta model of its time.
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
import matplotlib.pyplot as plt
import numpy as np

from minipar.dist.comm import run_threads
from minipar.lessons import out_dir, save_figure

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
# lesson 4, and of the ring below.
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
assert all(b == 2 * (P - 1) * N * 8 // P for _, b in ring)

# %% [markdown]
# ### Try: a vector that p does not divide
#
# With n = 10 elements on p = 3 ranks the chunks are 4, 3 and 3 elements long. The ring is
# still exact. Every chunk still makes 2(p-1) hops, so together the ranks send 2(p-1) n
# elements; but a rank that forwards the long chunk more often sends a little more than the
# others, never more than 2(p-1) times the longest chunk. Change `P_TRY` and `N_TRY`: the
# checks hold for any sizes.

# %%
P_TRY, N_TRY = 3, 10  # Try: other values (N_TRY >= P_TRY)


def ring_try(comm):
    x = np.arange(N_TRY, dtype=float) * (comm.rank + 1)  # (N_TRY,)
    comm.stats.reset()
    y = ring_allreduce(comm, x)
    return y, comm.stats.ops["send"].bytes


got = run_threads(ring_try, P_TRY)
total = np.arange(N_TRY) * sum(range(1, P_TRY + 1))
sizes = [b.stop - b.start for b in chunk_bounds(N_TRY, P_TRY)]
print("chunk sizes:", sizes, " bytes sent per rank:", [b for _, b in got])
assert all(np.allclose(y, total) for y, _ in got)
assert max(b for _, b in got) <= 2 * (P_TRY - 1) * max(sizes) * 8
assert sum(b for _, b in got) == 2 * (P_TRY - 1) * N_TRY * 8  # every chunk, 2(p-1) hops

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
# paying the network's *latency*. So the time of a ring allreduce is
#
#     t(n) = 2 (p-1) alpha + 2 (p-1)/p x n / beta
#
# with alpha the latency of one step and beta the bandwidth of one link (Thakur et al. 2005;
# `minipar.sim.timing.collective_time` uses exactly this). A reduce-scatter or an allgather is
# half of it: (p-1) alpha + (p-1)/p x n / beta. Small messages are latency-bound, big ones
# bandwidth-bound: the two terms are equal at n_1/2 = p alpha beta, where the achieved
# bandwidth is half of beta. That is why lesson 4 sends gradients in buckets much larger than
# n_1/2, not one tensor at a time.
#
# ### Try: reduce-scatter then allgather is an allreduce
#
# Check it for any p, and check what `CommStats` records: the two halves' wire bytes add up to
# the allreduce's.

# %%
P_TRY = 5  # Try: 2, 3, 8


def halves(comm):
    x = np.random.default_rng(comm.rank).normal(size=P_TRY * 6)  # (6p,) divisible by p
    full = comm.allreduce(x)
    both = comm.allgather(comm.reduce_scatter(x))
    ops = comm.stats.ops
    return full, both, ops["allreduce"].wire_bytes, (ops["reduce_scatter"].wire_bytes
                                                     + ops["allgather"].wire_bytes)


for full, both, w_ar, w_halves in run_threads(halves, P_TRY):
    assert np.allclose(full, both) and w_ar == w_halves
print(f"p = {P_TRY}: allgather(reduce_scatter(x)) == allreduce(x) on every rank, "
      f"{w_ar:,d} wire bytes either way")
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
# Fit the alpha-beta model to the measured times. The times span three orders of magnitude,
# so an ordinary least-squares fit would serve the largest messages and ignore the small ones
# (it can even give a negative alpha). We fit the *relative* error instead, minimising
# sum((model / measured - 1)^2), so every size counts the same. Then we plot the bandwidth each
# size achieves, "bus bandwidth" = wire bytes per rank / time, which would be flat at beta if
# there were no latency.

# %%
from minipar.sim.comm_volume import Collective  # noqa: E402
from minipar.sim.timing import collective_time  # noqa: E402

p = 2
size = np.array([r["bytes"] for r in rows], dtype=float)  # n, the buffer each rank holds
t = np.array([r["minipar_s"] for r in rows])
wire = 2 * (p - 1) / p * size  # bytes each rank sends
design = np.stack([np.full_like(t, 2 * (p - 1)), wire], axis=1) / t[:, None]
(alpha, inv_beta), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
assert alpha > 0 and inv_beta > 0, "timings too noisy for a fit: run the cell again"
beta = 1 / inv_beta
fit = np.array([collective_time(Collective("dp", "allreduce", int(n)), p, (beta, alpha))
                for n in size])
off = fit / t
n_half = p * alpha * beta
print(f"latency alpha ~ {alpha * 1e6:.1f} us per step, bandwidth beta ~ {beta / 1e9:.2f} GB/s, "
      f"n_1/2 = p alpha beta ~ {n_half / 1024:.0f} KiB")
print("fit / measured time per size:", " ".join(f"{o:.2f}" for o in off))

fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot(size, wire / t / 1e9, "o-", label="minipar allreduce_ (measured)")
ax.plot(size, [r["raw_busbw"] / 1e9 for r in rows], "x--", label="raw mpi4py (measured)")
ax.plot(size, wire / fit / 1e9, ":", label="alpha-beta fit")
ax.axhline(beta / 1e9, color="gray", lw=0.8)
ax.annotate("beta (fit)", (size[-1], beta / 1e9), ha="right", va="bottom")
ax.set_xscale("log", base=2)
ax.set_xlabel("buffer size per rank n (bytes)")
ax.set_ylabel("bus bandwidth (GB/s)")
ax.set_title("allreduce on 2 ranks of this machine")
ax.legend(loc="upper left", fontsize=8)
fig.tight_layout()
save_figure(fig, "02", "bandwidth.png")

# %%
bw = wire / t / 1e9  # measured bus bandwidth, GB/s
peak = int(np.argmax(bw))


def kib(n):
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n / 1024:g} KiB"


shape = ("keeps rising up to the largest size" if peak == len(bw) - 1 else
         f"peaks at {kib(size[peak])} and falls to {bw[-1]:.2f} GB/s at {kib(size[-1])} (on one "
         "machine the 'network' is memory copies, which slow down once buffers outgrow the "
         "CPU caches)")
print(f"Measured: {bw[0]:.2f} GB/s at {kib(size[0])}, where latency dominates; the bandwidth "
      f"then {shape}. The fit puts n_1/2 at {n_half / 1024:.0f} KiB and stays within "
      f"{max(off.max(), 1 / off.min()):.1f}x of every measured time.")

# %% [markdown]
# The model is two numbers, so it cannot follow every wiggle of a real machine; what it gets
# right is the order of magnitude at every size, which is what planning needs. For the full
# table (allgather and reduce-scatter too, 4 KiB to 64 MiB, 2 and 4 ranks) run
#
#     python -m minipar.bench --collectives --ranks 2 4
#
# ### Try: how big must a bucket be?
#
# To reach 90% of beta, the bandwidth term must be 9 times the latency term:
# 2(p-1)/p n / beta = 9 x 2(p-1) alpha, so n = 9 p alpha beta: it grows with p, because the
# latency term does. Change `P_BUCKET` and `FRACTION`; the check computes the achieved
# bandwidth with the simulator's formula.

# %%
P_BUCKET, FRACTION = 8, 0.9  # Try: 64 ranks; 0.5 (that is n_1/2)
n_bucket = FRACTION / (1 - FRACTION) * P_BUCKET * alpha * beta
t_bucket = collective_time(Collective("dp", "allreduce", int(n_bucket)), P_BUCKET,
                           (beta, alpha))
achieved = 2 * (P_BUCKET - 1) / P_BUCKET * n_bucket / t_bucket
print(f"p = {P_BUCKET}: buckets of {n_bucket / 2**20:.2f} MiB reach {achieved / beta:.0%} of beta")
assert abs(achieved / beta - FRACTION) < 1e-3

# %% [markdown]
# ## Break it: ranks that disagree on a collective
#
# Every rank of a group must make the same collective call with the same shape. If one rank
# passes 4 numbers and another 5, plain MPI may hang, crash, or silently return garbage.
# minipar can check every call first (`--check-collectives` on the train command, or
# `MINIPAR_COMM_CHECK=1`; the thread world always checks) and then fails on every rank with
# the same message, naming each rank's call and where it was made:

# %%
from minipar.lessons import MPIRunError  # noqa: E402

bad_script = out_dir("02") / "mismatch.py"
bad_script.write_text("""import numpy as np
from minipar.dist.mpi_comm import MPIComm
world = MPIComm.world(check=True)  # what --check-collectives turns on
n = 4 if world.rank == 0 else 5  # the bug: rank 1 has a different shape
world.allreduce(np.ones(n))
""")
try:
    mpirun(2, [bad_script], stream=False, timeout=60)
    raise RuntimeError("the mismatched allreduce was not caught")
except MPIRunError as exc:
    first = next(ln for ln in str(exc).splitlines() if "CommError" in ln)
    print(first.split("CommError: ", 1)[1])
    assert "disagrees" in first

# %% [markdown]
# **Takeaways.** A collective is one call that every rank of a group makes. An allreduce is a
# reduce-scatter plus an allgather; the ring does each in p-1 steps and sends 2(p-1)/p x n bytes
# per rank, nearly independent of p. Its time is latency plus bytes over bandwidth, so big
# messages are efficient and tiny ones are not. `CommStats` counts every byte, so from now on
# every parallel layout can be checked against its theory number for number.
