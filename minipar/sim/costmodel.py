"""What a training step costs, counted: parameters, FLOPs, memory per device.

Everything here is exact arithmetic on a model config x layout, and each number is written once:
the parameter count (``param_count``, per unit ``units``), the FLOPs, the ZeRO model states and
the activation table (``block_activation_terms``), used alike by the runtime's tests, the train
banner, the benchmark, the simulator and the lessons. The bytes per collective are in
``minipar.sim.comm_volume``; the time it all takes in ``minipar.sim.timing``. The formulas come
from the papers and are cited where used:

* PTD-P: Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters
  Using Megatron-LM" (eq. 2 parameters, eq. 3 FLOPs with full recomputation, eq. 4 time).
* Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models"
  (table 2 activation memory per layer; eq. 7 model FLOPs, eq. 8 with selective recomputation).
* ZeRO: Rajbhandari et al. 2019, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
  Models" (sections 3 and 5, figure 1: model-state bytes per device by stage).

Notation as in the papers: s sequence length, b microbatch size, h hidden size, a heads,
l (L) layers, V vocabulary, t tensor-parallel size, p pipeline stages, d (N_d) data-parallel size.
"""

from __future__ import annotations

from dataclasses import dataclass

from minipar.config import (RECOMPUTE_MODES, ConfigError, ModelConfig, ParallelConfig,
                            chunk_blocks, replace)
from minipar.parallel.tensor import padded_vocab

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32",
            "float64": "fp64", "double": "fp64"}
RECOMPUTE = RECOMPUTE_MODES  # the runtime's --recompute names, so the two always agree


def canonical_dtype(name: str) -> str:
    """``bf16``, ``fp16``, ``fp32`` or ``fp64`` for any usual spelling; ConfigError otherwise."""
    key = _ALIASES.get(name, name)
    if key not in DTYPE_BYTES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPE_BYTES)} (or float16, "
                          f"bfloat16, float32, float64), got {name!r}")
    return key


def dtype_bytes(name: str) -> int:
    return DTYPE_BYTES[canonical_dtype(name)]


def optimizer_bytes_per_param(dtype: str) -> int:
    """ZeRO's K: Adam's two moments, plus an fp32 master copy when training in 16 bits.

    Mixed precision (Micikevicius et al. 2018) keeps fp32 master weights, momentum and variance:
    K = 12, so 2 + 2 + 12 = 16 bytes per parameter before sharding (ZeRO section 3.1). In a
    single precision the weights are the master copy and K is just the two moments.
    """
    e = dtype_bytes(dtype)
    return 12 if e == 2 else 2 * e


@dataclass(frozen=True)
class Workload:
    """What one optimizer step processes and how, beyond the layout (``ParallelConfig``)."""

    global_batch: int = 1  # sequences per optimizer step over all dp replicas (B)
    microbatch_size: int = 1  # sequences per microbatch on one pipeline (b)
    recompute: str = "none"  # activation recomputation: none, selective or full
    dtype: str = "bf16"  # compute dtype; 16-bit means mixed precision (K = 12)
    scatter_gather: bool = True  # PTD-P section 4.1: a PP transfer split over the tp NICs
    dropout: bool = True  # Megatron-style dropout kernels in the time model

    def microbatches(self, dp: int) -> int:
        """m: microbatches per step on each pipeline (B / (d b))."""
        return self.global_batch // (dp * self.microbatch_size)


def check_layout(model: ModelConfig, parallel: ParallelConfig, work: Workload,
                 gpus: int | None = None) -> None:
    """Raise a one-line ConfigError if the layout cannot run this model and workload."""
    model.validate()
    canonical_dtype(work.dtype)
    if work.recompute not in RECOMPUTE:
        raise ConfigError(f"--recompute must be one of {', '.join(RECOMPUTE)}, "
                          f"got {work.recompute!r}")
    for flag, value in (("--global-batch", work.global_batch),
                        ("--microbatch-size", work.microbatch_size)):
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{flag} must be a positive integer, got {value!r}")
    if gpus is not None and parallel.world != gpus:
        raise ConfigError(f"--dp {parallel.dp} x --tp {parallel.tp} x --pp {parallel.pp} = "
                          f"{parallel.world} does not equal --gpus {gpus}")
    if work.global_batch % (parallel.dp * work.microbatch_size):
        raise ConfigError(
            f"--global-batch {work.global_batch} is not divisible by --dp {parallel.dp} x "
            f"--microbatch-size {work.microbatch_size}")
    # Megatron keeps a copy of a tied embedding on the last stage, so ties are fine here.
    parallel.validate(model=replace(model, tie_weights=False))


# ----------------------------------------------------------------------------- parameters
def ptdp_param_count(layers: int, hidden: int, vocab: int, seq_len: int) -> int:
    """PTD-P eq. 2: P = 12 l h^2 (1 + 13/(12 h) + (V + s)/(12 l h)), exactly as an integer.

    Per layer 12h^2 + 13h (QKV, projection, two MLP matrices, their biases, two LayerNorms),
    plus the (tied) token embedding V h and the learned positions s h.
    """
    return 12 * layers * hidden ** 2 + 13 * layers * hidden + (vocab + seq_len) * hidden


def block_param_count(model: ModelConfig, tp: int = 1) -> int:
    """One Transformer block of minipar's GPT as one of ``tp`` ranks holds it.

    The QKV and first MLP matrices are split by columns (with their biases), the two
    projections by rows; the six h-vectors (two LayerNorms' gain and bias, the projections'
    biases) are replicated on every tp rank (Megatron-LM, Shoeybi et al. 2019).
    """
    h, f = model.d_model, model.ffn
    split = (3 * h * h + 3 * h) + h * h + (h * f + f) + f * h  # QKV, proj, MLP fc, MLP proj
    return split // tp + 6 * h


@dataclass(frozen=True)
class Unit:
    """A piece of a stage's model that ZeRO-3 gathers as one: the embedding, a block, the head;
    ``params`` are the elements one tp rank holds."""

    kind: str
    params: int


def units(model: ModelConfig, parallel: ParallelConfig, stage: int) -> list[list[Unit]]:
    """The units of each model chunk pipeline rank ``stage`` holds, as one tp rank sees them.

    Rank s holds global chunks s, s + p, ... (PTD-P interleaving); the first global chunk starts
    with the embedding and the last ends with the head (which keeps its own copy of a tied
    embedding when it sits on another stage, as Megatron-LM does). The vocabulary is padded to a
    multiple of tp and split over it; learned positions and the final LayerNorm are replicated.
    """
    h, t = model.d_model, parallel.tp
    vp = padded_vocab(model.vocab_size, t)
    block = Unit("block", block_param_count(model, t))
    embed = Unit("embed", vp * h // t + (model.seq_len * h if model.pos == "learned" else 0))
    n_chunks = parallel.pp * parallel.virtual_stages
    tied_here = model.tie_weights and n_chunks == 1
    head = Unit("head", 2 * h + (0 if tied_here else h * vp // t))
    blocks = chunk_blocks(model.n_layers, n_chunks, parallel.partition)
    out = []
    for g in range(stage, n_chunks, parallel.pp):
        chunk = ([embed] if g == 0 else []) + [block] * blocks[g]
        out.append(chunk + ([head] if g == n_chunks - 1 else []))
    return out


def local_param_count(model: ModelConfig, parallel: ParallelConfig, stage: int) -> int:
    """Parameters one rank of pipeline stage ``stage`` holds before any ZeRO sharding."""
    return sum(u.params for chunk in units(model, parallel, stage) for u in chunk)


def param_count(model: ModelConfig) -> int:
    """All parameters of the unsharded model: what the one rank of the serial layout holds.

    The one parameter count of minipar (the train banner, the benchmark, the simulator and the
    tests use it); ``tests/test_costmodel.py`` checks it against the built model's parameters.
    """
    return local_param_count(model, ParallelConfig(), 0)


# ---------------------------------------------------------------------------------- FLOPs
def layer_forward_flops(model: ModelConfig, b: int) -> float:
    """Matrix-multiply FLOPs of one block's forward for b sequences (Korthikanti appendix A).

    24 b s h^2 + 4 b s^2 h when the MLP is 4h wide: QKV 6bsh^2, projection 2bsh^2, MLP 16bsh^2,
    and the attention scores and their use on V, 2bs^2h each.
    """
    s, h, f = model.seq_len, model.d_model, model.ffn
    return 2 * b * s * (4 * h * h + 2 * h * f) + 4 * b * s * s * h


def logit_forward_flops(model: ModelConfig, b: int) -> float:
    """The output layer: 2 b s h V."""
    return 2 * b * model.seq_len * model.d_model * model.vocab_size


def model_flops(model: ModelConfig, batch: int) -> float:
    """FLOPs one step needs, whatever the implementation: 3 x forward (Korthikanti eq. 7)."""
    return 3 * (model.n_layers * layer_forward_flops(model, batch)
                + logit_forward_flops(model, batch))


def hardware_flops(model: ModelConfig, batch: int, recompute: str = "none") -> float:
    """FLOPs counted as executed, the basis of TFLOP/s per GPU and hardware FLOPs utilization.

    Full recomputation adds a forward of every block (PTD-P eq. 3: 4 x forward). Selective
    follows Korthikanti eq. 8, 72 B s l h^2 (1 + s/(3h) + V/(12 l h)): its attention term is
    twice eq. 7's, so that HFU / MFU = 1 + s/(6h) as in their table 5. (Physically only the
    attention core's forward, 4 b s^2 h per block, runs again; the time model prices that.)
    """
    extra = 0.0
    if recompute == "full":
        extra = model.n_layers * layer_forward_flops(model, batch)
    elif recompute == "selective":
        extra = model.n_layers * 3 * 4 * batch * model.seq_len ** 2 * model.d_model
    return model_flops(model, batch) + extra


def ptdp_flops_eq3(batch: int, s: int, layers: int, h: int, vocab: int) -> float:
    """PTD-P eq. 3: F = 96 B s l h^2 (1 + s/(6h) + V/(16 l h)), with full recomputation."""
    return 96 * batch * s * layers * h * h * (1 + s / (6 * h) + vocab / (16 * layers * h))


def korthikanti_flops(batch: int, s: int, layers: int, h: int, vocab: int,
                      selective: bool = False) -> float:
    """Korthikanti eq. 7 (model FLOPs, 72 B s l h^2 (1 + s/(6h) + V/(12 l h))) or eq. 8
    (hardware FLOPs with selective recomputation: s/(3h) in place of s/(6h))."""
    attn = s / (3 * h) if selective else s / (6 * h)
    return 72 * batch * s * layers * h * h * (1 + attn + vocab / (12 * layers * h))


def training_days(tokens: float, params: float, gpus: int, flops_per_gpu: float) -> float:
    """PTD-P eq. 4: end-to-end time ~ 8 T P / (n X) seconds, here in days."""
    return 8 * tokens * params / (gpus * flops_per_gpu) / 86400


# --------------------------------------------------------------------------------- memory
def zero_model_state_bytes(n_params: float, dp: int, zero: int, dtype: str = "bf16") -> dict:
    """Weights, gradients and optimizer state per device for a ZeRO stage (ZeRO section 5.1).

    Baseline (2 + 2 + K) psi; P_os: 2 psi + 2 psi + K psi / N_d; P_os+g: 2 psi + (2 + K) psi /
    N_d; P_os+g+p: (2 + 2 + K) psi / N_d, with 2 the bytes of a 16-bit value.
    """
    e, k = dtype_bytes(dtype), optimizer_bytes_per_param(dtype)
    return {"weights": e * n_params / (dp if zero >= 3 else 1),
            "gradients": e * n_params / (dp if zero >= 2 else 1),
            "optimizer": k * n_params / (dp if zero >= 1 else 1)}


def block_activation_terms(model: ModelConfig, b: int, tp: int = 1,
                           sequence_parallel: bool = False, recompute: str = "none", *,
                           value_bytes: int = 2, dropout: bool = True,
                           layernorm_rstd: bool = False,
                           attention: str = "plain") -> dict[str, int]:
    """Bytes one block keeps for its backward per microbatch of b sequences, on one tp rank,
    tensor by tensor: Korthikanti et al. 2022, section 4.1 and table 2.

    The keys are the sub-modules of ``minipar.models.blocks.Block`` that hold each tensor, so a
    test compares them with what the runtime's caches measure (``minipar.sim.activations``):

        ln1, ln2     the normalised input, T h values (and 1/std, T values, if layernorm_rstd)
        attn.qkv     the QKV matrix's input, T h      mlp.fc     the first MLP matrix's input, T h
        attn         the fused [Q|K|V], 3 s h/t, and the softmax, (a/t) s^2 (per sequence)
        attn.proj    the merged heads, s h/t          mlp        GELU's input, s F/t
        mlp.proj     GELU's output, s F/t

    times b and ``value_bytes``, where T is s/t in the sequence-parallel regions and s otherwise.
    With ``dropout`` (1-byte masks) attn also keeps the attention dropout's mask and output,
    (a/t) s^2 (1 + value_bytes), and attn and mlp each the mask of the dropout after their
    row-parallel matrix, T h. Selective recomputation drops every (a/t) s^2 term; full
    recomputation keeps only the block's input, T h (the table's 2sbh; under sequence
    parallelism the input arrives as this rank's s/t tokens, and that is what it keeps).

    ``attention="blockwise"`` (``minipar.nn.blockwise``, the flash-attention idea of Dao et al.
    2022) keeps the log-sum-exp, (a/t) s values, in place of the (a/t) s^2 softmax, and no
    attention-dropout mask (a blockwise kernel regenerates it from the seed); selective
    recomputation drops the log-sum-exp too.

    The defaults are the paper's table 2 (16-bit values, dropout, no 1/std): with MLP width F,
    sbh (10 + (8 + 4F/h)/t + 5as/(ht)), or sbh (18 + 4F/h + 5as/h)/t under sequence parallelism;
    F = 4h gives its sbh (10 + 24/t + 5as/(ht)) and sbh (34 + 5as/h)/t. minipar's block has no
    dropout and keeps LayerNorm's 1/std (``value_bytes=e, dropout=False, layernorm_rstd=True``):
    e [sbh (4 + (4 + 2F/h)/t + as/(ht)) + 2sb], or e [sbh (8 + 2F/h + as/h) + 2sb] / t; with
    F = 4h, 4 + 12/t and (16 + as/h)/t values per sbh.
    """
    s, h, f, e = model.seq_len, model.d_model, model.ffn, value_bytes
    tokens = s // tp if sequence_parallel else s  # per sequence in the LayerNorm/residual regions
    if recompute == "full":
        return {"input": e * tokens * b * h}
    per_head = s if attention == "blockwise" else s * s  # log-sum-exp, or the softmax
    kept = 0 if recompute == "selective" else e * b * (model.n_heads // tp) * per_head
    scores = 0 if recompute == "selective" or attention == "blockwise" else \
        b * (model.n_heads // tp) * s * s  # the attention-dropout mask and output
    ln = e * b * tokens * (h + (1 if layernorm_rstd else 0))
    mask = b * tokens * h if dropout else 0  # the dropout after a row-parallel matrix
    return {
        "ln1": ln,
        "attn.qkv": e * b * tokens * h,
        "attn": e * 3 * b * s * h // tp + kept + ((1 + e) * scores + mask if dropout else 0),
        "attn.proj": e * b * s * h // tp,
        "ln2": ln,
        "mlp.fc": e * b * tokens * h,
        "mlp": e * b * s * f // tp + mask,
        "mlp.proj": e * b * s * f // tp,
    }


def activation_bytes_per_layer(model: ModelConfig, b: int, tp: int = 1,
                               sequence_parallel: bool = False, recompute: str = "none", *,
                               value_bytes: int = 2, dropout: bool = True,
                               layernorm_rstd: bool = False, attention: str = "plain") -> int:
    """Activation bytes one block keeps per microbatch: the sum of ``block_activation_terms``
    (by default Korthikanti et al. 2022, table 2)."""
    return sum(block_activation_terms(model, b, tp, sequence_parallel, recompute,
                                      value_bytes=value_bytes, dropout=dropout,
                                      layernorm_rstd=layernorm_rstd,
                                      attention=attention).values())


def peak_live(schedule: str, p: int, m: int, v: int, stage: int) -> int:
    """Peak (microbatch, chunk) activations live on a stage, without building the program.

    GPipe: all m. 1F1B: min(m, p - stage). Interleaved: Megatron's warm-up 2(p-s-1) + (v-1)p
    forwards plus one (all m v when m == p); stage 0 keeps v p + p - 1, Korthikanti's factor
    1 + (p-1)/(p v) of L layers. ZB-H1: at most p (Qi et al. 2023). Tests check these against
    ``program_checks.live_counts`` of the real programs.
    """
    if schedule == "gpipe":
        return m
    if schedule == "interleaved":
        total = m * v
        return total if m == p else min(total, 2 * (p - stage - 1) + (v - 1) * p + 1)
    if schedule == "zb-h1":
        return min(m, p)
    return min(m, p - stage)


def memory_per_stage(model: ModelConfig, parallel: ParallelConfig, work: Workload,
                     stage: int) -> dict:
    """Bytes one GPU of pipeline stage ``stage`` holds at its peak, by kind, and ``total``."""
    chunks = units(model, parallel, stage)
    n_local = sum(u.params for c in chunks for u in c)
    out = zero_model_state_bytes(n_local, parallel.dp, parallel.zero, work.dtype)
    e = dtype_bytes(work.dtype)
    b, t, sp = work.microbatch_size, parallel.tp, parallel.sequence_parallel
    m = work.microbatches(parallel.dp)
    # Uneven chunks (--partition): the largest local chunk's blocks, an upper bound for v > 1.
    per_chunk_layers = max(sum(u.kind == "block" for u in c) for c in chunks)
    per_layer = activation_bytes_per_layer(model, b, t, sp, work.recompute) * e / 2
    live = peak_live(parallel.schedule, parallel.pp, m, parallel.virtual_stages, stage)
    acts = live * per_chunk_layers * per_layer
    if work.recompute == "full":  # backward rematerialises one whole block at a time
        acts += activation_bytes_per_layer(model, b, t, sp, "none") * e / 2
    if any(u.kind == "head" for c in chunks for u in c):  # fp32 logits (Korthikanti 4.3)
        acts += 4 * model.seq_len * b * padded_vocab(model.vocab_size, t) / t
    out["activations"] = acts
    if parallel.zero >= 3:  # the gathered unit in use, the prefetched next, and its gradient
        biggest = max(u.params for c in chunks for u in c)
        out["zero3_buffers"] = 3.0 * e * biggest * (1 - 1 / parallel.dp)
    out["total"] = sum(out.values())
    return out


def memory_per_gpu(model: ModelConfig, parallel: ParallelConfig, work: Workload) -> dict:
    """The worst stage's ``memory_per_stage``, with ``stage`` telling which one it is."""
    best = None
    for s in range(parallel.pp):
        mem = memory_per_stage(model, parallel, work, s)
        if best is None or mem["total"] > best["total"]:
            best = {**mem, "stage": s}
    return best


__all__ = ["DTYPE_BYTES", "RECOMPUTE", "Workload", "Unit", "canonical_dtype", "dtype_bytes",
           "optimizer_bytes_per_param", "check_layout", "ptdp_param_count", "block_param_count",
           "units", "local_param_count", "param_count", "layer_forward_flops",
           "logit_forward_flops", "model_flops", "hardware_flops", "ptdp_flops_eq3",
           "korthikanti_flops", "training_days", "zero_model_state_bytes",
           "block_activation_terms", "activation_bytes_per_layer", "peak_live",
           "memory_per_stage", "memory_per_gpu"]
