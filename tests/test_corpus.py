"""--src FILE --tgt FILE: a parallel corpus for the encoder-decoder, its split and bad input."""

import numpy as np
import pytest

from minipar.config import ConfigError
from minipar.seq2seq import BOS, EOS, CorpusTask, make_seq2seq_task
from inproc import train

COLOURS = {"red": "rouge", "black": "noir", "white": "blanc", "green": "vert"}
NOUNS = {"cat": "chat", "dog": "chien", "car": "voiture", "tree": "arbre", "house": "maison"}


def write_corpus(tmp_path, src=None, tgt=None):
    """A small English -> French corpus (adjective after the noun): 100 pairs."""
    if src is None:
        pairs = [(f"the {c} {n} sees {m}", f"le {NOUNS[n]} {COLOURS[c]} voit {NOUNS[m]}")
                 for c in COLOURS for n in NOUNS for m in NOUNS]
        src, tgt = [p[0] for p in pairs], [p[1] for p in pairs]
    s, t = tmp_path / "src.txt", tmp_path / "tgt.txt"
    s.write_text("\n".join(src) + "\n", encoding="utf-8")
    t.write_text("\n".join(tgt) + "\n", encoding="utf-8")
    return str(s), str(t)


def test_rows_hold_each_line_pair_and_the_vocabulary_is_the_corpus(tmp_path):
    s, t = write_corpus(tmp_path)
    task = make_seq2seq_task(None, seed=0, src=s, tgt=t)
    lines = dict(zip(open(s).read().splitlines(), open(t).read().splitlines()))
    words = {w for line in list(lines) + list(lines.values()) for w in line.split()}
    assert set(task.vocab[3:]) == words and task.src_len == 5 and task.seq_len == 6
    inputs, targets = task.batch(step=3, batch_size=32)
    for row, target in zip(inputs, targets):
        source = task.render(row[:task.src_len])
        assert source in lines and task.render(target) == lines[source]
        n = len(lines[source].split())
        assert target[n] == EOS and row[task.src_len] == BOS  # </s> after the answer, <s> first


def test_held_out_pairs_never_train(tmp_path):
    s, t = write_corpus(tmp_path)
    task = make_seq2seq_task(None, seed=1, src=s, tgt=t)
    held = {task.render(r[:task.src_len]) for r in task.eval_set()[0]}
    assert 0 < len(held) < 100
    for step in range(20):
        seen = {task.render(r[:task.src_len]) for r in task.batch(step, 64)[0]}
        assert not seen & held
    again = make_seq2seq_task(None, seed=7, src=s, tgt=t)  # the split ignores the seed
    assert {again.render(r[:again.src_len]) for r in again.eval_set()[0]} == held


def _bad(tmp_path, kind):
    s, t = write_corpus(tmp_path)
    lines = open(s).read().splitlines()
    if kind == "count":
        kept = open(t).read().splitlines()[:-1]
        open(t, "w").write("\n".join(kept) + "\n")
    elif kind == "empty":
        lines[4] = "   "
        open(s, "w").write("\n".join(lines) + "\n")
    elif kind == "long":
        lines[6] = " ".join(["cat"] * 9)
        open(s, "w").write("\n".join(lines) + "\n")
    elif kind == "binary":
        open(t, "wb").write(b"le chat\n\xff\xfe\n")
    elif kind == "missing":
        t = str(tmp_path / "nope.txt")
    return s, t


@pytest.mark.parametrize("kind, words", [
    ("count", ["has 100 lines", "has 99"]), ("empty", ["src.txt line 5 is empty"]),
    ("long", ["src.txt line 7 has 9 tokens", "--seq-len"]), ("binary", ["tgt.txt", "UTF-8"]),
    ("missing", ["--tgt", "nope.txt"])])
def test_bad_corpus_is_one_line_naming_file_and_line_on_every_rank(tmp_path, kind, words):
    s, t = _bad(tmp_path, kind)
    codes, out, err = train(["--arch", "encdec", "--src", s, "--tgt", t, "--seq-len", "8",
                             "--steps", "1"], n=2)
    assert codes == [2, 2], (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), lines[0]


@pytest.mark.parametrize("args, flag", [
    (["--src", "a.txt"], "--tgt"), (["--arch", "encdec", "--tgt", "a.txt"], "--src"),
    (["--src", "a.txt", "--tgt", "b.txt"], "--arch encdec"),
])
def test_flags_that_go_together(args, flag):
    codes, out, err = train(args)
    assert codes == [2] and flag in err and len(err.strip().splitlines()) == 1, err


def test_a_directory_or_a_task_with_a_corpus_is_refused(tmp_path):
    s, t = write_corpus(tmp_path)
    with pytest.raises(ConfigError, match="cannot be read"):
        CorpusTask(str(tmp_path), t, seed=0)
    with pytest.raises(ConfigError, match="drop --task qa"):
        make_seq2seq_task("qa", 0, src=s, tgt=t)


def test_corpus_trains_and_shows(tmp_path):
    s, t = write_corpus(tmp_path)
    codes, out, err = train(["--arch", "encdec", "--src", s, "--tgt", t, "--steps", "3",
                             "--model", "tiny", "--quiet", "--show", "1"])
    assert codes == [0], err
    shown = [ln for ln in out.splitlines() if ln.startswith("show    |") and " -> " in ln]
    assert len(shown) == 1 and "the " in shown[0] and " le " in shown[0], out
    assert np.isfinite(float(out.split("final loss ")[1].split(",")[0]))
