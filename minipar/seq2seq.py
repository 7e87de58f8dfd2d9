"""Sequence-to-sequence tasks with an exact answer, for the encoder-decoder (``--arch encdec``).

The three applications Vaswani et al. 2017 and its successors made the Transformer's name, each
as a small synthetic problem whose answer is a function of the source, so that a model either
gets a row exactly right or not:

- ``translate``: a number from 0 to 999 999 written in words, in a language that says the units
  before the tens (German's "einundzwanzig"): ``four hundred two and thirty thousand seven`` ->
  ``4 3 2 0 0 7``. The digits come out in another order than the words that name them, so the
  decoder must look back and forth over the source: word order change, and agreement of every
  digit with the words around it ("thirty" alone is 30, "two and thirty" is 32).
- ``summarize``: a document of 1 to 9 symbols from ``a b c d``, summarised as each symbol that
  occurs followed by its count, in alphabetical order: ``b a b d b`` -> ``a 1 b 3 d 1``.
- ``qa``: ``?`` and a key, then a context of 2 to 4 facts, each a key (``A`` to ``H``, all
  different) and a two-digit value; the answer is the asked key's value:
  ``? C A 3 7 C 0 1`` -> ``0 1``. The question comes first, at a fixed place, as a reader is
  told what to look for before reading. The answer is found by position AND content: the
  encoder must carry each key to the two digits right of it ("look one place left"), then the
  decoder can match the asked key. The encoder's learned position bias (``--pos-bias``, on by
  default for this task, ``minipar.models.encdec.SourceAttention``) gives a head that shift
  directly, and with the encoder-decoder's fan-in initialisation the model of ``--model
  default`` reaches 0.95-1.0 held-out exact match in 500 steps. Without the bias it guesses
  among the facts (0.23 after 3000 steps); with it but GPT-2's small initial weights
  (``--weight-init gpt2``) it has 0.39 after 3000 steps.

One vocabulary serves source and target (so ``--tie-weights`` can share one table among both
embeddings and the head, as the paper does): ``<pad>`` (id 0, ``minipar.models.encdec.PAD``),
``<s>`` (start), ``</s>`` (end), then the task's words. A row packs the source (S ids, padded
on the right) and the decoder's input (T ids: ``<s>`` then the answer, ``</s>``, padding) into
one (S + T) array; its targets are the answer, ``</s>`` and padding, all T scored, so every row
scores the same number of tokens (which the data-parallel loss normaliser relies on).

Held-out split: a problem is its source, and it is held out if and only if a hash of the source
tokens (splitmix64 folded over them) is 0 modulo 16. Training batches redraw every held-out
source, so the splits are disjoint by construction, whatever the seed or step; the evaluation
set is a fixed sample of the held-out split, independent of the seed.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np

from minipar.config import ConfigError
from minipar.models.encdec import PAD
from minipar.tasks import HOLDOUT_MOD, Batch, _check_positive, _check_seed, _rng, dp_slice, \
    splitmix64

BOS, EOS = 1, 2
SPECIALS = ["<pad>", "<s>", "</s>"]
SEQ2SEQ_TASKS = ("translate", "summarize", "qa")


def source_hash(src: np.ndarray) -> np.ndarray:
    """(B, S) token ids -> (B,) uint64: splitmix64 folded over the tokens, left to right."""
    h = np.zeros(len(src), dtype=np.uint64)
    for col in np.asarray(src, dtype=np.int64).T:
        h = splitmix64(h ^ col.astype(np.uint64))
    return h


class Seq2SeqTask:
    """Base of the tasks: subclasses give ``words``, ``src_len``, ``answer_len`` and ``_draw``."""

    metric = "exact_match"
    words: list[str] = []
    src_len = 1  # S: source tokens, padding included
    answer_len = 1  # the longest answer (without </s>)
    pos_bias = False  # the default of --pos-bias: whether the encoder learns a position bias
    default_steps: int | None = None  # the default of --steps, when not the train command's

    def __init__(self, seed: int, eval_size: int = 512) -> None:
        _check_seed(seed)
        _check_positive("--eval-size", eval_size)
        self.seed, self.eval_size = int(seed), int(eval_size)
        self.vocab = SPECIALS + self.words
        self.vocab_size = len(self.vocab)
        self.ids = {w: i for i, w in enumerate(self.vocab)}
        self.seq_len = self.answer_len + 1  # T: the answer and </s>
        self.needed_len = self.seq_len
        self._eval: Batch | None = None

    # -- problems ----------------------------------------------------------------------------

    def _draw(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        """n random problems: sources (n, S) and answers (n, answer_len), both PAD-padded."""
        raise NotImplementedError

    def encode(self, rows: list[list[str]], width: int) -> np.ndarray:
        """Lists of words -> (n, width) ids, PAD on the right."""
        out = np.full((len(rows), width), PAD, dtype=np.int64)
        for i, row in enumerate(rows):
            out[i, :len(row)] = [self.ids[w] for w in row]
        return out

    def in_eval_split(self, src: np.ndarray) -> np.ndarray:
        """Whether each source (B, S) is held out (B,) bool: a function of the source alone."""
        return source_hash(src) % np.uint64(HOLDOUT_MOD) == 0

    def _train_problems(self, rng: np.random.Generator, n: int):
        src, ans = self._draw(rng, n)
        held = self.in_eval_split(src)
        while held.any():  # redraw held-out sources; each redraw leaves ~1/16 of them
            s2, a2 = self._draw(rng, int(held.sum()))
            src[held], ans[held] = s2, a2
            held = self.in_eval_split(src)
        return src, ans

    def _pack(self, src: np.ndarray, ans: np.ndarray) -> Batch:
        """Sources and answers -> inputs (B, S + T) and targets (B, T)."""
        b = len(src)
        target = np.full((b, self.seq_len), PAD, dtype=np.int64)  # answer, </s>, padding
        target[:, :self.answer_len] = ans
        lengths = (ans != PAD).sum(axis=1)  # (B,)
        target[np.arange(b), lengths] = EOS
        dec_in = np.concatenate([np.full((b, 1), BOS), target[:, :-1]], axis=1)  # (B, T)
        return np.concatenate([src, dec_in], axis=1), target

    # -- the Task protocol (minipar.tasks.Task) -----------------------------------------------

    def batch(self, step: int, batch_size: int) -> Batch:
        _check_positive("--batch-size", batch_size)
        return self._pack(*self._train_problems(_rng(self.seed, step), batch_size))

    def dp_rows(self, step: int, batch_size: int, dp_rank: int, dp_size: int) -> Batch:
        return dp_slice(*self.batch(step, batch_size), dp_rank, dp_size)

    def eval_set(self) -> Batch:
        """A fixed sample of distinct held-out problems (independent of the seed), cached."""
        if self._eval is None:
            rng = np.random.default_rng([HOLDOUT_MOD, zlib.crc32(self.name.encode())])
            srcs, answers, seen = [], [], set()
            while len(srcs) < self.eval_size:
                src, ans = self._draw(rng, 64 * HOLDOUT_MOD)
                for s, a in zip(src[self.in_eval_split(src)], ans[self.in_eval_split(src)]):
                    if s.tobytes() not in seen and len(srcs) < self.eval_size:
                        seen.add(s.tobytes())
                        srcs.append(s)
                        answers.append(a)
            self._eval = self._pack(np.array(srcs), np.array(answers))
        return self._eval

    def eval_batches(self, batch_size: int) -> Iterator[Batch]:
        _check_positive("--batch-size", batch_size)
        inputs, targets = self.eval_set()
        for lo in range(0, len(inputs), batch_size):
            yield inputs[lo:lo + batch_size], targets[lo:lo + batch_size]

    def n_scored(self, targets: np.ndarray) -> int:
        return int(np.asarray(targets).size)  # every target position, padding included

    def render(self, tokens: np.ndarray) -> str:
        """Ids as words, up to the first </s>, padding and <s> left out."""
        out = []
        for t in np.asarray(tokens).tolist():
            if t == EOS:
                break
            if t not in (PAD, BOS):
                out.append(self.vocab[t] if 0 <= t < self.vocab_size else "?")
        return " ".join(out)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(seed={self.seed}, src_len={self.src_len}, "
                f"seq_len={self.seq_len}, vocab_size={self.vocab_size})")


UNITS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
         "eighteen", "nineteen"]
TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def below_thousand(n: int) -> list[str]:
    """1..999 in words, units before tens: 432 -> four hundred two and thirty."""
    words = []
    if n >= 100:
        words += [UNITS[n // 100 - 1], "hundred"]
    r = n % 100
    if 10 <= r < 20:
        words.append(TEENS[r - 10])
    elif r >= 20:
        words += ([UNITS[r % 10 - 1], "and"] if r % 10 else []) + [TENS[r // 10 - 2]]
    elif r:
        words.append(UNITS[r - 1])
    return words


def number_words(n: int) -> list[str]:
    """0..999 999 in words: 432 007 -> four hundred two and thirty thousand seven."""
    if n == 0:
        return ["zero"]
    words = below_thousand(n // 1000) + (["thousand"] if n >= 1000 else [])
    return words + below_thousand(n % 1000)


class TranslateTask(Seq2SeqTask):
    """Numbers in words (units before tens) -> their decimal digits."""

    name = "translate"
    words = ["zero", *UNITS, *TEENS, *TENS, "hundred", "thousand", "and", *"0123456789"]
    src_len = 11  # 777 777: seven hundred seven and seventy thousand, the same again
    answer_len = 6

    def _draw(self, rng, n):
        nums = rng.integers(0, 10 ** 6, size=n)
        src = self.encode([number_words(int(v)) for v in nums], self.src_len)
        ans = self.encode([list(str(int(v))) for v in nums], self.answer_len)
        return src, ans


class SummarizeTask(Seq2SeqTask):
    """A document of symbols -> each symbol that occurs with its count, alphabetically."""

    name = "summarize"
    letters = "abcd"
    words = [*letters, *"123456789"]
    src_len = 9
    answer_len = 8

    def _draw(self, rng, n):
        lengths = rng.integers(1, self.src_len + 1, size=n)
        sym = rng.integers(0, len(self.letters), size=(n, self.src_len))
        docs = [[self.letters[s] for s in row[:k]] for row, k in zip(sym, lengths)]
        summaries = [[w for c in self.letters if (k := doc.count(c)) for w in (c, str(k))]
                     for doc in docs]
        return self.encode(docs, self.src_len), self.encode(summaries, self.answer_len)


class QATask(Seq2SeqTask):
    """Key-value facts and a question about one key -> its two-digit value."""

    name = "qa"
    pos_bias = True  # the value sits one and two places right of its key: see the docstring
    default_steps = 1000  # --steps: 500 reach 0.95-1.0 held-out exact match, by seed
    keys = "ABCDEFGH"
    words = [*keys, *"0123456789", "?"]
    max_facts = 4
    src_len = 3 * max_facts + 2
    answer_len = 2

    def _draw(self, rng, n):
        n_facts = rng.integers(2, self.max_facts + 1, size=n)
        rows, answers = [], []
        for k in n_facts:
            keys = rng.choice(list(self.keys), size=k, replace=False)
            values = rng.integers(0, 10, size=(k, 2))
            asked = int(rng.integers(0, k))
            facts = [w for key, v in zip(keys, values) for w in (key, str(v[0]), str(v[1]))]
            rows.append(["?", keys[asked]] + facts)
            answers.append([str(d) for d in values[asked]])
        return self.encode(rows, self.src_len), self.encode(answers, self.answer_len)


MAX_CORPUS_LEN = 64  # the longest source or target line --src/--tgt take by default (tokens)


def _read_lines(flag: str, path: str) -> list[list[str]]:
    """A UTF-8 file's lines as lists of whitespace-separated tokens; one clear line if not."""
    try:
        with open(path, encoding="utf-8") as fh:
            return [line.split() for line in fh.read().splitlines()]
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{flag} {path}: not UTF-8 text ({e.reason} at byte {e.start})") \
            from None
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot be read ({e.strerror})") from None


class CorpusTask(Seq2SeqTask):
    """A parallel corpus from two files, one sentence a line (``--src FILE --tgt FILE``).

    Tokens are the words between whitespace. The vocabulary is the corpus's own: every token of
    either file, sorted, behind the three specials (one table for both sides, so ``--tie-weights``
    works as for the synthetic tasks). The source length S is the longest source line, the target
    length T the longest target line plus ``</s>``; a line longer than ``max_len`` tokens is
    refused, naming the file and line, since the model is built for the lengths it trains on.
    The held-out split is the synthetic tasks': a pair is held out if and only if its source's
    hash is 0 modulo 16, so a repeated source never lies on both sides.
    """

    name = "corpus"

    def __init__(self, src_path: str, tgt_path: str, seed: int, eval_size: int = 512,
                 max_len: int = MAX_CORPUS_LEN) -> None:
        srcs, tgts = _read_lines("--src", src_path), _read_lines("--tgt", tgt_path)
        if len(srcs) != len(tgts):
            raise ConfigError(f"--src {src_path} has {len(srcs)} lines but --tgt {tgt_path} has "
                              f"{len(tgts)}: a parallel corpus pairs line i with line i")
        for flag, path, rows in (("--src", src_path, srcs), ("--tgt", tgt_path, tgts)):
            for i, row in enumerate(rows):
                if not row:
                    raise ConfigError(f"{flag} {path} line {i + 1} is empty: every line pair "
                                      "needs a source and a target sentence")
                if len(row) > max_len:
                    raise ConfigError(f"{flag} {path} line {i + 1} has {len(row)} tokens, more "
                                      f"than the model's context of {max_len} (--seq-len)")
        if not srcs:
            raise ConfigError(f"--src {src_path} is empty")
        self.words = sorted({w for row in srcs + tgts for w in row} - set(SPECIALS))
        self.src_len = max(map(len, srcs))
        self.answer_len = max(map(len, tgts))
        super().__init__(seed, eval_size)
        self.needed_len = None  # --seq-len caps the lines here; it is not a padded row length
        src = self.encode(srcs, self.src_len)  # (N, S)
        ans = self.encode(tgts, self.answer_len)  # (N, answer_len)
        held = self.in_eval_split(src)
        if held.all() or not held.any():
            raise ConfigError(f"--src {src_path}: its {len(srcs)} pairs leave "
                              f"{'no training' if held.all() else 'no held-out'} pair (a pair "
                              "is held out when its source hashes to 0 mod 16): add lines")
        self._train = (src[~held], ans[~held])
        self._held = (src[held][:eval_size], ans[held][:eval_size])

    def _train_problems(self, rng: np.random.Generator, n: int):
        pick = rng.integers(0, len(self._train[0]), size=n)  # rows of the training split
        return self._train[0][pick], self._train[1][pick]

    def eval_set(self) -> Batch:
        if self._eval is None:
            self._eval = self._pack(*self._held)
        return self._eval


_TASKS = {"translate": TranslateTask, "summarize": SummarizeTask, "qa": QATask}


def make_seq2seq_task(name: str | None, seed: int, eval_size: int = 512,
                      src: str | None = None, tgt: str | None = None,
                      max_len: int | None = None) -> Seq2SeqTask:
    """The encoder-decoder task called ``name`` (default ``translate``), or the parallel corpus
    of the files ``src`` and ``tgt`` (``name`` None or ``corpus``)."""
    if (src is None) != (tgt is None):
        raise ConfigError("--src and --tgt go together: a parallel corpus needs both files")
    if src is not None:
        if name not in (None, "corpus"):
            raise ConfigError(f"--src/--tgt bring their own corpus; drop --task {name}")
        return CorpusTask(src, tgt, seed, eval_size,
                          MAX_CORPUS_LEN if max_len is None else max_len)
    if max_len is not None:
        raise ConfigError("--seq-len applies to --arch encdec only with --src/--tgt (the "
                          "synthetic tasks set their own lengths)")
    name = "translate" if name is None else name
    if name not in _TASKS:
        raise ConfigError(f"--task {name!r} is not a task of --arch encdec "
                          f"(choose {', '.join(SEQ2SEQ_TASKS)})")
    return _TASKS[name](seed, eval_size=eval_size)
