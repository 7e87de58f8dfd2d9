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
# # Lesson 12: the same model on the GPU
#
# **Prerequisites.** Lesson 2 (collectives under `mpirun`, `CommStats`) and lesson 4 (data
# parallelism); lessons 5-6 for the dp x tp layout below. No GPU and no CUDA knowledge needed:
# the lesson runs on any machine and says what would differ on a GPU.
#
# **You will be able to** run minipar on a GPU, explain what CUDA-aware MPI and host staging
# cost per step, and find the line of code that would break (or silently copy) on a GPU
# before you have one.
#
# Everything so far ran on NumPy. On a GPU node the *same code* runs on CuPy, whose arrays live
# in GPU memory and whose functions mirror NumPy's. Nothing in the model changes: every kernel
# takes its array module from `minipar.backend.xp()`. What changes is around the model:
#
# 1. **which GPU** each rank uses (its rank within the node),
# 2. **streams**: GPU work is queued, not done, when a Python line returns,
# 3. **how bytes reach MPI**: a CUDA-aware MPI reads GPU memory directly; any other MPI needs
#    the bytes *staged* through host memory, two extra copies per message.
#
# This lesson runs on any machine. Where there is no GPU, it shows the CPU path and stands in
# for the GPU with minipar's *strict device*: NumPy behind the same wall CuPy puts around GPU
# memory. Everything that would break on a GPU breaks on it too.

# %%
import json

import matplotlib.pyplot as plt
import numpy as np

from minipar import backend
from minipar.compare import mismatches, random_batches, train_layout
from minipar.config import ModelConfig, ParallelConfig
from minipar.dist.comm import run_threads
from minipar.lessons import mpirun, out_dir, save_figure
from minipar.nn import functional as F

OUT = out_dir("12")

# %% [markdown]
# ## 1. Choosing the backend, and the GPU
#
# `python -m minipar.train --backend cupy` (or `MINIPAR_BACKEND=cupy` for lessons and tests)
# calls `backend.use("cupy")`. It checks that CuPy imports, that the CUDA driver sees a GPU, and
# runs one tiny kernel, so that a broken setup fails at start-up with one line instead of a
# traceback mid-run. Here is what this machine says:

# %%
try:
    backend.use("cupy")
    print("GPU available:", backend.describe())
    HAVE_GPU = True
except backend.BackendError as exc:
    print(exc)
    HAVE_GPU = False
backend.use("numpy")
print("using:", backend.describe())

# %% [markdown]
# Under `mpirun`, every rank of a node would otherwise grab GPU 0. The launcher tells each
# process its index among the ranks of its node (`MPI_LOCALRANKID` under MPICH,
# `OMPI_COMM_WORLD_LOCAL_RANK` under Open MPI, `SLURM_LOCALID` under Slurm), and rank `l` of a
# node with `g` GPUs takes GPU `l mod g`. Eight ranks on two nodes of four GPUs:

# %%
for node in range(2):
    print(f"node {node}: " + "  ".join(
        f"rank {node * 4 + local} -> GPU {backend.pick_device(local, 4)}" for local in range(4)))
print("6 ranks on one node with 4 GPUs:",
      [backend.pick_device(local, 4) for local in range(6)], "(two GPUs are shared)")

# %% [markdown]
# ### Try: your node
#
# Set the number of ranks per node and GPUs per node of a machine you know. Expect rank `l` on
# GPU `l mod g`, and `ceil(ranks / g)` ranks on the busiest GPU.

# %%
RANKS, GPUS = 12, 8  # Try: (8, 8), (3, 4), (16, 4)
placement = [backend.pick_device(local, GPUS) for local in range(RANKS)]
busiest = max(placement.count(g) for g in range(GPUS))
print(f"{RANKS} ranks on {GPUS} GPUs: {placement}; the busiest GPU serves {busiest} rank(s)")
assert placement == [local % GPUS for local in range(RANKS)] and busiest == -(-RANKS // GPUS)

# %% [markdown]
# ## 2. One code path, and a wall that proves it
#
# A kernel such as GELU never names NumPy; `xp` is whatever backend is active:

# %%
import inspect  # noqa: E402

print(inspect.getsource(F.gelu_fwd))

# %% [markdown]
# The danger is a line that quietly calls NumPy: on a GPU it makes a host array, which then
# meets device arrays. CuPy refuses that (`TypeError`), or a conversion copies data back to the
# host every step. CI has no GPU, so minipar has a stand-in: `backend.use("strict")` gives
# arrays that refuse every implicit conversion to NumPy, exactly as CuPy's do, while doing the
# arithmetic with the same NumPy code behind the wall (so results are bit for bit NumPy's).

# %%
xp = backend.use("strict")
a = xp.arange(4.0)  # a "device" array
print(repr(a), "  a.sum() ->", repr(a.sum()), "(a 0-d device array, as in CuPy)")
for what, attempt in [("np.asarray(a)", lambda: np.asarray(a)),
                      ("a + np.ones(4)", lambda: a + np.ones(4))]:
    try:
        attempt()
    except TypeError as exc:
        print(f"{what}: TypeError: {str(exc)[:90]}...")
print("explicit crossings are fine:", float(a.sum()), backend.to_host(a))

# %% [markdown]
# The whole model runs on it. Two steps of a dp=2 x tp=2 layout with sequence parallelism, in
# four threads, on NumPy and on the strict device:

# %%
cfg = ModelConfig(vocab_size=16, seq_len=8, n_layers=2, d_model=16, n_heads=2)
par = ParallelConfig(dp=2, tp=2, sequence_parallel=True)
batches = random_batches(cfg, steps=2, batch=8)
runs = {}
for name in ("numpy", "strict"):
    backend.use(name)
    runs[name] = run_threads(lambda w: train_layout(w, cfg, par, batches), par.world)[0]
backend.use("numpy")
print("losses on numpy :", runs["numpy"].losses)
print("losses on strict:", runs["strict"].losses)
print("differences (rtol 0):", mismatches(runs["strict"], runs["numpy"], 0.0) or "none")
assert not mismatches(runs["strict"], runs["numpy"], 0.0)

# %% [markdown]
# ### Break it: one host array in a kernel
#
# The classic GPU bug: a mask built with `np.` instead of `backend.xp()`. On NumPy nothing is
# wrong; on a GPU it is a host array meeting a device array (CuPy raises, or, with an
# implicit conversion, copies every step). The strict device fails the same way, on a CPU,
# with a message that says what to do:

# %%
def masked_scores(scores):  # (B, H, T, T) attention scores
    t = scores.shape[-1]
    mask = np.triu(np.full((t, t), -1e9), k=1)  # BUG: np, not backend.xp(): a host array
    return scores + mask  # (B, H, T, T)


for name in ("numpy", "strict"):
    xp = backend.use(name)
    scores = xp.zeros((1, 1, 3, 3))
    try:
        out = masked_scores(scores)
        print(f"{name:6s}: fine, {type(out).__name__} of shape {out.shape}")
    except TypeError as exc:
        print(f"{name:6s}: TypeError: {exc}")
        assert name == "strict"
backend.use("numpy")

# %% [markdown]
# ### Try: another layout on the strict device
#
# Any layout runs on the strict device and stays bit for bit NumPy's. Change `TRY` (a
# pipeline, ZeRO, more microbatches) and check.

# %%
TRY = ParallelConfig(pp=2, microbatches=2, schedule="1f1b")  # Try: ParallelConfig(dp=2, zero=3)
for name in ("numpy", "strict"):
    backend.use(name)
    runs[name] = run_threads(lambda w: train_layout(w, cfg, TRY, batches), TRY.world)[0]
backend.use("numpy")
print(f"dp={TRY.dp} pp={TRY.pp} tp={TRY.tp} zero={TRY.zero}: differences (rtol 0):",
      mismatches(runs["strict"], runs["numpy"], 0.0) or "none")
assert not mismatches(runs["strict"], runs["numpy"], 0.0)

# %% [markdown]
# The test suite does this for every kernel and for drawn layouts of every kind
# (`tests/test_strict_device.py`), and also reads the source: `tests/test_no_numpy_in_math_path.py`
# fails on any `numpy.` call in kernels, layers, optimizers, parallel code and communication,
# except host work it names with its reason (weights are drawn on the host from the seed, so
# every backend and layout starts from the same bits; metrics are host floats).
#
# ## 3. Streams: a returned line is queued work
#
# On a GPU, `y = x @ w` returns as soon as the matrix product is *queued* on the device's
# stream; the GPU runs it later, in order. Three consequences for minipar:
#
# - **Timing** must wait for the queue: `bench` calls `synchronize()` before reading the clock,
#   or it would time the queueing only.
# - **Reading a value** waits too: `float(loss)` copies 8 bytes to the host and so waits for
#   every kernel before it. The pipeline does this once per microbatch, which is cheap.
# - **MPI** knows nothing about streams. Before MPI reads a device buffer, the kernels writing
#   it must be finished, so the communicator synchronises first.
#
# The strict device queues host-to-device copies from pinned memory as a GPU does, and its
# `synchronize()` runs them; on a GPU it is `cupy.cuda.get_current_stream().synchronize()`.
#
# ## 4. How bytes reach MPI: CUDA-aware, or staged through the host
#
# A *CUDA-aware* MPI (Open MPI or MPICH built with CUDA, UCX with GPU support) reads and writes
# GPU memory itself, using NVLink or GPUDirect RDMA where the hardware has them. Any other MPI
# (the `mpich` wheel from PyPI, used here, is one) can only read host memory, so every message is
# **staged**: a device-to-host copy (d2h) into pinned host memory, the MPI call, a host-to-device
# copy (h2d) back. `minipar.dist.mpi_comm` asks the MPI library (`MPIX_Query_cuda_support`),
# accepts `MINIPAR_CUDA_AWARE=1` where it cannot tell, and `MINIPAR_HOST_STAGING=1` forces
# staging. Each staging copy is recorded in `CommStats.copies` as `d2h` or `h2d`, a table apart
# from the communication counts (a copy moves nothing between ranks).
#
# Two real processes under `mpirun -n 2` train the same dp=2 model three ways: NumPy; the strict
# device staged through the host; and the strict device handed to MPI directly, as a CUDA-aware
# MPI would take it.

# %%
script = OUT / "gpu_paths.py"
script.write_text('''
import json, sys
from minipar import backend
from minipar.compare import random_batches
from minipar.config import ModelConfig, ParallelConfig
from minipar.tasks import IGNORE
from minipar.dist.mesh import Mesh
from minipar.dist.mpi_comm import MPIComm, comm_mode
from minipar.engine import Engine

backend.use(sys.argv[1])
staging = {"staged": True, "direct": False, "auto": None}[sys.argv[2]]
world = MPIComm.world(staging=staging)
cfg = ModelConfig(vocab_size=16, seq_len=16, n_layers=2, d_model=32, n_heads=4)
mesh = Mesh(world, dp=2)
engine = Engine(cfg, ParallelConfig(dp=2), mesh, dtype="float32", lr=1e-2)
losses = []
for x, y in random_batches(cfg, steps=2, batch=8):
    mesh.reset_stats()
    rows = slice(4 * mesh.dp_rank, 4 * mesh.dp_rank + 4)
    losses.append(engine.train_step(x[rows], y[rows], int((y != IGNORE).sum())).loss)
ops = {}  # rank 0's last step, every group: communication, then host<->device copies
for comm in mesh.comms().values():
    for table in (comm.stats.as_dict(), comm.stats.copies_as_dict()):
        for op, s in table.items():
            ops.setdefault(op, [0, 0])
            ops[op][0] += s["calls"]
            ops[op][1] += s["bytes"]
if world.rank == 0:
    print("RESULT " + json.dumps({"mode": comm_mode(staging), "losses": losses, "ops": ops,
                                  "syncs": getattr(backend.device(), "syncs", 0)}), flush=True)
''')

paths = {}
for label, args in [("numpy", ["numpy", "auto"]), ("staged", ["strict", "auto"]),
                    ("direct", ["strict", "direct"])]:
    text = mpirun(2, [script, *args], stream=False, timeout=120)
    paths[label] = json.loads(next(ln for ln in text.splitlines()
                                   if ln.startswith("RESULT ")).split(" ", 1)[1])

for label, res in paths.items():
    row = ", ".join(f"{op} {c} x = {b:,} B" for op, (c, b) in sorted(res["ops"].items()))
    print(f"{label:7s} {res['mode']}\n        losses {res['losses']}\n        last step: {row}"
          f"\n        stream syncs before MPI calls (whole run): {res['syncs']}")
staged, direct = paths["staged"]["ops"], paths["direct"]["ops"]
assert paths["numpy"]["losses"] == paths["staged"]["losses"] == paths["direct"]["losses"]
assert staged["d2h"] == staged["h2d"] == staged["allreduce"]  # as many bytes again, twice
assert "d2h" not in direct and paths["direct"]["syncs"] > 0

# %% [markdown]
# All three give the same losses. Each step makes two allreduces: all gradients as one flat
# buffer over dp, and the 16-byte [loss, squared norm] over the world. Staging adds a d2h of
# each buffer before its allreduce and an h2d after it: as many bytes again, twice. The direct
# path copies nothing and instead waits for the stream before each MPI call.
#
# What staging costs on a real GPU node, per step, for a model with N parameters in float32
# (4N bytes of gradients), with PCIe 4 x16 at about 25 GB/s each way and a ring allreduce that
# sends 2(p-1)/p x 4N bytes:

# %%
pcie, nvlink = 25e9, 300e9  # bytes/s: PCIe 4.0 x16 one way; NVLink 3 per direction (A100)
def staging_ms(n_params, link=pcie):
    """Milliseconds of host<->device copies per step: the 4N gradient bytes down and up."""
    return 2 * 4 * n_params / link * 1e3


for n_params in (124e6, 1.3e9):
    grad = 4 * n_params
    ring = 2 * (8 - 1) / 8 * grad
    print(f"N = {n_params / 1e9:.2f} B: staging copies {staging_ms(n_params):.0f} ms per step, "
          f"while the allreduce itself on 8 GPUs over NVLink takes {ring / nvlink * 1e3:.0f} ms "
          f"(and {ring / pcie * 1e3:.0f} ms if its host path ran at PCIe speed)")
print(f"So staged, the copies alone take {staging_ms(1.3e9) / (ring / nvlink * 1e3):.0f}x the "
      "time of a CUDA-aware allreduce over NVLink.")

fig, ax = plt.subplots(figsize=(7, 3))
labels = list(paths)
moved = [paths[k]["ops"].get("allreduce", [0, 0])[1] / 1024 for k in labels]
copied = [sum(paths[k]["ops"].get(op, [0, 0])[1] for op in ("d2h", "h2d")) / 1024
          for k in labels]
ax.barh(labels, moved, label="allreduce payload")
ax.barh(labels, copied, left=moved, label="host<->device copies (staging)")
ax.set_xlabel("KiB per step, rank 0")
ax.set_ylabel("path to MPI")
ax.set_title("What one dp=2 step moves: staging adds two copies of every buffer")
ax.legend(loc="lower right")
fig.tight_layout()
save_figure(fig, "12", "staging.png")

# %% [markdown]
# Staging doubles the bytes each rank pushes through PCIe and puts the host in the path; with
# CUDA-aware MPI on NVLink the same allreduce is an order of magnitude faster (the ratio
# printed above). Overlapping the gradient sync with backward (`--bucket-mb`, lesson 4) hides
# either behind compute.
#
# ### Try: a faster host link
#
# PCIe 5.0 x16 moves about 50 GB/s each way, twice PCIe 4. Expect the staging time to halve;
# it still grows with N, as the allreduce does.

# %%
PCIE_TRY = 50e9  # Try: 64e9 (PCIe 6 x16, one way), 12e9 (PCIe 3)
print(f"N = 1.30 B: staging {staging_ms(1.3e9):.0f} ms at {pcie / 1e9:.0f} GB/s, "
      f"{staging_ms(1.3e9, PCIE_TRY):.0f} ms at {PCIE_TRY / 1e9:.0f} GB/s")
assert abs(staging_ms(1.3e9, PCIE_TRY) * PCIE_TRY - staging_ms(1.3e9) * pcie) < 1e-3 * pcie
#
# ## 5. On a GPU node
#
# Install the extra (`pip install -e ".[gpu]"`, CuPy for CUDA 12), then:
#
#     python -m minipar.bench --backend cupy                   # GEMM peak and a `small` step
#     mpirun -n 2 python -m minipar.train --backend cupy       # one rank per GPU (or shared)
#     MINIPAR_CUDA_AWARE=1 mpirun -n 8 python -m minipar.train --backend cupy --tp 2 --dp 4
#     MINIPAR_BACKEND=cupy python -m pytest tests              # the parallel == serial suite
#
# The start-up banner names the GPU and how arrays reach MPI. Without a GPU the first command
# prints one line, as in section 1:

# %%
print(backend.describe(), "|", paths["numpy"]["mode"])
if not HAVE_GPU:
    print("no GPU here: the strict device above stood in for it")
