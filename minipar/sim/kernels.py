"""The kernels of one training step and their roofline times (Williams et al. 2009).

A kernel takes max(FLOPs / achievable FLOP/s, bytes moved / achievable memory bandwidth) plus a
launch latency: large matrix multiplies are limited by arithmetic, LayerNorm, softmax, GELU,
dropout and residual additions by memory traffic. The kernel list of a block follows
Megatron-LM's fused implementation (Narayanan et al. 2021, section 4.2: fused bias + GELU,
bias + dropout + add, scale + mask + softmax); each tensor touched is read or written once.

Backward: every weight GEMM becomes two GEMMs of the same size (input gradient and weight
gradient, the zero-bubble B and W of Qi et al. 2023), every activation-by-activation GEMM two as
well (both input gradients), and every memory-bound kernel moves 1.5x its forward bytes (it
reads the saved input and the incoming gradient and writes one gradient).

Each memory-bound kernel names its family (layernorm, softmax, gelu, residual, dropout,
embedding, cross_entropy). A device whose measured elementwise rates differ by family (NumPy on
a CPU: unfused passes, transcendental functions) prices each family at its own achieved rate,
with bytes still counted as a fused kernel moves them; without one, every family streams at the
memory bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

from minipar.config import ModelConfig
from minipar.parallel.tensor import padded_vocab
from minipar.sim.hardware import Hardware


@dataclass(frozen=True)
class Kernel:
    """One kernel on one GPU: FLOPs, bytes moved, and its class (gemm_w, gemm, elem)."""

    name: str
    flops: float
    nbytes: float
    cls: str  # gemm_w: activation x weight; gemm: activation x activation; elem: memory bound
    attention_core: bool = False  # recomputed by selective recomputation
    family: str = ""  # elementwise family, for devices with per-family measured rates


def _gemm_w(name: str, rows: float, k: float, n: float, e: int) -> Kernel:
    return Kernel(name, 2 * rows * k * n, e * (rows * k + k * n + rows * n), "gemm_w")


def block_forward(model: ModelConfig, b: int, tp: int, sp: bool, e: int,
                  dropout: bool) -> list[Kernel]:
    """One Transformer block's forward on one tp rank for a microbatch of b sequences."""
    s, h, f, a = model.seq_len, model.d_model, model.ffn, model.n_heads
    n = b * s  # tokens in the matrix multiplies (all of them, after the SP allgather)
    n_ln = n / tp if sp else n  # tokens in the LayerNorm / dropout / residual regions
    scores = (a / tp) * b * s * s  # attention score elements on this rank
    mask = 1 if dropout else 0
    out = [
        Kernel("ln1", 0, 2 * e * n_ln * h, "elem", family="layernorm"),
        _gemm_w("qkv", n, h, 3 * h / tp, e),
        Kernel("scores", 2 * b * s * s * h / tp, e * (2 * n * h / tp + scores), "gemm", True),
        Kernel("softmax", 0, 2 * e * scores, "elem", True, "softmax"),
    ]
    if dropout:
        out.append(Kernel("attn_dropout", 0, (2 * e + 1) * scores, "elem", True, "dropout"))
    out += [
        Kernel("context", 2 * b * s * s * h / tp, e * (scores + 2 * n * h / tp), "gemm", True),
        _gemm_w("proj", n, h / tp, h, e),
        Kernel("bias_dropout_add1", 0, (3 * e + mask) * n_ln * h, "elem", family="residual"),
        Kernel("ln2", 0, 2 * e * n_ln * h, "elem", family="layernorm"),
        _gemm_w("fc1", n, h, f / tp, e),
        Kernel("bias_gelu", 0, 2 * e * n * f / tp, "elem", family="gelu"),
        _gemm_w("fc2", n, f / tp, h, e),
        Kernel("bias_dropout_add2", 0, (3 * e + mask) * n_ln * h, "elem", family="residual"),
    ]
    return out


def embed_forward(model: ModelConfig, b: int, tp: int, sp: bool, e: int,
                  dropout: bool) -> list[Kernel]:
    """Token lookup on this rank's vocabulary slice, position add, embedding dropout."""
    n, h = b * model.seq_len, model.d_model
    n_ln = n / tp if sp else n
    out = [Kernel("embed_lookup", 0, 2 * e * n * h, "elem", family="embedding"),
           Kernel("add_positions", 0, 3 * e * n_ln * h, "elem", family="residual")]
    if dropout:
        out.append(Kernel("embed_dropout", 0, (2 * e + 1) * n_ln * h, "elem", family="dropout"))
    return out


def head_forward(model: ModelConfig, b: int, tp: int, sp: bool, e: int) -> list[Kernel]:
    """Final LayerNorm, logits on this rank's vocabulary slice, fp32 vocab-parallel loss."""
    n, h = b * model.seq_len, model.d_model
    v_local = padded_vocab(model.vocab_size, tp) / tp
    n_ln = n / tp if sp else n
    return [Kernel("ln_f", 0, 2 * e * n_ln * h, "elem", family="layernorm"),
            _gemm_w("logits", n, h, v_local, e),
            # upcast, max, exp, sum over (n, V/t) in fp32: about four passes
            Kernel("cross_entropy", 0, (e + 16) * n * v_local, "elem",
                   family="cross_entropy")]


def backward_of(kernels: list[Kernel]) -> tuple[list[Kernel], list[Kernel]]:
    """(input-gradient kernels, weight-gradient kernels) of a forward kernel list."""
    bi: list[Kernel] = []
    bw: list[Kernel] = []
    for k in reversed(kernels):
        if k.cls == "gemm_w":
            bi.append(Kernel(k.name + "_dgrad", k.flops, k.nbytes, "gemm_w"))
            bw.append(Kernel(k.name + "_wgrad", k.flops, k.nbytes, "gemm_w"))
        elif k.cls == "gemm":
            bi += [Kernel(k.name + "_bwd", k.flops, k.nbytes, "gemm")] * 2
        else:
            bi.append(Kernel(k.name + "_bwd", 0, 1.5 * k.nbytes, "elem", family=k.family))
    return bi, bw


def kernel_time(k: Kernel, hw: Hardware, dtype: str) -> float:
    """Roofline time of one kernel plus its launch latency."""
    if k.cls == "gemm" and hw.bmm_flops:  # measured batched products (small, strided)
        compute = k.flops / hw.bmm_flops
    else:
        compute = k.flops / (hw.flops(dtype) * hw.gemm_efficiency)
    memory = k.nbytes / (hw.elem_bw.get(k.family) or hw.mem_bw * hw.mem_efficiency)
    return max(compute, memory) + hw.kernel_latency


def total_time(kernels: list[Kernel], hw: Hardware, dtype: str) -> float:
    return sum(kernel_time(k, hw, dtype) for k in kernels)


def optimizer_time(n_params: float, hw: Hardware, e: int) -> float:
    """Adam over n local parameters, memory bound: read and write weights (the fp32 master
    in mixed precision) and both moments, read the gradient, write the 16-bit copy."""
    per_param = 24 + 2 * e if e == 2 else 7 * e
    bw = hw.elem_bw.get("optimizer") or hw.mem_bw * hw.mem_efficiency
    return n_params * per_param / bw + 4 * hw.kernel_latency


__all__ = ["Kernel", "block_forward", "embed_forward", "head_forward", "backward_of",
           "kernel_time", "total_time", "optimizer_time"]
