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
# # Lesson 7: 3D parallelism — data, tensor and pipeline at once
#
# Lessons 3 to 6 split the work along one axis at a time. Real runs combine all three
# (Narayanan et al. 2021, "PTD-P"): tensor parallelism inside a node where links are fastest,
# pipeline stages across nodes, and data parallelism over whatever is left. In minipar the
# three axes form one rank grid, the `Mesh`, and nothing else changes: the engine runs the same
# model code and the same pipeline program on every layout.
#
# In this lesson we
# 1. lay out 8 ranks as dp 2 x pp 2 x tp 2 and list which ranks talk to which,
# 2. run a 2 x 2 x 2 job under `mpirun`, trace it, and read its timeline,
# 3. compare layouts of the same model on this machine: throughput, memory per rank, bytes.

# %%
import json
import os
import tempfile

from minipar.dist.comm import run_threads
from minipar.dist.mesh import Mesh

# %% [markdown]
# ## 1. The mesh
#
# minipar orders ranks as Megatron does: tp fastest, then dp, then pp, so
# `world rank = (pp_rank * dp + dp_rank) * tp + tp_rank`. A tp group is consecutive ranks
# (on one node, sharing the fast links it needs: 4 collectives per block); a pipeline stage
# boundary is the slowest link and carries the least (one activation per microbatch).

# %%
def groups(world):
    mesh = Mesh(world, dp=2, pp=2, tp=2)
    members = {name: tuple(comm.allgather_obj(world.rank)) for name, comm in
               (("dp", mesh.dp), ("tp", mesh.tp), ("pp", mesh.pp))}
    return mesh.describe(), (mesh.dp_rank, mesh.pp_rank, mesh.tp_rank), members


rows = run_threads(groups, 8)
print(f"{'rank':>4}  {'(dp, pp, tp)':>12}  {'tp group':>9}  {'dp group':>9}  {'pp group':>9}")
for rank, (desc, coords, members) in enumerate(rows):
    print(f"{rank:>4}  {str(coords):>12}  {str(members['tp']):>9}  {str(members['dp']):>9}  "
          f"{str(members['pp']):>9}")

# %% [markdown]
# Rank 5, for example, is dp replica 0, pipeline stage 1, tensor shard 1. It exchanges
# partial sums with rank 4 (its tp partner) four times per block, sends gradients to rank 1
# (same dp and tp coordinates, previous stage) and receives activations from it, and
# averages its gradients with rank 7 (the other replica of the same shard).
#
# ## 2. A 2 x 2 x 2 run, traced
#
# `--trace` writes every rank's forward, backward, send, receive and collective events as a
# Chrome trace (open it at https://ui.perfetto.dev); `--plot` draws the last step.

# %%
from minipar.lessons import mpirun

out_dir = tempfile.mkdtemp(prefix="minipar-lesson7-")
common = ["--quiet", "--steps", "10", "--eval-every", "10", "--model", "default"]
log = mpirun(8, ["-m", "minipar.train", *common, "--dp", "2", "--tp", "2", "--pp", "2",
                 "--microbatches", "4", "--zero", "1", "--summary", f"{out_dir}/3d.json",
                 "--trace", f"{out_dir}/trace.json", "--plot", out_dir], stream=False)
print(log)

# %%
import matplotlib.image as mpimg
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(10, 7))
ax.imshow(mpimg.imread(os.path.join(out_dir, "timeline.png")))
ax.axis("off")
plt.show()

# %% [markdown]
# Read the picture row by row. Ranks 0-3 are stage 0 and ranks 4-7 stage 1. Each stage runs
# 1F1B over 4 microbatches: stage 1 starts late (it waits for the first activation) and
# finishes its backwards early; stage 0 idles at the start of the backward phase. That idle
# time is the pipeline bubble, (p - 1) / (m + p - 1) = 1/5 of the step here. Inside every
# forward and backward box, thin communication marks are the tp allreduces; at the end the
# gradient sync (reduce-scatter and allgather under ZeRO-1) runs over the dp group.
#
# The trace also says who sent how much. Summing the events by kind:

# %%
with open(os.path.join(out_dir, "trace.json")) as fh:
    events = json.load(fh)["traceEvents"]
by_kind = {}
for e in events:
    if e.get("ph") == "X":
        kind = e.get("cat", "?")
        by_kind[kind] = by_kind.get(kind, 0.0) + e.get("dur", 0.0) / 1e3
for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
    print(f"{kind:12s} {ms:9.1f} ms summed over all ranks and steps")

# %% [markdown]
# ## 3. Layouts compared on this machine
#
# The same model and the same global batch on 4 ranks, cut four ways. Every run computes the
# same losses (the tests prove it to 1e-9 in float64); what differs is speed, memory and
# traffic. On a laptop the ranks share a couple of cores, so throughput mostly shows the cost of
# communication and of idle pipeline stages, not the speed-up a cluster would give.

# %%
layouts = {
    "dp 4": ["--dp", "4"],
    "dp 2 x tp 2": ["--dp", "2", "--tp", "2"],
    "dp 2 x pp 2": ["--dp", "2", "--pp", "2", "--microbatches", "4"],
    "tp 2 x pp 2 (SP)": ["--tp", "2", "--pp", "2", "--microbatches", "4",
                         "--sequence-parallel"],
}
table = []
for name, flags in layouts.items():
    path = os.path.join(out_dir, name.replace(" ", "_") + ".json")
    mpirun(4, ["-m", "minipar.train", *common, *flags, "--summary", path], stream=False)
    with open(path) as fh:
        s = json.load(fh)
    mem = s["memory"]
    moved = sum(op["bytes"] for ops in s["comm"].values() for op in ops.values())
    table.append((name, s["tokens_per_s"], mem["params"] + mem["grads"] + mem["optimizer"],
                  moved / s["steps"], s["final_loss"]))

print(f"{'layout':18s} {'tokens/s':>9} {'state bytes/rank':>17} {'bytes/step (rank 0)':>20} "
      f"{'final loss':>10}")
for name, tps, state, moved, loss in table:
    print(f"{name:18s} {tps:9,.0f} {state:17,d} {moved:20,.0f} {loss:10.4f}")

# %% [markdown]
# What to notice:
#
# - **Memory.** Pure data parallelism keeps a whole copy of the parameters, gradients and
#   optimizer state on every rank; tp and pp each cut that in half here (ZeRO, lesson 3, cuts
#   it along dp instead).
# - **Traffic.** Data parallelism moves the gradients once per step; tensor parallelism moves
#   activations four times per block per microbatch, which is why it belongs inside a node;
#   pipeline parallelism moves one activation per microbatch per stage boundary, the least.
# - **The same numbers.** The final losses agree across layouts (up to float32 rounding in
#   the order of sums): one model code, one initialisation, every layout.
#
# Lesson 8 takes these same formulas to thousands of GPUs with the cost model and simulator.
