"""Activation memory: the bytes a layer keeps for its backward pass, measured and predicted.

Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models",
table 2) count what one Transformer layer stores per microbatch, with s tokens, b sequences,
h width, a heads and t tensor-parallel ranks, in 16-bit with 1-byte dropout masks:

    tensor parallel:                 sbh (10 + 24/t + 5as/(ht))   bytes
    tensor + sequence parallel:      sbh (34/t + 5as/(ht))        bytes

The 10 are stored on every tp rank (the two LayerNorm inputs, the inputs of the QKV and first
MLP matrices, two dropout masks); sequence parallelism shards them along the sequence too, so a
layer under TP+SP keeps exactly the serial layer's bytes divided by t.

minipar has no dropout and keeps these caches per layer (e bytes per value, F the MLP width;
``T`` is s/t for sequence-sharded tensors under SP and s otherwise):

    ln1, ln2        normalised input  bTh,  and 1/std  bT       (each)
    attn.qkv        its input as given: bTh (the allgathered copy is rebuilt in backward)
    attn            the fused [Q|K|V] output 3bsh/t and the softmax a s^2 b / t
    attn.proj       the merged heads, bsh/t
    mlp.fc          its input as given: bTh
    mlp             the GELU input bsF/t (tanh is recomputed in backward)
    mlp.proj        the GELU output bsF/t

so e [sbh (4 + (4 + 2F/h)/t + as/(ht)) + 2sb] without SP and e [sbh (8 + 2F/h + as/h) + 2sb]/t
with it. With F = 4h that is the paper's count without dropout (4 + 12/t + as/(ht) values per
sbh instead of 10 + 24/t + 5as/(ht) bytes) plus the two LayerNorms' 1/std (2sb values, a
fraction 1/h of the rest). Tests check the measured bytes equal these terms, tensor by tensor.
"""

from __future__ import annotations

from minipar.config import ModelConfig
from minipar.nn.module import Module, Param, arrays_in, held, owner, unique_bytes


def _walk(module: Module, path: str = ""):
    yield path, module
    for name, value in vars(module).items():
        items = value if isinstance(value, (list, tuple)) else [value]
        for i, v in enumerate(items):
            if isinstance(v, Module):
                sub = name if v is value else f"{name}.{i}"
                yield from _walk(v, f"{path}.{sub}" if path else sub)


def activation_breakdown(module: Module) -> dict[str, int]:
    """Bytes held for backward, by sub-module path ("" is ``module`` itself), in walk order.

    Every buffer is counted once, at the first module that holds it, by the array that owns
    its memory (the Q, K and V head views are one [Q|K|V] buffer). Parameter storage is not
    activation memory and is left out (a linear's kernel cache names its weight). Both module
    caches and deferred weight-gradient inputs (zero-bubble W passes) count.
    """
    walked = list(_walk(module))
    params = {id(owner(v.data)) for _, m in walked for v in vars(m).values()
              if isinstance(v, Param)}
    seen: set[int] = set()
    out: dict[str, int] = {}
    for path, m in walked:
        total = unique_bytes(arrays_in(held(m)), exclude=params, seen=seen)
        if total:
            out[path] = total
    return out


def activation_bytes(module: Module) -> int:
    """Unique bytes ``module`` and its children keep for backward (see ``activation_breakdown``)."""
    return sum(activation_breakdown(module).values())


def block_activation_terms(cfg: ModelConfig, rows: int, tp: int, sequence_parallel: bool,
                           dtype_bytes: int) -> dict[str, int]:
    """The exact bytes one ``Block`` keeps per microbatch of ``rows`` sequences, on one tp rank,
    by sub-module path (the keys of ``activation_breakdown``)."""
    s, h, f, a, b = cfg.seq_len, cfg.d_model, cfg.ffn, cfg.n_heads, rows
    t_ln = s // tp if sequence_parallel else s  # tokens of the LayerNorm/residual region
    ln = b * t_ln * h + b * t_ln  # normalised input and 1/std
    terms = {
        "ln1": ln,
        "attn.qkv": b * t_ln * h,
        "attn": 3 * b * s * h // tp + b * (a // tp) * s * s,
        "attn.proj": b * s * h // tp,
        "ln2": ln,
        "mlp.fc": b * t_ln * h,
        "mlp": b * s * f // tp,
        "mlp.proj": b * s * f // tp,
    }
    return {k: v * dtype_bytes for k, v in terms.items()}


def block_activation_bytes(cfg: ModelConfig, rows: int, tp: int, sequence_parallel: bool,
                           dtype_bytes: int) -> int:
    """Total of ``block_activation_terms``: e [sbh (4 + (4 + 2F/h)/t + as/(ht)) + 2sb] without
    sequence parallelism, e [sbh (8 + 2F/h + as/h) + 2sb] / t with it (F = 4h: 4 + 12/t and
    16 + as/h)."""
    return sum(block_activation_terms(cfg, rows, tp, sequence_parallel, dtype_bytes).values())


def korthikanti_bytes_per_layer(cfg: ModelConfig, rows: int, tp: int, sequence_parallel: bool,
                                dropout: bool = True) -> float:
    """The paper's count (table 2): 16-bit values, 1-byte dropout masks, MLP width 4h.

    With ``dropout=False`` the masks and the dropout output are removed: sbh (8 + 24/t +
    2as/(ht)), or sbh (32 + 2as/h)/t with sequence parallelism, which at 2 bytes per value is
    minipar's count without the LayerNorms' 1/std.
    """
    s, h, a, t = cfg.seq_len, cfg.d_model, cfg.n_heads, tp
    replicated, split, attn = (10.0, 24.0, 5.0) if dropout else (8.0, 24.0, 2.0)
    per = (replicated + split) / t if sequence_parallel else replicated + split / t
    return s * rows * h * (per + attn * a * s / (h * t))


def measure_block_activations(cfg: ModelConfig, tp: int, sequence_parallel: bool, rows: int,
                              dtype: str = "float64", seed: int = 0) -> list[dict[str, int]]:
    """Build one ``Block`` on an in-process tp world, run its forward on random input, and
    return every rank's ``activation_breakdown`` (rank order). Under sequence parallelism each
    rank is given its T/tp tokens, as the previous layer's reduce-scatter would leave them."""
    import numpy

    from minipar import backend
    from minipar.dist.comm import run_threads
    from minipar.models.blocks import Block
    from minipar.nn.module import BuildContext

    full = numpy.random.default_rng(seed).normal(size=(rows, cfg.seq_len, cfg.d_model))

    def rank(tp_comm):
        block = Block(BuildContext(seed, dtype, tp_comm, sequence_parallel), "blocks.0", cfg)
        t = cfg.seq_len // tp if sequence_parallel else cfg.seq_len
        lo = tp_comm.rank * t if sequence_parallel else 0
        x = backend.from_host(numpy.ascontiguousarray(full[:, lo:lo + t].astype(dtype)))
        block.forward(x, mb=0)
        return activation_breakdown(block)

    return run_threads(rank, tp)


__all__ = ["activation_breakdown", "activation_bytes", "block_activation_terms",
           "block_activation_bytes", "korthikanti_bytes_per_layer", "measure_block_activations"]
