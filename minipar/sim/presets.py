"""Model sizes and published large-scale runs, as data with their sources.

* The GPT-3 family (Brown et al. 2020, "Language Models are Few-Shot Learners", table 2.1):
  layers, width, heads; vocabulary 50257 and context 2048; embeddings tied to the output layer.
* The weak-scaling runs of PTD-P (Narayanan et al. 2021, "Efficient Large-Scale Language Model
  Training on GPU Clusters Using Megatron-LM", table 1): 1.7B to 1T parameters on 32 to 3072
  A100 GPUs, vocabulary 51200, context 2048, with the measured TFLOP/s per GPU.
* Further published measurements used only to *check* the time model, never to fit it: PTD-P
  table 2 (PTD-P and ZeRO-3 on the 175B and 530B models) and Korthikanti et al. 2022,
  "Reducing Activation Recomputation in Large Transformer Models", table 5 (step times with
  full recomputation, and with sequence parallelism + selective recomputation).

Where a paper does not state a setting the time model needs, the ``assumed`` field says what is
used instead (for PTD-P table 1: microbatch size 1, the plain 1F1B schedule, data parallel sync
after the backward pass), and the same assumption holds for every row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from minipar.config import ModelConfig

GPT3_VOCAB = 50257
MEGATRON_VOCAB = 51200
CONTEXT = 2048


def _gpt(layers: int, width: int, heads: int, vocab: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, seq_len=CONTEXT, n_layers=layers, d_model=width,
                       n_heads=heads, tie_weights=True)


# name -> (model, default global batch in sequences). The paper gives batch sizes in tokens
# (0.5M, 1M, 2M, 3.2M); we use the nearest multiple of 256 sequences of 2048 tokens.
GPT3_FAMILY: dict[str, tuple[ModelConfig, int]] = {
    "gpt3-125m": (_gpt(12, 768, 12, GPT3_VOCAB), 256),
    "gpt3-350m": (_gpt(24, 1024, 16, GPT3_VOCAB), 256),
    "gpt3-760m": (_gpt(24, 1536, 16, GPT3_VOCAB), 256),
    # Table 2.1 prints 24 heads of 128 for d_model 2048, which cannot be; 16 x 128 = 2048.
    "gpt3-1.3b": (_gpt(24, 2048, 16, GPT3_VOCAB), 512),
    "gpt3-2.7b": (_gpt(32, 2560, 32, GPT3_VOCAB), 512),
    "gpt3-6.7b": (_gpt(32, 4096, 32, GPT3_VOCAB), 1024),
    # Table 2.1 prints d_model 5140, which 40 heads of 128 do not make: 40 x 128 = 5120.
    "gpt3-13b": (_gpt(40, 5120, 40, GPT3_VOCAB), 1024),
    "gpt3-175b": (_gpt(96, 12288, 96, GPT3_VOCAB), 1536),
}


@dataclass(frozen=True)
class PublishedRun:
    """A published training run: model, layout, and what was measured."""

    name: str
    model: ModelConfig
    tp: int
    pp: int
    gpus: int
    global_batch: int
    microbatch_size: int = 1
    virtual_stages: int = 1
    recompute: str = "full"
    sequence_parallel: bool = False
    zero: int = 0
    params_b: float = 0.0  # parameter count as printed in the paper, billions
    measured: dict = field(default_factory=dict)  # tflops_per_gpu, step_time_s, mfu ...
    source: str = ""
    assumed: str = ""

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def schedule(self) -> str:
        return "interleaved" if self.virtual_stages > 1 else "1f1b"


_PTDP = "Narayanan et al. 2021 (PTD-P), table 1"
_PTDP_ASSUMED = ("microbatch size 1, plain 1F1B (v=1), full recomputation, scatter/gather "
                 "PP transfers, DP sync after the backward pass (not stated per row)")


def _ptdp(name, params_b, heads, width, layers, tp, pp, gpus, batch, tflops, pct):
    return PublishedRun(
        name=name, model=_gpt(layers, width, heads, MEGATRON_VOCAB), tp=tp, pp=pp, gpus=gpus,
        global_batch=batch, params_b=params_b,
        measured={"tflops_per_gpu": tflops, "percent_of_peak": pct},
        source=_PTDP, assumed=_PTDP_ASSUMED)


# PTD-P table 1: (params B, heads, hidden, layers, t, p, GPUs, batch, TFLOP/s per GPU, % peak)
PTDP_TABLE1: dict[str, PublishedRun] = {r.name: r for r in [
    _ptdp("ptdp-1.7b", 1.7, 24, 2304, 24, 1, 1, 32, 512, 137, 44),
    _ptdp("ptdp-3.6b", 3.6, 32, 3072, 30, 2, 1, 64, 512, 138, 44),
    _ptdp("ptdp-7.5b", 7.5, 32, 4096, 36, 4, 1, 128, 512, 142, 46),
    _ptdp("ptdp-18b", 18.4, 48, 6144, 40, 8, 1, 256, 1024, 135, 43),
    _ptdp("ptdp-39b", 39.1, 64, 8192, 48, 8, 2, 512, 1536, 138, 44),
    _ptdp("ptdp-76b", 76.1, 80, 10240, 60, 8, 4, 1024, 1792, 140, 45),
    _ptdp("ptdp-145b", 145.6, 96, 12288, 80, 8, 8, 1536, 2304, 148, 47),
    _ptdp("ptdp-310b", 310.1, 128, 16384, 96, 8, 16, 1920, 2160, 155, 50),
    _ptdp("ptdp-530b", 529.6, 128, 20480, 105, 8, 35, 2520, 2520, 163, 52),
    _ptdp("ptdp-1t", 1008.0, 160, 25600, 128, 8, 64, 3072, 3072, 163, 52),
]}

_M175 = _gpt(96, 12288, 96, MEGATRON_VOCAB)  # 174.6B with Megatron's vocabulary
_M530 = _gpt(105, 20480, 128, MEGATRON_VOCAB)
_M22 = _gpt(48, 6144, 64, MEGATRON_VOCAB)
_M1T = _gpt(128, 25600, 160, MEGATRON_VOCAB)
_T2 = "Narayanan et al. 2021 (PTD-P), table 2"
_K5 = "Korthikanti et al. 2022, tables 3 and 5"


def _t2(name, model, params_b, tp, pp, gpus, batch, b, tflops, zero=0):
    return PublishedRun(name=name, model=model, tp=tp, pp=pp, gpus=gpus, global_batch=batch,
                        microbatch_size=b, zero=zero, params_b=params_b,
                        measured={"tflops_per_gpu": tflops}, source=_T2,
                        assumed="plain 1F1B, full recomputation; ZeRO-3 rows: no model "
                        "parallelism (batch = GPUs x microbatch), gathers prefetched per layer")


def _k5(name, model, tp, pp, gpus, batch, b, v, step_s, mfu=None, new=True):
    return PublishedRun(name=name, model=model, tp=tp, pp=pp, gpus=gpus, global_batch=batch,
                        microbatch_size=b, virtual_stages=v,
                        recompute="selective" if new else "full", sequence_parallel=new,
                        measured={"step_time_s": step_s, **({"mfu": mfu} if mfu else {})},
                        source=_K5, assumed="v=1 where table 3 gives no interleaving")


# Measurements that are not part of the presets' defining table: used to check, not to fit.
VALIDATION_RUNS: list[PublishedRun] = [
    _t2("t2-ptdp-175b-384", _M175, 174.6, 8, 12, 384, 1536, 1, 153),
    _t2("t2-ptdp-175b-768", _M175, 174.6, 8, 12, 768, 1536, 1, 149),
    _t2("t2-ptdp-175b-1536", _M175, 174.6, 8, 12, 1536, 1536, 1, 141),
    _t2("t2-ptdp-530b-560", _M530, 529.6, 8, 35, 560, 2240, 1, 171),
    _t2("t2-ptdp-530b-1120", _M530, 529.6, 8, 35, 1120, 2240, 1, 167),
    _t2("t2-ptdp-530b-2240", _M530, 529.6, 8, 35, 2240, 2240, 1, 159),
    # "ZeRO-3 without model parallelism": model-parallel size 1 on every row.
    _t2("t2-zero3-175b-384", _M175, 174.6, 1, 1, 384, 1536, 4, 144, zero=3),
    _t2("t2-zero3-175b-768", _M175, 174.6, 1, 1, 768, 1536, 2, 88, zero=3),
    _t2("t2-zero3-175b-1536", _M175, 174.6, 1, 1, 1536, 1536, 1, 44, zero=3),
    _t2("t2-zero3-530b-640", _M530, 529.6, 1, 1, 640, 2560, 4, 138, zero=3),
    _t2("t2-zero3-530b-1120", _M530, 529.6, 1, 1, 1120, 2240, 2, 98, zero=3),
    _t2("t2-zero3-530b-2240", _M530, 529.6, 1, 1, 2240, 2240, 1, 48, zero=3),
    _k5("k5-22b-full", _M22, 8, 1, 8, 4, 4, 1, 1.42, new=False),
    _k5("k5-22b-sp-sel", _M22, 8, 1, 8, 4, 4, 1, 1.10, 0.415),
    _k5("k5-175b-full", _M175, 8, 8, 64, 64, 1, 3, 18.13, new=False),
    _k5("k5-175b-sp-sel", _M175, 8, 8, 64, 64, 1, 3, 13.75, 0.514),
    _k5("k5-530b-full", _M530, 8, 35, 280, 280, 1, 3, 49.05, new=False),
    _k5("k5-530b-sp-sel", _M530, 8, 35, 280, 280, 1, 3, 37.83, 0.560),
    _k5("k5-1t-full", _M1T, 8, 64, 512, 512, 1, 1, 94.42, new=False),
    _k5("k5-1t-sp-sel", _M1T, 8, 64, 512, 512, 1, 1, 71.49, 0.563),
]

# Every model the CLI knows: name -> (model, default global batch).
MODELS: dict[str, tuple[ModelConfig, int]] = {
    **GPT3_FAMILY,
    **{name: (run.model, run.global_batch) for name, run in PTDP_TABLE1.items()},
}

__all__ = ["GPT3_FAMILY", "PTDP_TABLE1", "VALIDATION_RUNS", "MODELS", "PublishedRun",
           "GPT3_VOCAB", "MEGATRON_VOCAB", "CONTEXT"]
