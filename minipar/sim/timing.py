"""Time of one training step from first principles, and the numbers reported about it.

Compute is the roofline of each kernel (``minipar.sim.kernels``). Collectives use the
alpha-beta model of a ring (Thakur et al. 2005; Patarasuk and Yuan 2009): an allreduce over p
ranks takes 2(p-1) alpha + 2(p-1)/p n / beta, an allgather or reduce-scatter half that, with
alpha and beta those of the slowest link the ring crosses. Ranks are placed as Megatron-LM
places them (tensor parallel innermost, then data parallel, then pipeline), so tp groups of up
to a node's GPUs ring over NVLink and every group that spans nodes runs at one NIC per rank.
Tensor-parallel collectives are not overlapped (Megatron-LM 2021); data-parallel sync overlaps
the last backward only when gradient buckets are on; ZeRO-3 gathers and reduce-scatters are
prefetched unit by unit, so each unit's pass costs max(its compute, the traffic beside it) and
the first gather and last reduce-scatter of a pass are exposed (``overlapped``): a terabyte of
gathers on a 20 GB/s link takes 50 s whatever the compute it hides behind.

The per-instruction costs feed the discrete-event simulator that runs the very program the
executor runs (``minipar.sim.simulator``); ``use_simulator=False`` takes the closed form
T = m max_s C_s + (p-1) mean_s C_s / v + 2 (p-1) P, exact for uniform stages (PTD-P 2.2).

Against published runs (tests/test_costmodel.py; nothing here is fitted to them):

* PTD-P table 1. Rows without a pipeline (1.7B-18B) come within -2% .. +2%; rows with one
  (39B-1T) are optimistic by +9% .. +14%. That gap does not grow with the bubble (2% of the
  step at 39B, 11% at 1T), so it is not the schedule's idle time but about 12% of every
  microbatch's work that pipelining costs and the model leaves out. The likely cause (our
  reading, not measured here): Megatron-LM's 2021 point-to-point exchanges were blocking and
  synchronised adjacent stages every microbatch, so each stage ran at the pace of the slower
  neighbour with its GPU queue drained between passes, where the model prices a transfer by
  its bytes alone. So for pipelined layouts the model is an upper bound on throughput.
* PTD-P table 2, ZeRO-3 without model parallelism: 1.05-1.4 TB per GPU per step on a ring over
  all GPUs at one NIC each makes the step communication-bound from 768 GPUs on (TFLOP/s per
  GPU halves as the GPU count doubles at a fixed batch, as measured). NCCL can stripe rings
  over a node's 8 NICs; with that, 1536 GPUs would be compute-bound at ~229 TFLOP/s against
  44 measured, so the model keeps the plain ring, as DeepSpeed's ZeRO-3 ran it then.
* Korthikanti et al. table 5: step times within -10% .. -3%.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minipar.config import ModelConfig, ParallelConfig, replace
from minipar.parallel.schedules import (
    Bwd, BwdInput, BwdWeight, Fwd, Step, SyncGrads, make_schedule,
)
from minipar.sim import comm_volume as cv
from minipar.sim import kernels as K
from minipar.sim.costmodel import (
    Workload, activation_bytes_per_layer, canonical_dtype, dtype_bytes, hardware_flops,
    local_param_count, memory_per_gpu, model_flops, param_count, units,
)
from minipar.parallel.context import busiest_share
from minipar.parallel.tensor import padded_vocab
from minipar.sim.hardware import Hardware
from minipar.sim.overlap import UnitCost, overlapped, zero3_recompute_bytes, zero3_traffic
from minipar.sim.simulator import Timeline, simulate

SIMULATE_UP_TO = 400_000  # instructions; beyond this the closed form is used


# ------------------------------------------------------------------------- links and rings
def group_tier(hw: Hardware, parallel: ParallelConfig, group: str) -> tuple[float, float]:
    """(bytes/s per rank, latency per ring step) of a group under Megatron's rank order.

    A ring runs at the speed of its slowest edge (Patarasuk and Yuan 2009): a group whose ranks
    all sit on one node rings over NVLink; a group that spans nodes has at least one network
    edge per node it crosses, so every rank's share moves at one NIC's rate, however many of
    the group's ranks share a node. (NCCL can stripe several rings over a node's NICs; PTD-P
    table 2's ZeRO-3 rows, whose data-parallel ring puts 8 ranks on every node, show no such
    gain, and neither do table 1's small-tp rows: see ``estimate``.)
    """
    t, c, d = parallel.tp, parallel.cp, parallel.dp  # rank order tp, cp, dp, pp (fastest first)
    size, stride = {"tp": (t, 1), "cp": (c, t), "dp": (d, t * c), "dpcp": (d * c, t),
                    "pp": (parallel.pp, t * c * d)}[group]
    if stride * size <= hw.gpus_per_node:
        return hw.intra_bw * hw.link_efficiency, hw.intra_latency
    return min(hw.intra_bw, hw.inter_bw) * hw.link_efficiency, hw.inter_latency


def collective_time(c: cv.Collective, size: int, tier: tuple[float, float]) -> float:
    """Ring alpha-beta time of one collective over ``size`` ranks."""
    if size == 1:
        return 0.0
    bw, lat = tier
    if c.op == "allreduce":
        return 2 * (size - 1) * lat + 2 * (size - 1) / size * c.nbytes / bw
    if c.op in ("allgather", "reduce_scatter"):
        return (size - 1) * lat + (size - 1) / size * c.nbytes / bw
    return lat + c.nbytes / bw


def group_sizes(parallel: ParallelConfig) -> dict[str, int]:
    """Ranks per group name, as ``cv.Collective.group`` names them."""
    return {"tp": parallel.tp, "dp": parallel.dp, "pp": parallel.pp, "cp": parallel.cp,
            "dpcp": parallel.dp * parallel.cp}


def comm_time(cs: list[cv.Collective], hw: Hardware, parallel: ParallelConfig) -> float:
    sizes = group_sizes(parallel)
    return sum(collective_time(c, sizes[c.group], group_tier(hw, parallel, c.group))
               for c in cs)


# ------------------------------------------------------------------------ per-chunk costs
@dataclass
class ChunkCost:
    """Seconds of one microbatch through one local chunk, split by what they are.

    The sums (``fwd_compute`` ...) say where the time goes; ``fwd``, ``bwd_input`` and ``bwd``
    are what a pass costs, with ZeRO-3's traffic overlapped unit by unit (``overlapped``)."""

    fwd_compute: float = 0.0
    fwd_comm: float = 0.0  # tensor-parallel collectives of the forward
    bwd_compute: float = 0.0  # input-gradient kernels (+ recomputation)
    bwd_comm: float = 0.0
    wgrad_compute: float = 0.0  # weight-gradient GEMMs (the zero-bubble W pass)
    zero3_fwd: float = 0.0  # parameter gathers (ZeRO-3), total seconds of the forward
    zero3_bwd: float = 0.0  # gathers and reduce-scatters of the backward
    tp_bytes_fwd: float = 0.0
    tp_bytes_bwd: float = 0.0
    cp_bytes: float = 0.0  # ring attention's sends, forward and backward
    units: list[UnitCost] = field(default_factory=list)  # in forward order

    @property
    def fwd(self) -> float:
        u = self.units
        return overlapped([x.fwd for x in u], [x.gather_fwd for x in u], [0.0] * len(u))

    def _backward(self, weight: bool) -> float:
        u = self.units[::-1]  # backward runs the units in reverse
        return overlapped([x.bwd_input + (x.bwd_weight if weight else 0.0) for x in u],
                          [x.gather_bwd for x in u], [x.scatter for x in u])

    @property
    def bwd_input(self) -> float:
        return self._backward(weight=False)

    @property
    def bwd(self) -> float:
        return self._backward(weight=True)


def first_touch_time(model: ModelConfig, parallel: ParallelConfig, work: Workload, hw: Hardware,
                     kind: str) -> float:
    """Seconds to fault in the memory one microbatch's forward through a unit keeps for its
    backward, on a device whose allocator hands freed memory back to the OS (NumPy on glibc
    frees a step's activations in backward; the next forward maps and zeroes them again, page
    by page). The bytes are those ``memory_per_stage`` counts: Korthikanti et al. table 2 per
    block at this dtype, fp32 logits at the head. 0 where memory is reused (GPU caching
    allocators: ``first_touch_bw`` 0)."""
    if hw.first_touch_bw <= 0:
        return 0.0
    e, b, t = dtype_bytes(work.dtype), work.microbatch_size, parallel.tp
    if kind == "block":
        kept = activation_bytes_per_layer(model, b, t, parallel.sequence_parallel,
                                          work.recompute, cp=parallel.cp) * e / 2
    elif kind == "head":
        kept = 4 * model.seq_len // parallel.cp * b * padded_vocab(model.vocab_size, t) / t
    else:
        kept = 0.0
    return kept / hw.first_touch_bw


def fresh_output_time(cs: list[cv.Collective], parallel: ParallelConfig, hw: Hardware) -> float:
    """Seconds to fault in the new arrays a forward's collectives return (minipar's allreduce
    and allgather write their result into fresh memory; as with activations, backward reuses
    what it frees). Output bytes per ``CommStats``' rule; 0 where memory is reused."""
    if hw.first_touch_bw <= 0:
        return 0.0
    sizes = group_sizes(parallel)
    out = sum(c.nbytes // sizes[c.group] if c.op == "reduce_scatter" else c.nbytes
              for c in cs if sizes[c.group] > 1)
    return out / hw.first_touch_bw


def chunk_costs(model: ModelConfig, parallel: ParallelConfig, work: Workload, hw: Hardware,
                stage: int, layers_only: bool = False) -> list[ChunkCost]:
    """The cost of one microbatch through each local chunk of pipeline stage ``stage``
    (``layers_only``: Transformer blocks alone, leaving out the embedding and the head)."""
    dt = canonical_dtype(work.dtype)
    e, b, t, sp = dtype_bytes(dt), work.microbatch_size, parallel.tp, parallel.sequence_parallel
    local = model if parallel.cp == 1 else replace(model, seq_len=model.seq_len // parallel.cp)
    blk = ring_kernels(K.block_forward(local, b, t, sp, e, work.dropout), model, parallel)
    redo = {"none": [], "full": blk,
            "selective": [k for k in blk if k.attention_core]}[work.recompute]
    forward = {"block": blk, "embed": K.embed_forward(local, b, t, sp, e, work.dropout),
               "head": K.head_forward(local, b, t, sp, e)}
    tp_pass = {"block": cv.block_tp, "embed": cv.embed_tp, "head": cv.head_tp}
    out = []
    for chunk in units(model, parallel, stage):
        c = ChunkCost()
        for u in chunk:
            if layers_only and u.kind != "block":
                continue
            bi, bw = K.backward_of(forward[u.kind])
            again = redo if u.kind == "block" else []
            f_cs = tp_pass[u.kind](model, parallel, b, e, False)
            b_cs = tp_pass[u.kind](model, parallel, b, e, True)
            r_cs = f_cs if (u.kind == "block" and work.recompute == "full") else []
            x = UnitCost()
            fwd_compute = (K.total_time(forward[u.kind], hw, dt)
                           + first_touch_time(model, parallel, work, hw, u.kind))
            fwd_comm = comm_time(f_cs, hw, parallel) + fresh_output_time(f_cs, parallel, hw)
            bwd_compute = K.total_time(again + bi, hw, dt)
            bwd_comm = comm_time(r_cs + b_cs, hw, parallel)
            if u.kind == "block" and parallel.cp > 1:  # the ring, overlapped with the core
                core = [k for k in forward["block"] if k.attention_core]
                ring_f, ring_b = (cv.cp_ring(model, parallel, b, e, bwd) for bwd in (0, 1))
                fwd_comm += exposed_ring(ring_f, core, hw, dt, parallel)
                bwd_comm += exposed_ring(ring_b, [*again, *K.backward_of(core)[0]], hw, dt,
                                         parallel)
                c.cp_bytes += sum(y.nbytes for y in ring_f + ring_b if y.op == "send")
            x.fwd, x.bwd_input = fwd_compute + fwd_comm, bwd_compute + bwd_comm
            x.bwd_weight = K.total_time(bw, hw, dt)
            if parallel.zero >= 3 and parallel.dp * parallel.cp > 1:
                x.gather_fwd, x.gather_bwd, x.scatter = zero3_traffic(
                    u, u.kind == "block" and work.recompute == "full", e,
                    lambda cs: comm_time(cs, hw, parallel), parallel)
            c.units.append(x)
            c.fwd_compute += fwd_compute
            c.fwd_comm += fwd_comm
            c.bwd_compute += bwd_compute
            c.bwd_comm += bwd_comm
            c.wgrad_compute += x.bwd_weight
            c.zero3_fwd += x.gather_fwd
            c.zero3_bwd += x.gather_bwd + x.scatter
            c.tp_bytes_fwd += sum(y.nbytes for y in f_cs)
            c.tp_bytes_bwd += sum(y.nbytes for y in r_cs + b_cs)
        out.append(c)
    return out


def ring_kernels(blk: list[K.Kernel], model: ModelConfig,
                 parallel: ParallelConfig) -> list[K.Kernel]:
    """A block's kernels on a cp rank's s/cp tokens (``blk``), with its attention core scaled
    to the busiest rank's ring: its queries meet (2 cp + 1)/4 (zig-zag) or cp (contiguous)
    times the key/value tokens of one s/cp block (``context.busiest_share``)."""
    if parallel.cp == 1:
        return blk
    f = busiest_share(model.seq_len, parallel.cp, parallel.cp_split)
    return [replace(k, flops=k.flops * f, nbytes=k.nbytes * f) if k.attention_core else k
            for k in blk]


def exposed_ring(ring: list[cv.Collective], core: list[K.Kernel], hw: Hardware, dt: str,
                 parallel: ParallelConfig) -> float:
    """Seconds the ring's hops add beyond the attention core they overlap with: each hop's
    send (lat + bytes / bw on the cp group's link) runs while the core works on a block."""
    sends = [c for c in ring if c.op == "send"]
    moving = comm_time(sends, hw, parallel)
    return max(0.0, moving - K.total_time(core, hw, dt))


def p2p_message_time(model: ModelConfig, parallel: ParallelConfig, work: Workload,
                     hw: Hardware, src: int, dst: int) -> float:
    """One activation or gradient between pipeline stages src and dst (PTD-P section 4.1:
    with scatter/gather each tp rank sends 1/t over its own NIC, then an NVLink allgather)."""
    e, t = dtype_bytes(work.dtype), parallel.tp
    x = work.microbatch_size * (model.seq_len // parallel.cp) * model.d_model * e
    stride, gpn = parallel.tp * parallel.cp * parallel.dp, hw.gpus_per_node
    same_node = (src * stride) // gpn == (dst * stride) // gpn
    bw = (hw.intra_bw if same_node else hw.inter_bw) * hw.link_efficiency
    lat = hw.intra_latency if same_node else hw.inter_latency
    if parallel.sequence_parallel:
        return lat + x / t / bw
    if work.scatter_gather and t > 1 and not same_node:
        gather = collective_time(cv.Collective("tp", "allgather", x), t,
                                 group_tier(hw, parallel, "tp"))
        return lat + x / t / bw + gather
    return lat + x / bw


def sync_and_step(model: ModelConfig, parallel: ParallelConfig, work: Workload, hw: Hardware,
                  stage: int, last_bwd: float) -> tuple[float, float, float]:
    """(exposed dp sync, optimizer step, dp bytes per step) of one stage."""
    e, m = dtype_bytes(work.dtype), work.microbatches(parallel.dp)
    sync_cs = cv.dp_sync(model, parallel, stage, e, m)
    dp_bytes = sum(c.nbytes for c in sync_cs) + zero3_recompute_bytes(model, parallel, work,
                                                                      stage)
    if parallel.zero >= 3:  # gathers and reduce-scatters already sit inside the passes
        sync_cs = []
    sync = comm_time(sync_cs, hw, parallel)
    if parallel.bucket_mb > 0:
        sync = max(0.0, sync - last_bwd)
    sync += comm_time(cv.partial_grads_tp(model, parallel, stage, e), hw, parallel)
    shards = parallel.dp * parallel.cp  # ZeRO shards over the gradient group
    n = local_param_count(model, parallel, stage) / (shards if parallel.zero else 1)
    return sync, K.optimizer_time(n, hw, e), dp_bytes


# ------------------------------------------------------------------------------- estimate
@dataclass
class Estimate:
    """The predicted step and everything the CLI reports about it."""

    step_time_s: float
    params: int
    model_flops: float
    hardware_flops: float
    tflops_per_gpu: float
    percent_of_peak: float
    mfu: float
    bubble_fraction: float
    memory_per_gpu_bytes: dict
    fits: bool
    comm_bytes_per_step: dict
    breakdown: dict
    gpus: int
    microbatches: int
    timeline: Timeline | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "timeline"}


def instruction_costs(model: ModelConfig, parallel: ParallelConfig, work: Workload,
                      hw: Hardware, layers_only: bool = False):
    """(cost(stage, instr), p2p_time(src, dst, send), per-stage chunk costs, per-stage
    (sync, step, dp bytes)) for the simulator. ``layers_only`` keeps only the Transformer
    blocks and free transfers: uniform stages, whose bubble is the papers' formula."""
    p = parallel.pp
    stages = [chunk_costs(model, parallel, work, hw, s, layers_only) for s in range(p)]
    tail = [(0.0, 0.0, 0) if layers_only else
            sync_and_step(model, parallel, work, hw, s, stages[s][0].bwd) for s in range(p)]
    p2p: dict = {}

    def p2p_time(src: int, dst: int, ins) -> float:
        if layers_only:
            return 0.0
        if (src, dst) not in p2p:
            p2p[src, dst] = p2p_message_time(model, parallel, work, hw, src, dst)
        return p2p[src, dst]

    def cost(stage: int, ins) -> float:
        if isinstance(ins, Fwd):
            return stages[stage][ins.chunk].fwd
        if isinstance(ins, Bwd):
            return stages[stage][ins.chunk].bwd
        if isinstance(ins, BwdInput):
            return stages[stage][ins.chunk].bwd_input
        if isinstance(ins, BwdWeight):
            return stages[stage][ins.chunk].bwd - stages[stage][ins.chunk].bwd_input
        if isinstance(ins, SyncGrads):
            return tail[stage][0]
        if isinstance(ins, Step):
            return tail[stage][1]
        return 0.0

    return cost, p2p_time, stages, tail


def estimate(model: ModelConfig, parallel: ParallelConfig, work: Workload, hw: Hardware,
             use_simulator: bool | None = None) -> Estimate:
    """Predict one step of ``model`` on ``parallel`` x ``hw``. ``parallel.microbatches`` is
    ignored: m = B / (d b) comes from the workload. Call ``check_layout`` first.

    ``use_simulator``: True runs the program through the simulator (and keeps its timeline),
    False uses the closed form, None chooses the simulator for programs of moderate size."""
    dt = canonical_dtype(work.dtype)
    p, v, m = parallel.pp, parallel.virtual_stages, work.microbatches(parallel.dp)
    parallel = _with_m(parallel, m)
    cost, p2p_time, stages, tail = instruction_costs(model, parallel, work, hw)
    per_mb = [sum(c.bwd + c.fwd for c in st) for st in stages]
    size = 2 * p * m * v * (3 if p > 1 else 1)
    timeline = None
    if use_simulator or (use_simulator is None and size <= SIMULATE_UP_TO):
        timeline = simulate(make_schedule(parallel.schedule, p, m, v), cost, p2p_time)
        pipe_end = max(ev.end for ev in timeline.events if ev.kind in
                       ("fwd", "bwd", "bwd_input", "bwd_weight"))
        bubble = 1 - sum(timeline.busy) / (p * pipe_end)
        step = timeline.makespan
    else:
        hop = max((p2p_time(s, s + 1, None) for s in range(p - 1)), default=0.0)
        fill = per_mb
        if parallel.schedule == "zb-h1":
            fill = [sum(c.fwd + 2 * c.bwd_input - c.bwd for c in st) for st in stages]
        pipe_end = m * max(per_mb) + (p - 1) * (sum(fill) / p) / v + 2 * (p - 1) * hop
        bubble = 1 - sum(per_mb) * m / (p * pipe_end)
        step = pipe_end + max(sy + st for sy, st, _ in tail)
    return _report(model, parallel, work, hw, stages, tail, step, bubble, m, timeline, dt)


def _with_m(parallel: ParallelConfig, m: int) -> ParallelConfig:
    return parallel if parallel.microbatches == m else replace(parallel, microbatches=m)


def _report(model, parallel, work, hw, stages, tail, step, bubble, m, timeline, dt) -> Estimate:
    gpus = parallel.world
    batch = work.global_batch
    mf = model_flops(model, batch)
    hf = hardware_flops(model, batch, work.recompute)
    peak = hw.flops(dt)
    mem = memory_per_gpu(model, parallel, work)
    # The busiest stage explains the step: its compute, tp comm, exposed gathers, idle time.
    s = max(range(parallel.pp), key=lambda i: sum(c.fwd + c.bwd for c in stages[i]))
    st = stages[s]
    compute = m * sum(c.fwd_compute + c.bwd_compute + c.wgrad_compute for c in st)
    tp_comm = m * sum(c.fwd_comm + c.bwd_comm for c in st)
    busy = m * sum(c.fwd + c.bwd for c in st)
    sync, opt, dp_bytes = tail[s]
    e = dtype_bytes(dt)
    x = work.microbatch_size * (model.seq_len // parallel.cp) * model.d_model * e
    sends = sum(c.op == "send" for c in cv.pp_sends(model, parallel, s, work.microbatch_size,
                                                    e, m))
    pp_msg = x / parallel.tp if (parallel.sequence_parallel or work.scatter_gather) else x
    comm = {"tp": m * sum(c.tp_bytes_fwd + c.tp_bytes_bwd for c in st), "dp": dp_bytes,
            "pp": sends * pp_msg, "cp": m * sum(c.cp_bytes for c in st)}
    comm["total"] = sum(comm.values())
    breakdown = {"compute_s": compute, "tp_comm_s": tp_comm,
                 "zero3_exposed_s": busy - compute - tp_comm,
                 "pipeline_idle_s": max(0.0, step - busy - sync - opt),
                 "dp_sync_exposed_s": sync, "optimizer_s": opt, "stage": s}
    return Estimate(
        step_time_s=step, params=param_count(model), model_flops=mf, hardware_flops=hf,
        tflops_per_gpu=hf / (step * gpus) / 1e12, percent_of_peak=100 * hf / (step * gpus * peak),
        mfu=mf / (step * gpus * peak), bubble_fraction=float(bubble),
        memory_per_gpu_bytes=mem, fits=mem["total"] <= hw.memory_bytes,
        comm_bytes_per_step=comm, breakdown=breakdown, gpus=gpus, microbatches=m,
        timeline=timeline)


def predict_step_time(model_cfg: ModelConfig, parallel_cfg: ParallelConfig, batch_size: int,
                      hardware: Hardware, dtype: str = "fp32") -> float:
    """Seconds per step of minipar itself (no dropout, no recomputation, plain PP transfers)
    for ``batch_size`` sequences split into ``parallel_cfg.microbatches`` per dp rank; used by
    ``python -m minipar.bench --validate`` to compare with measured steps."""
    b = batch_size // (parallel_cfg.dp * parallel_cfg.microbatches)
    work = Workload(global_batch=batch_size, microbatch_size=max(1, b), recompute="none",
                    dtype=dtype, scatter_gather=False, dropout=False)
    return estimate(model_cfg, parallel_cfg, work, hardware).step_time_s


__all__ = ["group_tier", "collective_time", "comm_time", "UnitCost", "overlapped", "ChunkCost",
           "zero3_traffic", "zero3_recompute_bytes", "first_touch_time",
           "fresh_output_time", "chunk_costs", "group_sizes", "ring_kernels", "exposed_ring",
           "p2p_message_time", "sync_and_step",
           "instruction_costs", "Estimate", "estimate", "predict_step_time"]
