"""Training data: synthetic tasks with an exact answer, and byte-level text files.

Every batch is a pure function of ``(seed, step)``: the same step gives the same rows on any
layout, a resumed run continues with exactly the batches it would have seen (the data position
of a checkpoint is just the step), and each data-parallel rank can take its own rows of the
global batch without talking to the others.

Tasks (``make_task``):

- ``sort`` (the default): ``n`` digits, a separator, then the same digits sorted, e.g.
  ``31415926|11234569``. Only the answer digits are scored. Sorting needs attention: the k-th
  answer digit depends on every input digit and on the answer digits already written.
- ``reverse``: the same layout with the digits reversed (``1234|4321``).
- ``add``: two k-digit numbers (leading zeros, most significant digit first), ``+``, ``=``,
  then the k+1 digits of the sum written LEAST significant digit first, e.g. ``123+989=2111``
  for 123 + 989 = 1112. Written this way each answer digit depends on two operand digits and
  the carry of the digit before it, which the model has just produced; written most
  significant first, the first digit would depend on every carry at once (Lee et al. 2023,
  "Teaching Arithmetic to Small Transformers", found reversed output far easier to learn).
- ``text``: next-byte prediction on any file (``--data FILE``), metric perplexity.

The held-out split of a synthetic task is a hash partition of the problem space: a problem
(its digits, read as one integer) belongs to the evaluation split if and only if
``splitmix64(code) % HOLDOUT_MOD == 0``. Training batches redraw any problem that falls in the
evaluation split, so no evaluation problem is ever trained on, whatever the seed or step. The
evaluation set is a fixed sample of that split (independent of the seed, so that runs with
different seeds are measured on the same problems) and of a fixed size (``eval_size``).

This is host-only bookkeeping: batches are NumPy ``int64`` arrays; the training loop moves
them to the device.
"""

from __future__ import annotations

import codecs
import math
import os
import zlib
from collections.abc import Iterator
from typing import Protocol

import numpy as np

from minipar.config import ConfigError

IGNORE = -100  # target value skipped by the loss (cross-entropy ignore index)

# Token ids of the synthetic tasks: the ten digits are their own ids, then three symbols.
SEP, PLUS, EQ = 10, 11, 12
SYMBOLS = "0123456789|+="
HOLDOUT_MOD = 16  # one problem in 16 belongs to the held-out evaluation split
TASK_NAMES = ("sort", "reverse", "add", "text")

Batch = tuple[np.ndarray, np.ndarray]  # inputs (B, T) int64, targets (B, T) int64


class DataFileError(FileNotFoundError, ConfigError):
    """The ``--data`` file is missing, empty or too short: one line that names the flag."""


class Task(Protocol):
    """What the training loop needs from a data source."""

    name: str
    vocab_size: int  # tokens the model must embed (V)
    seq_len: int  # model input length (T)
    metric: str  # "exact_match" or "perplexity"

    def batch(self, step: int, batch_size: int) -> Batch:
        """The global batch of ``step``: inputs and next-token targets, both (B, T) int64."""
        ...

    def dp_rows(self, step: int, batch_size: int, dp_rank: int, dp_size: int) -> Batch:
        """This data-parallel rank's contiguous rows of the global batch of ``step``."""
        ...

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        """The held-out split, in order, in batches of at most ``batch_size`` rows."""
        ...

    def n_scored(self, targets: np.ndarray) -> int:
        """Tokens the loss counts in ``targets``."""
        ...

    def render(self, tokens: np.ndarray) -> str:
        """A row of tokens as readable text (for lessons and logs)."""
        ...


def exact_match(pred: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of rows whose prediction is right at every scored position.

    ``pred`` holds the model's argmax at each position under teacher forcing (the true prefix as
    input). This equals exact match under greedy decoding: if every answer token is the argmax
    given the true prefix, greedy decoding writes the first answer token correctly, so its prefix
    is the true one again, and by induction it reproduces the whole answer; if some token is
    wrong given the true prefix, greedy decoding reaches that same prefix and errs there too.
    A row with no scored position counts as correct.
    """
    pred, targets = np.asarray(pred), np.asarray(targets)
    if pred.shape != targets.shape or pred.ndim != 2:
        raise ValueError(f"pred {pred.shape} and targets {targets.shape} must be equal (B, T)")
    ok = (pred == targets) | (targets == IGNORE)  # (B, T)
    return float(ok.all(axis=1).mean()) if len(ok) else 0.0


def dp_slice(inputs: np.ndarray, targets: np.ndarray, dp_rank: int, dp_size: int) -> Batch:
    """Rows ``[r * B/dp, (r+1) * B/dp)`` of the global batch: rank order is batch order."""
    lo, hi = _dp_range(len(inputs), dp_rank, dp_size)
    return inputs[lo:hi], targets[lo:hi]


def _dp_range(batch_size: int, dp_rank: int, dp_size: int) -> tuple[int, int]:
    if dp_size <= 0 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} must lie in [0, dp_size={dp_size})")
    if batch_size % dp_size:
        raise ConfigError(
            f"--batch-size {batch_size} must be divisible by the data parallel size {dp_size}")
    rows = batch_size // dp_size
    return dp_rank * rows, (dp_rank + 1) * rows


def _check_positive(flag: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{flag} must be a positive integer, got {value!r}")


def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise ConfigError(f"--seed must be a non-negative integer, got {seed!r}")


def _rng(seed: int, step: int) -> np.random.Generator:
    """The generator of one step: independent streams per (seed, step), no shared state."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return np.random.default_rng([int(seed), int(step)])


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele, Lea & Flood 2014): a well-mixed 64-bit hash per entry."""
    z = np.asarray(x).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)  # wraps mod 2**64
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class DigitTask:
    """Base of the synthetic tasks: a problem is ``problem_digits`` uniform digits.

    A problem is identified by its code, the digits read as one base-10 integer, so the problem
    space is ``[0, 10**problem_digits)``; subclasses say how a problem and its answer are laid
    out as tokens (``_sequences``). Inputs are the sequence without its last token and targets
    the sequence without its first; only the answer tokens are scored.
    """

    name = "digits"
    metric = "exact_match"
    vocab_size = 11

    def __init__(self, seed: int, problem_digits: int, answer_len: int, natural_len: int,
                 seq_len: int | None = None, eval_size: int = 512) -> None:
        _check_seed(seed)
        _check_positive("--eval-size", eval_size)
        if problem_digits > 18:  # the code must fit in an int64
            raise ConfigError(f"--n-digits: at most 18 problem digits, got {problem_digits}")
        if seq_len is not None:
            _check_positive("--seq-len", seq_len)
            if seq_len < natural_len - 1:
                raise ConfigError(f"--seq-len {seq_len} is too short for task {self.name}: "
                                  f"its sequences need {natural_len - 1}")
        self.seed = int(seed)
        self.needed_len = natural_len - 1  # inputs a row needs; longer rows are only padding
        self.problem_digits = problem_digits
        self.answer_len = answer_len
        self.seq_len = natural_len - 1 if seq_len is None else int(seq_len)
        self.eval_size = int(eval_size)
        self._salt = np.uint64(zlib.crc32(self.name.encode()))
        self._eval: Batch | None = None
        if self.n_problems <= 1 << 20:  # a tiny space might put every problem on one side
            held = self.in_eval_split(np.arange(self.n_problems, dtype=np.int64))
            if held.all() or not held.any():
                raise ConfigError(f"--n-digits: task {self.name} has too few problems "
                                  f"({self.n_problems}) for a train and a held-out split")

    # -- the problem space and its held-out split ---------------------------------------------

    @property
    def n_problems(self) -> int:
        return 10 ** self.problem_digits

    def in_eval_split(self, codes: np.ndarray) -> np.ndarray:
        """Whether each problem code belongs to the held-out split (bool, same shape)."""
        h = splitmix64(np.asarray(codes).astype(np.uint64) ^ self._salt)
        return h % np.uint64(HOLDOUT_MOD) == 0

    def _train_codes(self, rng: np.random.Generator, size: int) -> np.ndarray:
        codes = rng.integers(0, self.n_problems, size=size, dtype=np.int64)
        held = self.in_eval_split(codes)
        while held.any():  # redraw held-out problems; each redraw leaves ~1/16 of them
            codes[held] = rng.integers(0, self.n_problems, size=int(held.sum()), dtype=np.int64)
            held = self.in_eval_split(codes)
        return codes

    def _eval_codes(self) -> np.ndarray:
        if self.n_problems <= 1 << 20:  # small space: enumerate the whole split
            codes = np.arange(self.n_problems, dtype=np.int64)
            codes = codes[self.in_eval_split(codes)]
            rng = np.random.default_rng([int(self._salt), 1])
            return rng.permutation(codes)[: self.eval_size]
        rng = np.random.default_rng([int(self._salt), 2])
        found = np.empty(0, dtype=np.int64)
        while len(found) < self.eval_size:
            cand = rng.integers(0, self.n_problems, size=4 * HOLDOUT_MOD * self.eval_size)
            found = np.concatenate([found, cand[self.in_eval_split(cand)]])
            _, first = np.unique(found, return_index=True)  # drop repeats, keep draw order
            found = found[np.sort(first)]
        return found[: self.eval_size]

    # -- batches ------------------------------------------------------------------------------

    def _digits(self, codes: np.ndarray) -> np.ndarray:
        """(B,) codes -> (B, problem_digits) digits, most significant first."""
        powers = 10 ** np.arange(self.problem_digits - 1, -1, -1, dtype=np.int64)
        return codes[:, None] // powers % 10

    def _sequences(self, digits: np.ndarray) -> np.ndarray:
        """(B, problem_digits) -> (B, L) full token sequences ending with the answer."""
        raise NotImplementedError

    def _build(self, codes: np.ndarray) -> Batch:
        seq = self._sequences(self._digits(codes))  # (B, L)
        B, L = seq.shape
        inputs = np.full((B, self.seq_len), SEP, dtype=np.int64)  # right padding never scored
        targets = np.full((B, self.seq_len), IGNORE, dtype=np.int64)
        inputs[:, : L - 1] = seq[:, :-1]
        a = L - 1 - self.answer_len  # first target position holding an answer token
        targets[:, a : L - 1] = seq[:, L - self.answer_len :]
        return inputs, targets

    def batch(self, step: int, batch_size: int) -> Batch:
        _check_positive("--batch-size", batch_size)
        return self._build(self._train_codes(_rng(self.seed, step), batch_size))

    def dp_rows(self, step: int, batch_size: int, dp_rank: int, dp_size: int) -> Batch:
        # Drawing the whole global batch costs microseconds; every rank agrees on it for free.
        return dp_slice(*self.batch(step, batch_size), dp_rank, dp_size)

    def eval_set(self) -> Batch:
        """The whole held-out evaluation set (built once, then cached)."""
        if self._eval is None:
            self._eval = self._build(self._eval_codes())
        return self._eval

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        _check_positive("--batch-size", batch_size)
        inputs, targets = self.eval_set()
        for lo in range(0, len(inputs), batch_size):
            yield inputs[lo : lo + batch_size], targets[lo : lo + batch_size]

    def n_scored(self, targets: np.ndarray) -> int:
        return int((np.asarray(targets) != IGNORE).sum())

    def render(self, tokens: np.ndarray) -> str:
        return "".join(SYMBOLS[int(t)] if 0 <= t < len(SYMBOLS) else "?" for t in tokens)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(seed={self.seed}, seq_len={self.seq_len}, "
                f"vocab_size={self.vocab_size}, eval_size={len(self.eval_set()[0])})")


class SortTask(DigitTask):
    """``n`` digits, ``|``, the digits in ascending order."""

    name = "sort"

    def __init__(self, seed: int, n_digits: int = 8, seq_len: int | None = None,
                 eval_size: int = 512) -> None:
        _check_positive("--n-digits", n_digits)
        self.n_digits = n_digits
        super().__init__(seed, n_digits, n_digits, 2 * n_digits + 1, seq_len, eval_size)

    def _answer(self, digits: np.ndarray) -> np.ndarray:
        return np.sort(digits, axis=1)

    def _sequences(self, digits: np.ndarray) -> np.ndarray:
        sep = np.full((len(digits), 1), SEP, dtype=np.int64)
        return np.concatenate([digits, sep, self._answer(digits)], axis=1)


class ReverseTask(SortTask):
    """``n`` digits, ``|``, the digits in reverse order."""

    name = "reverse"

    def _answer(self, digits: np.ndarray) -> np.ndarray:
        return digits[:, ::-1]


class AddTask(DigitTask):
    """``a+b=`` for two k-digit numbers, then the k+1 digits of a + b, least significant first."""

    name = "add"
    vocab_size = 13

    def __init__(self, seed: int, n_digits: int = 3, seq_len: int | None = None,
                 eval_size: int = 512) -> None:
        _check_positive("--n-digits", n_digits)
        self.n_digits = n_digits
        super().__init__(seed, 2 * n_digits, n_digits + 1, 3 * n_digits + 3, seq_len, eval_size)

    def _sequences(self, digits: np.ndarray) -> np.ndarray:
        k, B = self.n_digits, len(digits)
        powers = 10 ** np.arange(k - 1, -1, -1, dtype=np.int64)
        total = digits[:, :k] @ powers + digits[:, k:] @ powers  # (B,)
        sum_digits = total[:, None] // 10 ** np.arange(k + 1, dtype=np.int64) % 10  # LSD first
        plus = np.full((B, 1), PLUS, dtype=np.int64)
        eq = np.full((B, 1), EQ, dtype=np.int64)
        return np.concatenate([digits[:, :k], plus, digits[:, k:], eq, sum_digits], axis=1)


UTF8_SAMPLE = 1 << 16  # bytes of a --data file checked to be UTF-8 text, at its start and middle


def check_text_file(path: str) -> int:
    """The size of ``path`` if it is a readable, non-empty regular file of UTF-8 text, else
    ``DataFileError`` naming what it is instead (a directory, a device, binary data, ...).

    Only a sample is decoded (the first and the middle 64 KiB), so a file of hundreds of MB is
    checked in microseconds; a NUL byte counts as binary, as no text file holds one.
    """
    if not os.path.exists(path):
        raise DataFileError(f"--data {path}: no such file")
    if os.path.isdir(path):
        raise DataFileError(f"--data {path}: is a directory, not a text file")
    if not os.path.isfile(path):
        raise DataFileError(f"--data {path}: not a regular file (a device or a pipe has no "
                            f"fixed size to sample windows from)")
    size = os.path.getsize(path)
    if size == 0:
        raise DataFileError(f"--data {path}: the file is empty")
    samples = {}
    try:
        with open(path, "rb") as fh:
            for start in sorted({0, max(0, size // 2 - UTF8_SAMPLE // 2)}):
                fh.seek(start)
                samples[start] = fh.read(UTF8_SAMPLE)
    except OSError as exc:
        raise DataFileError(f"--data {path}: cannot read it ({exc.strerror or exc})") from None
    for start, chunk in samples.items():
        _check_utf8(path, chunk, start, at_start=start == 0)
    return size


def _check_utf8(path: str, chunk: bytes, offset: int, at_start: bool) -> None:
    if not at_start:  # a sample from the middle may begin inside a character: skip to one
        skip = next((i for i, b in enumerate(chunk[:4]) if b & 0xC0 != 0x80), 0)
        chunk, offset = chunk[skip:], offset + skip
    nul = chunk.find(b"\0")
    try:
        # final=False: a sample may end in the middle of a multi-byte character
        codecs.getincrementaldecoder("utf-8")().decode(chunk, final=False)
    except UnicodeDecodeError as exc:
        bad = exc.start if nul < 0 else min(exc.start, nul)
        raise DataFileError(f"--data {path}: not UTF-8 text (byte 0x{chunk[bad]:02x} at offset "
                            f"{offset + bad}); --task text reads UTF-8 text") from None
    if nul >= 0:
        raise DataFileError(f"--data {path}: not UTF-8 text (byte 0x00 at offset "
                            f"{offset + nul}, binary data); --task text reads UTF-8 text")


class TextTask:
    """Next-byte prediction on a file read through ``np.memmap``.

    The vocabulary is the 256 byte values, not the file's characters: building a character
    vocabulary would mean decoding the whole file first (hundreds of MB, on every rank), while
    bytes can be read straight from the mapped file, a window at a time. UTF-8 text is still
    modelled exactly; a multi-byte character simply takes several steps. Each row is a random
    window of T+1 bytes from the training part (the first ~95%); the held-out tail (the last 5%,
    at least one window) is cut into non-overlapping windows for evaluation. Only the pages of
    the windows a rank asks for are ever read from disk.
    """

    name = "text"
    metric = "perplexity"
    vocab_size = 256

    def __init__(self, path: str | os.PathLike, seed: int, seq_len: int = 64,
                 eval_size: int = 512, eval_fraction: float = 0.05) -> None:
        _check_seed(seed)
        _check_positive("--seq-len", seq_len)
        _check_positive("--eval-size", eval_size)
        self.path, self.seed, self.seq_len = os.fspath(path), int(seed), int(seq_len)
        window = self.seq_len + 1
        size = check_text_file(self.path)
        n_eval = max(math.ceil(size * eval_fraction), window)
        if size - n_eval < window:
            raise DataFileError(
                f"--data {self.path}: {size} bytes is too short for --seq-len {self.seq_len}: "
                f"need at least {2 * window} (one window of seq_len + 1 to train on and one "
                f"held out)")
        self.needed_len = self.seq_len  # every position is scored: no padding
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        self.n_train = size - n_eval  # training windows lie in [0, n_train), eval in the rest
        n_windows = n_eval // window
        picks = np.linspace(0, n_windows - 1, num=min(n_windows, eval_size)).astype(np.int64)
        self._eval_starts = self.n_train + np.unique(picks) * window

    def _windows(self, starts: np.ndarray) -> Batch:
        idx = starts[:, None] + np.arange(self.seq_len + 1, dtype=np.int64)  # (B, T+1)
        chunk = self.data[idx].astype(np.int64)  # fancy indexing reads only these bytes
        # contiguous copies: a rank may send them through MPI buffers or to the GPU as they are
        return np.ascontiguousarray(chunk[:, :-1]), np.ascontiguousarray(chunk[:, 1:])

    def train_starts(self, step: int, batch_size: int) -> np.ndarray:
        """Byte offsets of the windows of the global batch of ``step`` (B,)."""
        _check_positive("--batch-size", batch_size)
        high = self.n_train - self.seq_len  # exclusive: a window must end inside the train part
        return _rng(self.seed, step).integers(0, high, size=batch_size, dtype=np.int64)

    def batch(self, step: int, batch_size: int) -> Batch:
        return self._windows(self.train_starts(step, batch_size))

    def dp_rows(self, step: int, batch_size: int, dp_rank: int, dp_size: int) -> Batch:
        # All ranks draw the same offsets (cheap) but each reads only its own windows.
        lo, hi = _dp_range(batch_size, dp_rank, dp_size)
        return self._windows(self.train_starts(step, batch_size)[lo:hi])

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        _check_positive("--batch-size", batch_size)
        for lo in range(0, len(self._eval_starts), batch_size):
            yield self._windows(self._eval_starts[lo : lo + batch_size])

    def n_scored(self, targets: np.ndarray) -> int:
        return int((np.asarray(targets) != IGNORE).sum())

    def render(self, tokens: np.ndarray) -> str:
        # ids past 255 exist when --vocab is larger than the bytes; they show as "?"
        return bytes(int(t) if 0 <= t < 256 else 63 for t in tokens).decode(
            "utf-8", errors="replace")

    def __repr__(self) -> str:
        return (f"TextTask({self.path!r}, seed={self.seed}, seq_len={self.seq_len}, "
                f"train_bytes={self.n_train}, eval_windows={len(self._eval_starts)})")


_SYNTHETIC = {"sort": SortTask, "reverse": ReverseTask, "add": AddTask}


def make_task(name: str | None, seed: int, *, data_path: str | None = None,
              seq_len: int | None = None, **kw) -> Task:
    """The task called ``name`` (``sort``, ``reverse``, ``add`` or ``text``).

    ``name=None`` means ``text`` when ``data_path`` is given, else ``sort``. For synthetic tasks
    ``seq_len`` (default: the task's own length) pads the rows on the right; extra keywords:
    ``n_digits`` (sort, reverse: default 8; add: digits per operand, default 3) and
    ``eval_size`` (default 512). For ``text``, ``seq_len`` defaults to 64.
    """
    if name is None:
        name = "sort" if data_path is None else "text"
    if name == "text":
        if data_path is None:
            raise ConfigError("--task text needs --data FILE")
        if "n_digits" in kw:
            raise ConfigError("--n-digits sets the problem size of the digit tasks, not of "
                              "--task text")
        return TextTask(data_path, seed, 64 if seq_len is None else seq_len, **kw)
    if name not in _SYNTHETIC:
        raise ConfigError(f"--task: unknown task {name!r} (choose {', '.join(TASK_NAMES)})")
    if data_path is not None:
        raise ConfigError(f"--data is only used by --task text, not --task {name}")
    return _SYNTHETIC[name](seed, seq_len=seq_len, **kw)
