"""The encoder-decoder's tasks: answers checked by independent parsers, held-out splits that
are disjoint by construction, batches that are pure functions of (seed, step), and the
command's bad-input lines."""

from collections import Counter

import numpy as np
import pytest

from minipar.models.encdec import PAD
from minipar.seq2seq import BOS, EOS, SEQ2SEQ_TASKS, make_seq2seq_task, source_hash
from inproc import train

VALUES = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6,
          "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
          "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17,
          "eighteen": 18, "nineteen": 19, "twenty": 20, "thirty": 30, "forty": 40, "fifty": 50,
          "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}


def parse_number(words: list[str]) -> int:
    """Words (units before tens) back to the number, a left-to-right accumulator: "and" is a
    plain sum, "hundred" multiplies the current group, "thousand" closes it."""
    total, group = 0, 0
    for w in words:
        if w == "hundred":
            group *= 100
        elif w == "thousand":
            total, group = group * 1000, 0
        elif w != "and":
            group += VALUES[w]
    return total + group


def rows(task, n=300, step=0):
    inputs, targets = task.batch(step, n)
    s = task.src_len
    return [(task.render(x[:s]).split(), task.render(y).split(), x, y)
            for x, y in zip(inputs, targets)]


def test_translate_answers_are_the_numbers_the_words_name():
    task = make_seq2seq_task("translate", 0)
    for src, ans, _, _ in rows(task):
        assert "".join(ans) == str(parse_number(src)), (src, ans)
        for i, w in enumerate(src):  # units before tens, joined by "and": "two and thirty"
            if w in ("twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty",
                     "ninety") and i + 1 < len(src):
                assert src[i + 1] not in ("one", "two", "three", "four", "five", "six",
                                          "seven", "eight", "nine"), src
            if w == "and":
                assert VALUES[src[i - 1]] < 10 and VALUES[src[i + 1]] >= 20, src


def test_summarize_answers_count_each_symbol():
    task = make_seq2seq_task("summarize", 0)
    for src, ans, _, _ in rows(task):
        counts = Counter(src)
        assert ans == [w for c in sorted(counts) for w in (c, str(counts[c]))], (src, ans)


def test_qa_answers_are_the_asked_keys_value():
    task = make_seq2seq_task("qa", 0)
    for src, ans, _, _ in rows(task):
        assert src[0] == "?"
        facts, asked = src[2:], src[1]
        table = {facts[i]: facts[i + 1:i + 3] for i in range(0, len(facts), 3)}
        assert len(table) == len(facts) // 3  # keys are distinct
        assert ans == table[asked], (src, ans)


@pytest.mark.parametrize("name", SEQ2SEQ_TASKS)
def test_layout_of_a_row(name):
    task = make_seq2seq_task(name, 1)
    inputs, targets = task.batch(3, 32)
    s, t = task.src_len, task.seq_len
    assert inputs.shape == (32, s + t) and targets.shape == (32, t)
    assert (inputs[:, s] == BOS).all() and (inputs[:, s + 1:] == targets[:, :-1]).all()
    assert ((targets == EOS).sum(axis=1) == 1).all()  # one </s> per row, then padding
    assert (inputs[:, 0] != PAD).all()  # no source is empty
    assert task.n_scored(targets) == targets.size  # every row scores the same tokens
    again = make_seq2seq_task(name, 1).batch(3, 32)
    assert all((a == b).all() for a, b in zip((inputs, targets), again))
    other = task.batch(4, 32)[0]
    assert not (other == inputs).all()
    lo = task.dp_rows(3, 32, 1, 2)[0]
    assert (lo == inputs[16:]).all()


@pytest.mark.parametrize("name", SEQ2SEQ_TASKS)
def test_held_out_split_is_disjoint_from_training(name):
    """Membership is a function of the source alone (its hash mod 16 is 0): every evaluation
    source is in the split, no training source of many steps is, and the sets do not meet."""
    task = make_seq2seq_task(name, 0)
    s = task.src_len
    held = task.eval_set()[0][:, :s]
    assert len(held) == 512 and len({r.tobytes() for r in held}) == 512  # distinct
    assert task.in_eval_split(held).all()
    seen = set()
    for step in range(40):
        src = task.batch(step, 256)[0][:, :s]
        assert not task.in_eval_split(src).any()
        seen |= {r.tobytes() for r in src}
    assert not seen & {r.tobytes() for r in held}
    # the split is about 1/16 of what the generator draws, so training does cover the rest
    drawn = task._draw(np.random.default_rng(5), 4096)[0]
    assert 0.03 < task.in_eval_split(drawn).mean() < 0.1


def test_source_hash_depends_on_every_token():
    src = np.array([[3, 4, 5], [3, 4, 6], [4, 3, 5]])
    assert len(set(source_hash(src).tolist())) == 3


@pytest.mark.parametrize("args, flag", [
    (["--arch", "nope"], "--arch"),
    (["--task", "translate"], "--arch encdec"),
    (["--arch", "encdec", "--task", "sort"], "--task"),
    (["--arch", "encdec", "--pp", "2"], "--pp"),
    (["--arch", "encdec", "--seq-len", "8"], "--seq-len"),
    (["--arch", "encdec", "--norm", "side"], "--norm"),
    (["--norm", "post"], "--norm"),
    (["--show", "2"], "--show"),
    (["--beam", "2"], "--beam"),
    (["--arch", "encdec", "--beam", "2"], "--beam"),
    (["--arch", "encdec", "--show", "1", "--beam", "0"], "--beam"),
    (["--arch", "encdec", "--show", "-1"], "--show"),
    (["--arch", "encdec", "--pos", "rotary"], "--pos"),
    (["--arch", "encdec", "--mode", "ps"], "--mode"),
    (["--arch", "encdec", "--d-model", "30", "--heads", "4"], "--heads"),
    (["--pos-bias"], "--pos-bias"),
    (["--task", "sort", "--no-pos-bias"], "--no-pos-bias"),
    (["--arch", "encdec", "--weight-init", "xavier"], "--weight-init"),
])
def test_bad_input_is_one_line_naming_the_flag(args, flag):
    codes, out, err = train(args)
    assert codes == [2], (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "Traceback" not in err, err


def test_each_task_picks_its_defaults_and_flags_override_them():
    """qa turns the encoder's position bias on and trains 1000 steps; every encoder-decoder
    starts from the fan-in initialisation, the GPT from GPT-2's; the flags win."""
    from minipar.train.cli import build_parser, prepare

    def setup(*argv):
        args = build_parser().parse_args(list(argv))
        cfg = prepare(args, 1, 1).cfg
        return args.steps, cfg

    steps, cfg = setup("--arch", "encdec", "--task", "qa")
    assert (steps, cfg.pos_bias, cfg.weight_init) == (1000, True, "fan-in")
    steps, cfg = setup("--arch", "encdec", "--task", "translate")
    assert (steps, cfg.pos_bias, cfg.weight_init) == (500, False, "fan-in")
    steps, cfg = setup("--arch", "encdec", "--task", "qa", "--no-pos-bias", "--weight-init", "gpt2",
                       "--steps", "7")
    assert (steps, cfg.pos_bias, cfg.weight_init) == (7, False, "gpt2")
    steps, cfg = setup("--arch", "encdec", "--task", "summarize", "--pos-bias")
    assert cfg.pos_bias
    steps, cfg = setup("--task", "sort", "--weight-init", "fan-in")
    assert (steps, cfg.weight_init) == (500, "fan-in")


def test_short_run_shows_decoded_examples():
    codes, out, err = train(["--arch", "encdec", "--task", "qa", "--steps", "2", "--quiet",
                             "--show", "2", "--model", "tiny"])
    assert codes == [0], err
    shown = [ln for ln in out.splitlines() if ln.startswith("show    |") and " -> " in ln]
    assert len(shown) == 2 and all(ln.count(" -> ") == 2 for ln in shown), out
    assert "exact match" in out


def test_short_run_shows_beam_decoded_examples():
    codes, out, err = train(["--arch", "encdec", "--task", "translate", "--steps", "2",
                             "--quiet", "--show", "1", "--beam", "3", "--model", "tiny"])
    assert codes == [0], err
    assert "beam search (width 3) with the key/value cache: exact match" in out, out
