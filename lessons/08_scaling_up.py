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
# # Lesson 8: scaling up, from this machine to a GPT-3-size run
#
# Our real runs use 2 to 8 ranks. The runs in the papers use thousands of GPUs. We cannot run
# those, but we can *count* them: every byte of memory and every collective a layout needs
# follows from the same algorithms we ran for real, and time follows from how fast a GPU
# multiplies, how fast its memory streams and how fast its links carry bytes. That is
# `minipar.sim`:
#
# * `costmodel`: parameters (PTD-P eq. 2), FLOPs (PTD-P eq. 3, Korthikanti eq. 7-8), memory per
#   GPU (ZeRO section 5, Korthikanti table 2) and the pipeline's in-flight microbatches;
# * `comm_volume`: every collective of a step, as `CommStats` would record it (tests compare it
#   byte for byte with real runs);
# * `kernels` + `timing`: a roofline time per kernel, an alpha-beta time per collective, and the
#   very pipeline program the executor runs, timed by the discrete-event simulator.
#
# We will look at memory per GPU by ZeRO stage, activation memory, the layout search for a
# 175B model on 1024 GPUs, the bubble against the number of microbatches, how the predictions
# compare with published measurements, and finally a predicted and a measured timeline of a
# small layout on this machine, side by side.

# %%
import json
import os
import tempfile

import matplotlib.pyplot as plt

from minipar.config import ParallelConfig
from minipar.parallel.schedules import make_schedule
from minipar.sim import costmodel as cm
from minipar.sim.hardware import A100_80GB, Hardware
from minipar.sim.presets import GPT3_FAMILY, PTDP_TABLE1, VALIDATION_RUNS
from minipar.sim.simulator import bubble_formula, simulate
from minipar.sim.timing import estimate, instruction_costs
from minipar.simulate import report, search, search_table

GB = 1e9
out_dir = tempfile.mkdtemp(prefix="minipar_lesson08_")

# %% [markdown]
# ## 1. Memory per GPU by ZeRO stage
#
# Mixed-precision Adam keeps, per parameter, a 16-bit weight (2 bytes), a 16-bit gradient (2)
# and K = 12 bytes of optimizer state (fp32 master weight, momentum, variance). Data
# parallelism replicates all 16 bytes on every GPU; ZeRO shards the optimizer state (stage 1),
# then the gradients (2), then the weights (3) over the N_d data-parallel ranks. The ZeRO
# paper's figure 1 example: 7.5B parameters on 64 GPUs.

# %%
stages = ["baseline", "ZeRO-1 (os)", "ZeRO-2 (os+g)", "ZeRO-3 (os+g+p)"]
fig1 = [cm.zero_model_state_bytes(7.5e9, 64, z, "bf16") for z in range(4)]
for name, mem in zip(stages, fig1):
    print(f"{name:16s} {sum(mem.values()) / GB:6.1f} GB per GPU")

fig, ax = plt.subplots(figsize=(7, 3))
bottom = [0.0] * 4
for kind in ("weights", "gradients", "optimizer"):
    vals = [m[kind] / GB for m in fig1]
    ax.bar(stages, vals, bottom=bottom, label=kind)
    bottom = [b + v for b, v in zip(bottom, vals)]
ax.set_ylabel("GB per GPU")
ax.set_title("7.5B parameters, 64 GPUs (ZeRO figure 1)")
ax.legend()
plt.show()

# %% [markdown]
# ## 2. Activations: what sequence parallelism and selective recomputation buy
#
# Model state is only half the story. Every block keeps its activations from the forward until
# its backward. Korthikanti et al. (2022, table 2) count them per block for a microbatch of b
# sequences: sbh(34 + 5as/h) bytes with nothing split. Tensor parallelism splits most of it but
# leaves 10 sbh (LayerNorm and dropout inputs) on every rank; sequence parallelism splits that
# too; selective recomputation drops the 5as/h attention-score term by recomputing it; full
# recomputation keeps only the block's input. For GPT-3 175B at t = 8, b = 1:

# %%
gpt3, gpt3_batch = GPT3_FAMILY["gpt3-175b"]
cases = [("no parallelism (t=1)", 1, False, "none"), ("tensor parallel", 8, False, "none"),
         ("TP + sequence parallel", 8, True, "none"), ("TP + selective", 8, False, "selective"),
         ("TP + SP + selective", 8, True, "selective"), ("full recomputation", 8, False, "full")]
for name, t, sp, rc in cases:
    per_layer = cm.activation_bytes_per_layer(gpt3, 1, t, sp, rc)
    print(f"{name:24s} {per_layer / 2**20:8.0f} MiB per layer, "
          f"{gpt3.n_layers * per_layer / GB:6.1f} GB for all {gpt3.n_layers} layers")

# %% [markdown]
# With pipeline parallelism a stage holds only L/p layers, but 1F1B keeps p microbatches in
# flight on the first stage, so it still stores about L layers' worth; the interleaved
# schedule adds a factor 1 + (p-1)/(pv). `cm.peak_live` gives the count per stage (the tests
# check it against the real programs).

# %% [markdown]
# ## 3. The layout search: GPT-3 175B on 1024 A100s
#
# Which dp x tp x pp, microbatch size and schedule should we use? `search` tries every one
# that divides, picks the cheapest recomputation and ZeRO stage that fit in 80 GiB, predicts
# the step with the closed-form pipeline time, and ranks by step time. The same search is
# `python -m minipar.simulate --model gpt3-175b --gpus 1024 --search`.

# %%
work = cm.Workload(global_batch=gpt3_batch, dtype="bf16")
rows, rejected = search(gpt3, 1024, work, A100_80GB)
print(f"{len(rows)} layouts fit")
print(search_table(rows, 6))
for reason, n in rejected.most_common():
    print(f"rejected {n:4d}: {reason}")

# %% [markdown]
# The winners keep tensor parallelism inside a node (t <= 8, NVLink), use the pipeline across
# nodes, and interleave chunks to shrink the bubble: PTD-P's takeaways #1 and #2, recovered
# from counting. The best layout in full, timed through the simulator this time:

# %%
best_par, _, best_work = rows[0]
best = estimate(gpt3, best_par, best_work, A100_80GB, use_simulator=True)
print(report("gpt3-175b", gpt3, best_par, best_work, A100_80GB, best))

# %% [markdown]
# ## 4. The bubble against the number of microbatches
#
# PTD-P's 145B layout has p = 8 stages of 10 layers. We run its schedules through the simulator
# with our per-instruction costs for the Transformer blocks alone (every stage identical) and
# compare with the published formulas: (p-1)/(m+p-1) for 1F1B, (p-1)/(vm+p-1) interleaved.
# With the embedding and the LM head included, the last stage is slower than the others and
# the idle time grows a little: that is the `estimate` number.

# %%
run = PTDP_TABLE1["ptdp-145b"]
p = run.pp
ms = [8, 16, 32, 64, 128]
fig, ax = plt.subplots(figsize=(7, 3.5))
for schedule, v in (("1f1b", 1), ("interleaved", 2), ("interleaved", 5)):
    sim = []
    for m in ms:
        par = ParallelConfig(dp=1, tp=run.tp, pp=p, schedule=schedule, virtual_stages=v,
                             microbatches=m)
        w = cm.Workload(global_batch=m, recompute="full")
        cost, p2p, _, _ = instruction_costs(run.model, par, w, A100_80GB, layers_only=True)
        sim.append(simulate(make_schedule(schedule, p, m, v), cost, p2p).bubble_fraction)
    formula = [float(bubble_formula(schedule, p, m, v)) for m in ms]
    label = schedule if v == 1 else f"interleaved v={v}"
    ax.plot(ms, sim, "o", label=f"{label}: simulated")
    ax.plot(ms, formula, "-", color=ax.lines[-1].get_color(), alpha=0.6, label="formula")
    print(label, [f"{s:.3f}" for s in sim])
ax.set_xscale("log", base=2)
ax.set_xlabel("microbatches m")
ax.set_ylabel("bubble fraction")
ax.set_title(f"p = {p} stages")
ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# ## 5. Predictions against published measurements
#
# The time model has no per-run knobs: one achievable fraction of peak for GEMMs, memory and
# links (80% each, a property of the A100, stated once in `minipar/sim/hardware.py`), a 5 us
# kernel launch, and the assumptions each paper leaves open (microbatch size 1, plain 1F1B,
# full recomputation for PTD-P's table 1). We compare with PTD-P table 1 (TFLOP/s per GPU, the
# rows that define the `ptdp-*` presets), PTD-P table 2 (PTD-P and ZeRO-3 at larger scale) and
# Korthikanti et al. table 5 (seconds per step).

# %%
def layout_of(r):
    m = r.global_batch // (r.dp * r.microbatch_size)
    par = ParallelConfig(dp=r.dp, tp=r.tp, pp=r.pp, zero=r.zero, schedule=r.schedule,
                         sequence_parallel=r.sequence_parallel,
                         virtual_stages=r.virtual_stages, microbatches=m)
    return par, cm.Workload(global_batch=r.global_batch, microbatch_size=r.microbatch_size,
                            recompute=r.recompute)


print(f"{'run':22s} {'metric':14s} {'published':>9s} {'predicted':>9s} {'ratio':>6s}")
within = total = 0
for r in list(PTDP_TABLE1.values()) + VALIDATION_RUNS:
    par, w = layout_of(r)
    est = estimate(r.model, par, w, A100_80GB, use_simulator=False)
    metric = "tflops_per_gpu" if "tflops_per_gpu" in r.measured else "step_time_s"
    pred = est.tflops_per_gpu if metric == "tflops_per_gpu" else est.step_time_s
    ratio = pred / r.measured[metric]
    total += 1
    within += abs(ratio - 1) <= 0.25
    flag = "" if abs(ratio - 1) <= 0.25 else "   <- miss"
    print(f"{r.name:22s} {metric:14s} {r.measured[metric]:9.2f} {pred:9.2f} {ratio:6.2f}{flag}")
print(f"{within} of {total} within 25%")

# %% [markdown]
# What this says, honestly:
#
# * PTD-P's own runs (tables 1 and 2) are predicted up to about 15% *faster* than measured,
#   and the error does not grow with scale: the model's shape is right, and the systematic gap
#   is what it leaves out (kernels below 80% of peak on small shapes, the data loader,
#   imbalanced stages, network congestion).
# * Korthikanti et al.'s step times are predicted up to about 10% *shorter* too, and the model
#   gets the gain of sequence parallelism + selective recomputation over full recomputation
#   (about 30%) from first principles: less recomputed work, fewer memory-bound passes.
# * The ZeRO-3 rows miss badly (1.6x to 5x too optimistic). The model assumes parameter
#   gathers are perfectly prefetched behind compute and that a ring over 1536 ranks runs at link
#   speed. DeepSpeed's 2021 ZeRO-3 did neither at that scale: PTD-P measured it falling from
#   144 to 44 TFLOP/s as the GPU count grew at a fixed batch. A model is only as good as what it
#   chooses to count; here it did not count implementation overheads.

# %% [markdown]
# ## 6. Predicted and measured, side by side, on this machine
#
# Finally the same program at laptop scale: 2 pipeline stages under real `mpirun`, 4
# microbatches, traced. Each rank also measures the GEMM speed it gets (one BLAS thread each,
# as `mpirun` sets), and the cost model predicts the step for "this machine" from that number.

# %%
from minipar.lessons import mpirun  # noqa: E402

TRACE = os.path.join(out_dir, "measured.json")
small = dict(vocab_size=256, seq_len=128, n_layers=4, d_model=256, n_heads=4)
SCRIPT = f"""
import json, numpy as np
from minipar.bench.step import gemm_flops
from minipar.config import ModelConfig, ParallelConfig
from minipar.dist.comm import MPIComm
from minipar.dist.mesh import Mesh
from minipar.engine import Engine
from minipar.observe.trace import Tracer, merge
world = MPIComm.world()
cfg = ModelConfig(**{small!r})
par = ParallelConfig(pp=2, microbatches=4)
tracer = Tracer(world.rank)
engine = Engine(cfg, par, Mesh(world, 1, 2, 1), dtype="float32", tracer=tracer)
ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (32, cfg.seq_len))
flops = gemm_flops("float32", 512, 0.3)
engine.train_step(ids, ids, float(ids.size))  # warm-up
tracer.clear(); world.barrier(); tracer.reset_clock()
engine.train_step(ids, ids, float(ids.size))
events = merge(world.allgather_obj(tracer.events))
flops = min(world.allgather_obj(flops))
if world.rank == 0:
    json.dump({{"events": events, "gemm_flops": flops}}, open({TRACE!r}, "w"))
"""
mpirun(2, ["-c", SCRIPT], timeout=120, stream=False)
measured = json.load(open(TRACE))
print(f"GEMM per rank: {measured['gemm_flops'] / 1e9:.1f} GFLOP/s")

# %%
from minipar.config import ModelConfig  # noqa: E402
from minipar.observe.render import plot_timeline  # noqa: E402

bench = os.path.join(out_dir, "bench.json")
json.dump({"gemm_flops": measured["gemm_flops"]}, open(bench, "w"))
here = Hardware.from_bench_json(bench)
cfg = ModelConfig(**small)
par = ParallelConfig(pp=2, microbatches=4)
w = cm.Workload(global_batch=32, microbatch_size=8, dtype="fp32", dropout=False,
                scatter_gather=False)
pred = estimate(cfg, par, w, here, use_simulator=True)
t_measured = max(e["end"] for e in measured["events"])
print(f"predicted step {pred.step_time_s:.3f} s, measured {t_measured:.3f} s "
      f"(ratio {pred.step_time_s / t_measured:.2f})")
png_pred = plot_timeline(pred.timeline, os.path.join(out_dir, "predicted.png"),
                         "predicted (cost model + simulator)")
png_meas = plot_timeline(measured["events"], os.path.join(out_dir, "measured.png"),
                         "measured (mpirun -n 2, traced)")
fig, axes = plt.subplots(2, 1, figsize=(10, 5))
for ax, png in zip(axes, (png_pred, png_meas)):
    ax.imshow(plt.imread(png))
    ax.axis("off")
plt.show()

# %% [markdown]
# The two timelines have the same shape because they are the same program: warm-up forwards,
# one-forward-one-backward, drain, gradient sync, optimizer step. The gap in length is what the
# cost model does not know about this machine: NumPy's elementwise kernels run far below the
# default memory bandwidth assumed for "this machine" when no `mem_bytes_per_s` is measured,
# Python adds a fixed cost per operation, and two ranks share two cores with everything else.
# `python -m minipar.bench --validate` measures exactly these (an elementwise rate per kernel
# family, the batched products of attention, the speed of a process while every core is busy)
# and then predicts seven real 1-, 2- and 4-rank DP/TP/PP layouts: in our runs every
# prediction landed within 25% of the measurement (0.81 to 1.02). Calibrating against this
# machine is how we learn what the model leaves out.
#
# Try: `python -m minipar.simulate --model ptdp-1t`, then change `--tp`, `--pp`,
# `--virtual-stages`, `--recompute` and `--sequence-parallel` and watch memory, bubble and
# throughput move.
