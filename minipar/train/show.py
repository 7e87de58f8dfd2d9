"""``--show N``: held-out examples of an encoder-decoder run, decoded with the cache (greedy, or
``--beam K``).

The trained weights are gathered in full (a collective: every layout, ZeRO-3 shards and tp
slices included, gives the same full tensors) and rank 0 loads them into a serial copy of the
model, which decodes the whole held-out set with the key/value cache. It prints N rows as
source -> reference -> output, and the exact match of the decoded outputs: a row counts when
its output up to ``</s>`` is the reference. The evaluation line's teacher-forced exact match
also scores the padding after ``</s>``, so it is at most this (``minipar.tasks.exact_match``
shows why teacher forcing and greedy decoding otherwise agree).
"""

from __future__ import annotations

import numpy

from minipar import backend
from minipar.dist.comm import local_comm
from minipar.models.decoding import beam_search, greedy_cached
from minipar.models.encdec import EncoderDecoder
from minipar.nn.module import BuildContext
from minipar.seq2seq import BOS, EOS


def serial_copy(engine) -> EncoderDecoder | None:
    """A one-rank model holding the engine's trained weights on rank 0, else None (collective)."""
    full = engine.full_params()
    if engine.mesh.world.rank != 0:
        return None
    model = EncoderDecoder(engine.model_cfg, BuildContext(0, engine.dtype, local_comm("tp")))
    for p in model.params():
        p.data = backend.from_host(numpy.ascontiguousarray(full[p.name]))
    return model


def decoded_rows(model: EncoderDecoder, task, batch_size: int = 256, beam: int = 1):
    """(sources, references, outputs) of the whole held-out set, as lists of id rows: greedy
    decoding, or beam search of width ``beam`` > 1."""
    src_len = task.src_len
    inputs, targets = task.eval_set()
    outputs = []
    for lo in range(0, len(inputs), batch_size):
        src = backend.from_host(numpy.ascontiguousarray(inputs[lo:lo + batch_size, :src_len]))
        out = (greedy_cached(model, src, BOS, task.seq_len) if beam == 1 else
               beam_search(model, src, BOS, EOS, task.seq_len, beam))
        outputs.append(backend.to_host(out))
    return inputs[:, :src_len], targets, numpy.concatenate(outputs)


def until_eos(row) -> list[int]:
    """The tokens of a row before its first </s> (the whole row if it has none)."""
    row = list(numpy.asarray(row).tolist())
    return row[:row.index(EOS)] if EOS in row else row


def show(engine, task, n: int, say, beam: int = 1) -> float | None:
    """Print n examples on rank 0; return the decoded exact match there (collective)."""
    model = serial_copy(engine)
    if model is None:
        return None
    sources, refs, outs = decoded_rows(model, task, beam=beam)
    ok = [until_eos(r) == until_eos(o) and EOS in o.tolist() for r, o in zip(refs, outs)]
    for i in range(min(n, len(sources))):
        mark = "ok" if ok[i] else "WRONG"
        say(f"show    | {task.render(sources[i])} -> {task.render(refs[i])} -> "
            f"{task.render(outs[i])}  [{mark}]")
    match = float(numpy.mean(ok))
    how = "greedy decoding" if beam == 1 else f"beam search (width {beam})"
    say(f"show    | {how} with the key/value cache: exact match {match:.3f} "
        f"over {len(ok)} held-out rows")
    return match
