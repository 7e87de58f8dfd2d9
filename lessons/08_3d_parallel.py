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
# # Lesson 8: 3D parallelism — data, tensor and pipeline at once
#
# **Prerequisites.** Lessons 4 (data parallelism, ZeRO), 5 (tensor parallelism) and 7
# (pipeline schedules, the bubble); lesson 6 for the `--sequence-parallel` layout. Reading a
# Chrome trace helps but is not needed.
#
# **You will be able to** place ranks on a dp x pp x tp mesh and name every rank's partners,
# run and trace a 3D job, and compare layouts of one model by speed, memory and traffic.
#
# Lessons 4 to 7 split the work along one axis at a time. Real runs combine all three
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

from minipar.dist.comm import run_threads
from minipar.dist.mesh import Mesh
from minipar.lessons import MPIRunError, mpirun, out_dir, short_run_note, show_image

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
assert rows[5][1] == (0, 1, 1) and rows[5][2] == {"dp": (5, 7), "tp": (4, 5), "pp": (1, 5)}

# %% [markdown]
# Rank 5, for example, is dp replica 0, pipeline stage 1, tensor shard 1 (asserted above). It
# exchanges partial sums with rank 4 (its tp partner) four times per block, sends gradients to
# rank 1 (same dp and tp coordinates, previous stage) and receives activations from it, and
# *sums* its gradients with rank 7, the other replica of the same shard: as in lesson 4, each
# rank's loss is already divided by the token count of the whole global batch, so the sum is
# the serial gradient.
#
# ### Try: another layout of 8 ranks
#
# Predict rank 5's coordinates and partners on dp 4 x pp 1 x tp 2, or dp 1 x pp 4 x tp 2, from
# `rank = (pp_rank * dp + dp_rank) * tp + tp_rank`, then check.

# %%
DP_TRY, PP_TRY, TP_TRY = 4, 1, 2  # Try: (1, 4, 2), (2, 4, 1), (8, 1, 1)


def coords(world):
    mesh = Mesh(world, dp=DP_TRY, pp=PP_TRY, tp=TP_TRY)
    return mesh.dp_rank, mesh.pp_rank, mesh.tp_rank


for rank, (d, pp_rank, t) in enumerate(run_threads(coords, 8)):
    assert rank == (pp_rank * DP_TRY + d) * TP_TRY + t
print(f"dp {DP_TRY} x pp {PP_TRY} x tp {TP_TRY}: rank 5 is (dp, pp, tp) = "
      f"{run_threads(coords, 8)[5]}; every rank follows the formula")
#
# ## 2. A 2 x 2 x 2 run, traced
#
# `--trace` writes every rank's forward, backward, send, receive and collective events as a
# Chrome trace (open it at https://ui.perfetto.dev); `--plot` draws the last step.

# %%
OUT = out_dir("08")
common = ["--quiet", "--steps", "10", "--eval-every", "10", "--model", "default"]
log = mpirun(8, ["-m", "minipar.train", *common, "--dp", "2", "--tp", "2", "--pp", "2",
                 "--microbatches", "4", "--zero", "1", "--summary", OUT / "3d.json",
                 "--trace", OUT / "trace.json", "--plot", OUT], stream=False)
print(log)
print(short_run_note(log))

# %%
show_image(OUT / "timeline.png")

# %% [markdown]
# Read the picture row by row. Ranks 0-3 are stage 0 and ranks 4-7 stage 1. Each stage runs
# 1F1B over 4 microbatches: stage 1 starts late (it waits for the first activation) and
# finishes its backwards early; stage 0 idles at the start of the backward phase. That idle
# time is the pipeline bubble, (p - 1) / (m + p - 1) = 1/5 of the step by the formula of
# lesson 7. Inside every forward and backward box, thin communication marks are the tp
# allreduces; at the end the gradient sync (reduce-scatter and allgather under ZeRO-1) runs
# over the dp group.
#
# The trace records every span with its kind, and every collective with its group and the
# bytes it was given. Summed over all ranks and steps:

# %%
events = [e for e in json.loads((OUT / "trace.json").read_text())["traceEvents"]
          if e.get("ph") == "X"]
spans, moved = {}, {}
for e in events:
    kind = e.get("cat", "?")
    spans[kind] = spans.get(kind, 0.0) + e.get("dur", 0.0) / 1e3  # ms
    moved[kind] = moved.get(kind, 0) + e.get("args", {}).get("bytes", 0)
print(f"{'kind':14s} {'span ms':>9s} {'bytes given':>12s}")
for kind, ms in sorted(spans.items(), key=lambda kv: -kv[1]):
    print(f"{kind:14s} {ms:9.1f} {moved[kind]:12,d}")

# %% [markdown]
# Read the milliseconds with care. A span is wall-clock time from the call to its return, and
# a collective cannot return before its slowest member arrives, so its span is mostly *waiting*
# when ranks are out of step, and a receive's span is the time until the sender got there.
# How much of the collectives' time can be moving bytes? Divide the bytes by the time:

# %%
coll = [k for k in ("allreduce", "allgather", "reduce_scatter") if moved.get(k)]
rate = sum(moved[k] for k in coll) / (sum(spans[k] for k in coll) / 1e3)  # bytes/s
cores = os.cpu_count()
print(f"The collectives were given {sum(moved[k] for k in coll) / 2**20:.1f} MiB and their "
      f"spans add up to {sum(spans[k] for k in coll):.0f} ms: {rate / 1e6:.0f} MB/s, where "
      "lesson 2 measured GB/s between two ranks. " + (
          f"With 8 ranks on {cores} cores, most of a span here is a rank waiting for its "
          "partners to be scheduled (and the fixed cost of many small tp calls), not bytes "
          "moving." if rate < 1e9 else "Here the spans are mostly moving bytes."))

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
    path = OUT / (name.replace(" ", "_") + ".json")
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
#   optimizer state on every rank; tp and pp each cut that in half here (ZeRO, lesson 4, cuts
#   it along dp instead).
# - **Traffic.** Data parallelism moves the gradients once per step; tensor parallelism moves
#   activations four times per block per microbatch, which is why it belongs inside a node;
#   pipeline parallelism moves one activation per microbatch per stage boundary, the least.
# - **The same numbers.** The final losses agree across layouts (up to float32 rounding in
#   the order of sums): one model code, one initialisation, every layout.

# %%
losses = [loss for *_, loss in table]
assert max(losses) - min(losses) < 1e-3 * max(losses)
state = {name: st for name, _, st, _, _ in table}
print(f"largest difference between final losses: {max(losses) - min(losses):.1e}; state per "
      f"rank relative to dp 4: " + ", ".join(f"{n} {st / state['dp 4']:.2f}"
                                            for n, st in state.items()))
assert all(0.45 < state[n] / state["dp 4"] < 0.55 for n in ("dp 2 x tp 2", "dp 2 x pp 2"))

# %% [markdown]
# ### Try: ZeRO on the data-parallel layout
#
# ZeRO (lesson 4) cuts the state along dp instead. Predict: with `--zero 1` on dp 4 the
# optimizer state per rank is a quarter (plus padding), parameters and gradients unchanged;
# with `--zero 3` everything is about a quarter. Change `ZERO` and check.

# %%
ZERO = 1  # Try: 2, 3
path = OUT / f"dp4_zero{ZERO}.json"
mpirun(4, ["-m", "minipar.train", "--quiet", "--model", "default", "--steps", "2",
           "--dp", "4", "--zero", str(ZERO), "--summary", path], stream=False)
zmem = json.loads(path.read_text())["memory"]
dmem = json.loads((OUT / "dp_4.json").read_text())["memory"]
ratios = {k: zmem[k] / dmem[k] for k in ("params", "grads", "optimizer")}
print(f"ZeRO-{ZERO} on dp 4, per rank relative to plain dp 4:",
      {k: round(v, 3) for k, v in ratios.items()})
quarter = {k: ZERO >= stage for k, stage in (("optimizer", 1), ("grads", 2), ("params", 3))}
assert all(abs(ratios[k] - (0.25 if cut else 1)) < 0.01 for k, cut in quarter.items())

# %% [markdown]
# ### Break it: a layout that does not fit the world
#
# dp x pp x tp must equal the number of ranks. Ask for 3 x 1 x 2 on 4 ranks: every rank
# refuses before it builds anything or makes a collective, with one line naming the flags.

# %%
try:
    mpirun(4, ["-m", "minipar.train", "--quiet", "--steps", "2", "--dp", "3", "--tp", "2"],
           stream=False, timeout=60)
    raise RuntimeError("a 3 x 1 x 2 layout ran on 4 ranks")
except MPIRunError as exc:
    line = next(ln for ln in str(exc).splitlines() if "error:" in ln)
    print(line)
    assert "--dp 3" in line

# %% [markdown]
# Lesson 9 takes these same formulas to thousands of GPUs with the cost model and simulator.
