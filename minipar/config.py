"""Configuration as data: frozen dataclasses, validated once, up front, on every rank.

A bad configuration is a ``ConfigError`` whose message names the command-line flag, raised before
the first collective so that every rank fails the same way and nothing hangs. ``check_output``
does the same for a path a command will write when it ends (both commands use it).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace


class ConfigError(ValueError):
    """A user-facing configuration error: one line that names the offending flag."""


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a decoder-only GPT (Radford et al. 2019) as built by ``minipar.models.gpt``."""

    vocab_size: int = 16  # tokens in the vocabulary (V)
    seq_len: int = 32  # context length (T): the longest sequence the model sees
    n_layers: int = 2  # Transformer blocks (L)
    d_model: int = 64  # hidden width (C)
    n_heads: int = 4  # attention heads (H); d_head = C / H
    d_ff: int = 0  # MLP inner width; 0 means the usual 4 x d_model
    tie_weights: bool = False  # share the embedding matrix with the LM head
    pos: str = "learned"  # positional encoding: "learned" or "sinusoidal"
    dropout: float = 0.0  # P of attention, residual, embedding dropout (training); 0 = off
    arch: str = "gpt"  # "gpt" (decoder only) or "encdec" (Vaswani et al. 2017, minipar.models)
    src_len: int = 0  # encdec: the source length (S) the encoder reads; seq_len is the target's
    norm: str = "pre"  # encdec: LayerNorm before each sublayer ("pre") or after ("post", the paper)
    pos_bias: bool = False  # encdec: the encoder's attention learns a (head, query, key) bias
    weight_init: str = "gpt2"  # "gpt2" (0.02) or "fan-in" (models.blocks); the train command
    # picks fan-in for --arch encdec

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn(self) -> int:
        return self.d_ff or 4 * self.d_model

    def validate(self) -> None:
        for flag, value in (("--vocab", self.vocab_size), ("--seq-len", self.seq_len),
                            ("--layers", self.n_layers), ("--d-model", self.d_model),
                            ("--heads", self.n_heads)):
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{flag} must be a positive integer, got {value!r}")
        if self.d_ff < 0:
            raise ConfigError(f"--d-ff must be positive (or 0 for 4 x d_model), got {self.d_ff}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"--heads {self.n_heads} must divide --d-model {self.d_model}")
        if self.pos not in ("learned", "sinusoidal"):
            raise ConfigError(f"--pos must be 'learned' or 'sinusoidal', got {self.pos!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ConfigError(f"--dropout must be a probability in [0, 1), got {self.dropout!r}")
        if self.arch not in ("gpt", "encdec"):
            raise ConfigError(f"--arch must be 'gpt' or 'encdec', got {self.arch!r}")
        if self.arch == "encdec" and (not isinstance(self.src_len, int) or self.src_len <= 0):
            raise ConfigError(f"--arch encdec needs a source length > 0, got {self.src_len!r}")
        if self.norm not in ("pre", "post") or (self.norm == "post" and self.arch != "encdec"):
            raise ConfigError(f"--norm must be 'pre' or 'post' (post: --arch encdec only), "
                              f"got {self.norm!r}")
        if self.weight_init not in ("gpt2", "fan-in"):
            raise ConfigError(f"--weight-init must be 'gpt2' or 'fan-in', got "
                              f"{self.weight_init!r}")
        if self.pos_bias and self.arch != "encdec":
            raise ConfigError("--pos-bias applies to --arch encdec (the encoder's attention)")
        if self.arch == "encdec" and self.dropout > 0:
            raise ConfigError("--dropout with --arch encdec is not supported yet: the "
                              "encoder-decoder's layers draw no masks")


# The flag that sets each ModelConfig field, for lines that say how two models differ (a field
# no flag sets, such as the source length a task picks, is named in words).
MODEL_FLAGS = {"vocab_size": "--vocab", "seq_len": "--seq-len", "n_layers": "--layers",
               "d_model": "--d-model", "n_heads": "--heads", "d_ff": "d_ff",
               "tie_weights": "--tie-weights", "pos": "--pos", "dropout": "--dropout",
               "arch": "--arch", "src_len": "source length", "norm": "--norm",
               "pos_bias": "--pos-bias", "weight_init": "--weight-init"}


def model_flag(field: str, value) -> str:
    """"--vocab 256", "--tie-weights", "no --pos-bias": a field's value as a user writes it."""
    flag = MODEL_FLAGS.get(field, field)
    if isinstance(value, bool):
        return flag if value else f"no {flag}"
    return f"{flag} {value}"


# Named model shapes. The vocabulary and sequence length of a preset are overridden by the task
# (the sort task has 11 symbols), except where a preset is used for benchmarks.
MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=16, seq_len=16, n_layers=2, d_model=32, n_heads=4),
    "default": ModelConfig(vocab_size=16, seq_len=32, n_layers=2, d_model=64, n_heads=4),
    "small": ModelConfig(vocab_size=4096, seq_len=256, n_layers=6, d_model=384, n_heads=6),
}


SCHEDULE_NAMES = ("gpipe", "1f1b", "interleaved", "zb-h1")
ATTENTION_KERNELS = ("plain", "blockwise")  # minipar.nn.functional | minipar.nn.blockwise
RECOMPUTE_MODES = ("none", "selective", "full")  # Korthikanti et al. 2022; the simulator's too
CP_SPLITS = ("zigzag", "contiguous")  # how --cp cuts a sequence (minipar.parallel.context)


@dataclass(frozen=True)
class ParallelConfig:
    """How the world of ranks is cut: a dp x pp x tp grid and the options of each axis."""

    dp: int = 1  # data parallel replicas (each takes 1/dp of the global batch)
    tp: int = 1  # tensor parallel ranks (Megatron-LM, Shoeybi et al. 2019)
    pp: int = 1  # pipeline stages (GPipe / PipeDream / PTD-P)
    zero: int = 0  # ZeRO stage 0-3 over the dp group (Rajbhandari et al. 2019)
    sequence_parallel: bool = False  # shard LayerNorm/residual regions over tp along T
    schedule: str = "1f1b"  # pipeline schedule, one of SCHEDULE_NAMES
    microbatches: int = 1  # microbatches per step per dp rank (gradient accumulation)
    virtual_stages: int = 1  # model chunks per pipeline rank (interleaved schedule)
    bucket_mb: float = 0.0  # gradient bucket size for overlapped dp sync; 0 = sync after backward
    partition: tuple[int, ...] = ()  # blocks per global chunk (--partition); () = equal split
    attention: str = "plain"  # attention kernel, one of ATTENTION_KERNELS (the numbers agree)
    recompute: str = "none"  # activation recomputation in backward, one of RECOMPUTE_MODES
    cp: int = 1  # context parallel ranks: each holds 1/cp of every sequence (ring attention)
    cp_split: str = "zigzag"  # sequence cut over cp, one of CP_SPLITS (zigzag balances causal)

    @property
    def world(self) -> int:
        return self.dp * self.tp * self.pp * self.cp

    def validate(self, model: ModelConfig | None = None, world_size: int | None = None,
                 batch_size: int | None = None) -> None:
        for flag, value in (("--dp", self.dp), ("--tp", self.tp), ("--pp", self.pp),
                            ("--microbatches", self.microbatches),
                            ("--virtual-stages", self.virtual_stages), ("--cp", self.cp)):
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{flag} must be a positive integer, got {value!r}")
        if self.zero not in (0, 1, 2, 3):
            raise ConfigError(f"--zero must be 0, 1, 2 or 3, got {self.zero!r}")
        if self.bucket_mb < 0:
            raise ConfigError(f"--bucket-mb must be >= 0, got {self.bucket_mb}")
        if self.schedule not in SCHEDULE_NAMES:
            raise ConfigError(
                f"--schedule must be one of {', '.join(SCHEDULE_NAMES)}, got {self.schedule!r}")
        if self.attention not in ATTENTION_KERNELS:
            raise ConfigError(f"--attention must be one of {', '.join(ATTENTION_KERNELS)}, "
                              f"got {self.attention!r}")
        if self.recompute not in RECOMPUTE_MODES:
            raise ConfigError(f"--recompute must be one of {', '.join(RECOMPUTE_MODES)}, "
                              f"got {self.recompute!r}")
        if self.cp_split not in CP_SPLITS:
            raise ConfigError(f"--cp-split must be one of {', '.join(CP_SPLITS)}, "
                              f"got {self.cp_split!r}")
        if self.schedule == "zb-h1" and (self.zero == 3 or self.bucket_mb > 0):
            raise ConfigError(
                "--schedule zb-h1 defers weight gradients past each unit's backward, so it "
                "cannot be combined with --zero 3 or --bucket-mb > 0 (both sync a unit's "
                "gradients as soon as its backward ends)")
        if self.zero == 3 and self.bucket_mb > 0:
            raise ConfigError("--bucket-mb applies to --zero 0, 1, 2: --zero 3 already "
                              "reduce-scatters each unit's gradients as its backward ends")
        if self.virtual_stages > 1 and self.schedule != "interleaved":
            raise ConfigError("--virtual-stages > 1 needs --schedule interleaved")
        if self.schedule == "interleaved" and self.pp > 1 and self.microbatches % self.pp:
            raise ConfigError(
                f"--schedule interleaved needs --microbatches ({self.microbatches}) to be a "
                f"multiple of --pp ({self.pp})")
        if world_size is not None and self.world != world_size:
            cp = f" x --cp {self.cp}" if self.cp > 1 else ""
            raise ConfigError(
                f"--dp {self.dp}{cp} x --pp {self.pp} x --tp {self.tp} = {self.world} does not "
                f"equal the number of ranks ({world_size})")
        if model is not None:
            self._validate_against_model(model)
        if batch_size is not None:
            per_rank = batch_size // self.dp
            if batch_size % self.dp:
                raise ConfigError(
                    f"--batch-size {batch_size} must be divisible by --dp {self.dp}")
            if per_rank % self.microbatches:
                raise ConfigError(
                    f"--batch-size / --dp = {per_rank} must be divisible by --microbatches "
                    f"{self.microbatches}")

    def _validate_against_model(self, model: ModelConfig) -> None:
        if model.n_heads % self.tp:
            raise ConfigError(f"--tp {self.tp} must divide the number of heads ({model.n_heads})")
        if model.ffn % self.tp:
            raise ConfigError(f"--tp {self.tp} must divide the MLP width ({model.ffn})")
        if self.sequence_parallel and model.seq_len % self.tp:
            raise ConfigError(
                f"--sequence-parallel needs --tp {self.tp} to divide the sequence length "
                f"({model.seq_len})")
        self._validate_cp(model)
        if model.arch == "encdec" and (self.attention, self.recompute) != ("plain", "none"):
            raise ConfigError("--attention blockwise and --recompute are not supported with "
                              "--arch encdec yet: its encoder and cross-attention layers keep "
                              "the plain kernel and every activation")
        if self.sequence_parallel and model.arch == "encdec" and model.src_len % self.tp:
            raise ConfigError(f"--sequence-parallel needs --tp {self.tp} to divide the source "
                              f"length ({model.src_len})")
        chunks = self.pp * self.virtual_stages
        if model.arch == "encdec":  # encoder then decoder layers: 2 x --layers units
            check_encdec_split(self.partition, model.n_layers, chunks)
        elif self.partition:
            check_partition(self.partition, model.n_layers, self.pp, self.virtual_stages)
        elif model.n_layers % chunks:
            raise ConfigError(
                f"--layers {model.n_layers} must be divisible by --pp x --virtual-stages = "
                f"{self.pp} x {self.virtual_stages} = {chunks}, or split them with "
                "--partition balanced or N,N,...")
        if model.tie_weights and self.pp * self.virtual_stages > 1:
            raise ConfigError(
                "--tie-weights with --pp > 1 or --virtual-stages > 1 is not supported: the "
                "embedding and the head live in different model chunks")

    def _validate_cp(self, model: ModelConfig) -> None:
        """Context parallelism cuts T into 2 cp (zigzag) or cp (contiguous) equal chunks, and
        sequence parallelism then cuts a rank's T/cp tokens over tp."""
        parts = 2 * self.cp if self.cp_split == "zigzag" else self.cp
        if self.cp > 1 and model.arch == "encdec":
            raise ConfigError("--cp > 1 with --arch encdec is not supported: context "
                              "parallelism splits a decoder-only sequence; use --cp 1")
        if self.cp > 1 and model.seq_len % parts:
            raise ConfigError(
                f"--cp {self.cp} with --cp-split {self.cp_split} needs --seq-len "
                f"({model.seq_len}) divisible by {parts}")
        if self.cp > 1 and self.sequence_parallel and (model.seq_len // self.cp) % self.tp:
            raise ConfigError(
                f"--cp {self.cp} with --sequence-parallel needs --tp {self.tp} to divide the "
                f"{model.seq_len // self.cp} tokens of a cp rank")


def check_partition(blocks: tuple[int, ...], n_layers: int, pp: int, virtual: int) -> None:
    """An explicit ``--partition N,N,...``: one count per virtual stage (pp x virtual of them,
    in global chunk order), each at least one block (every chunk then holds parameters, and a
    stage never just forwards its input), summing to the model's layers."""
    n_chunks = pp * virtual
    shown = ",".join(str(b) for b in blocks)
    if len(blocks) != n_chunks:
        raise ConfigError(f"--partition {shown}: needs one block count per virtual stage, "
                          f"--pp x --virtual-stages = {pp} x {virtual} = {n_chunks}, "
                          f"got {len(blocks)}")
    if min(blocks) < 1:
        raise ConfigError(f"--partition {shown}: every virtual stage needs at least 1 block")
    if sum(blocks) != n_layers:
        raise ConfigError(f"--partition {shown}: the counts sum to {sum(blocks)}, the model "
                          f"has --layers {n_layers}")


def check_encdec_split(blocks: tuple[int, ...], n_layers: int, n_chunks: int) -> None:
    """The encoder-decoder's pipeline split (``minipar.models.encdec_pipeline.encdec_blocks``):
    2 x --layers layers (encoder then decoder), equal shares or ``--partition N,N,...``."""
    units = 2 * n_layers
    if blocks and (len(blocks) != n_chunks or min(blocks) < 1 or sum(blocks) != units):
        raise ConfigError(f"--partition {','.join(map(str, blocks))}: --arch encdec needs "
                          f"{n_chunks} counts >= 1 (one per virtual stage) summing to {units} "
                          "(the encoder's and the decoder's layers)")
    if not blocks and units % n_chunks:
        raise ConfigError(f"--arch encdec has 2 x --layers = {units} layers (encoder and "
                          f"decoder), which --pp x --virtual-stages = {n_chunks} must divide")


def chunk_blocks(n_layers: int, n_chunks: int, partition: tuple[int, ...] = ()) -> list[int]:
    """Blocks in each global chunk: ``partition`` when given, else the equal split (the one
    rule ``minipar.models.gpt.chunk_specs``, the cost model and the simulator share)."""
    if partition:
        return list(partition)
    return [n_layers // n_chunks] * n_chunks


# ---------------------------------------------------------------------------------- output paths
def _probe_writable(flag: str, path: str, directory: str) -> None:
    """Create and delete a file in ``directory``: the only test that also catches read-only
    mounts, /proc and the like, whoever runs (root passes every permission check)."""
    try:
        with tempfile.TemporaryFile(dir=directory, prefix=".minipar-probe-"):
            pass
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot write in {directory} "
                          f"({exc.strerror or exc})") from None


def check_output(flag: str, path: str, kind: str, example: str = "run.json") -> None:
    """``path`` can be written as a ``kind`` ("file" or "directory") when a run ends: the parent
    exists and is writable, and a file is not a directory or the other way round. Checked up
    front, because a run that fails only when it writes its results has lost all its work."""
    path = os.path.expanduser(path)
    if not path.strip():
        raise ConfigError(f"{flag} needs a non-empty path")
    if os.path.isdir(path):
        if kind == "file":
            raise ConfigError(f"{flag} {path}: is a directory; give a file name, such as "
                              f"{os.path.join(path, example)}")
        _probe_writable(flag, path, path)
        return
    if os.path.exists(path) or os.path.islink(path):
        if kind == "directory":
            raise ConfigError(f"{flag} {path}: is a file, not a directory")
        if not os.path.isfile(path):
            raise ConfigError(f"{flag} {path}: exists and is not a regular file")
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{flag} {path}: the file is not writable")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        what = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise ConfigError(f"{flag} {path}: the directory {parent} {what}")
    _probe_writable(flag, path, parent)


__all__ = ["ConfigError", "ModelConfig", "ParallelConfig", "MODEL_PRESETS", "SCHEDULE_NAMES",
           "ATTENTION_KERNELS", "RECOMPUTE_MODES", "CP_SPLITS", "check_output", "check_partition",
           "chunk_blocks", "replace"]
