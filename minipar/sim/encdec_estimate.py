"""``python -m minipar.simulate --arch encdec``: what an encoder-decoder step costs on a layout.

Counts, not a clock: parameters, model FLOPs per step, memory per GPU (ZeRO model states and
the activations of each stage's chunks, ``minipar.sim.encdec_cost``), bytes per GPU per step by
group exactly as ``CommStats`` records them (``comm_volume.predict_comm_bytes``, tested equal
to real runs), the part of the pipeline bytes the memory pair adds, and the pipeline bubble of
the schedule simulated with every pass costed by its chunk's FLOPs (backward 2x forward; the
stages of an encoder-decoder differ, since a decoder layer does about 4/3 of an encoder layer's
work when S = T). The GPT's kernel-level time model (``minipar.sim.timing``) is not applied to
the encoder-decoder.
"""

from __future__ import annotations

from minipar.config import ModelConfig, ParallelConfig
from minipar.parallel.schedules import BwdInput, BwdWeight, Fwd, make_schedule
from minipar.sim import costmodel as cm
from minipar.sim import encdec_cost as ec
from minipar.sim.comm_volume import predict_comm_bytes
from minipar.sim.simulator import simulate


def bubble(model: ModelConfig, parallel: ParallelConfig, b: int) -> float:
    """Idle fraction of the schedule with FLOP-proportional pass costs (no transfer time)."""
    program = make_schedule(parallel.schedule, parallel.pp, parallel.microbatches,
                            parallel.virtual_stages)
    p = parallel.pp
    fwd = {g: ec.chunk_forward_flops(model, parallel, g, b)
           for g in range(p * parallel.virtual_stages)}

    def cost(stage: int, ins) -> float:
        if not hasattr(ins, "chunk") or ins.kind in ("send", "recv"):
            return 0.0
        f = fwd[ins.chunk * p + stage]  # backward: dX and dW passes, each about a forward
        return f if isinstance(ins, (Fwd, BwdInput, BwdWeight)) else 2 * f

    return float(simulate(program, cost).bubble_fraction)


def estimate(model: ModelConfig, parallel: ParallelConfig, work: cm.Workload) -> dict:
    """Every count of the module docstring, as one JSON-ready dict."""
    e, b = cm.dtype_bytes(work.dtype), work.microbatch_size
    m = work.microbatches(parallel.dp)
    comm = {}
    for s in range(parallel.pp):
        stats = predict_comm_bytes(model, parallel, work.global_batch, e, stage=s)
        totals = {g: sum(v["bytes"] for v in ops.values()) for g, ops in stats.items()}
        if sum(totals.values()) >= sum(comm.values()):
            comm = totals
    sent, gpt = ec.pipeline_bytes(model, parallel, b, e, m)
    return {"params": cm.param_count(model),
            "model_flops": ec.model_flops(model, work.global_batch),
            "memory_per_gpu_bytes": cm.memory_per_gpu(model, parallel, work),
            "comm_bytes_per_step": comm, "pipeline_bytes_sent": sent,
            "pipeline_bytes_sent_gpt_sized": gpt,
            "bubble_fraction": bubble(model, parallel, b) if parallel.pp > 1 else 0.0}


def report(name: str, model: ModelConfig, parallel: ParallelConfig, work: cm.Workload,
           est: dict) -> str:
    """The estimate as the command's text."""
    mem, comm = est["memory_per_gpu_bytes"], est["comm_bytes_per_step"]
    v = f", v={parallel.virtual_stages}" if parallel.virtual_stages > 1 else ""
    kinds = ", ".join(f"{k} {_gb(x)}" for k, x in mem.items() if k not in ("total", "stage"))
    extra = est["pipeline_bytes_sent"] - est["pipeline_bytes_sent_gpt_sized"]
    return "\n".join([
        f"{name} as an encoder-decoder: {est['params'] / 1e6:,.2f}M parameters ({model.n_layers} "
        f"encoder + {model.n_layers} decoder layers, d_model {model.d_model}, {model.n_heads} "
        f"heads, source {model.src_len}, target {model.seq_len}, vocab {model.vocab_size}"
        f"{', encoder position bias' if model.pos_bias else ''})",
        f"layout: {parallel.world} GPU(s) = dp {parallel.dp} x tp {parallel.tp} x pp "
        f"{parallel.pp}, {parallel.schedule}{v}, {parallel.microbatches} microbatches of "
        f"{work.microbatch_size}, ZeRO {parallel.zero}, sequence parallel "
        f"{'on' if parallel.sequence_parallel else 'off'}, {work.dtype}",
        f"model FLOPs     {est['model_flops']:.4g} per step (3 x forward)",
        f"memory per GPU  {_gb(mem['total'])} (worst stage {mem['stage']}): {kinds}",
        "comm per step   per GPU (worst stage): "
        + ", ".join(f"{g} {_gb(x)}" for g, x in sorted(comm.items())),
        f"pipeline        {_gb(est['pipeline_bytes_sent'])} sent per step per pipeline; "
        f"{_gb(extra)} of it is the memory pair's extra over GPT-sized messages",
        f"bubble          {100 * est['bubble_fraction']:.1f}% (passes costed by their FLOPs; "
        "no clock: the time model is the GPT's)",
    ])


def _gb(x: float) -> str:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.0f} B"
