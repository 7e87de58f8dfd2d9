"""``bench --collectives`` says what its columns and its target line mean."""

from minipar.bench.comm import MIB, TARGET, summary_line, table, verdict


def _row(op, nbytes, ratio):
    return {"op": op, "bytes": nbytes, "ranks": 2, "minipar_s": 1e-3 * ratio, "raw_s": 1e-3,
            "raw_prealloc_s": 9e-4, "ratio": ratio, "minipar_busbw": 1e9, "raw_busbw": 1e9}


def test_columns_and_target_are_explained():
    rows = [_row("allreduce_", 4096, 2.0), _row("allreduce", MIB, 1.2)]
    text = table(rows)
    for word in ("minipar = one MPIComm call", "raw = the same mpi4py", "prealloc =",
                 "GB/s =", "ratio = minipar / raw", '"over" marks', "allreduce_ is the in-place"):
        assert word in text
    assert text.splitlines()[-1].endswith("over") and not text.splitlines()[-2].endswith("over")
    missed = summary_line(verdict(rows))
    assert f"within {round(100 * (TARGET - 1))}% of raw mpi4py from 1 MiB up" in missed
    assert "NOT met" in missed and "worst ratio 1.200 (allreduce 1048576 B)" in missed
    assert summary_line(verdict(rows[:1] + [_row("allgather", MIB, 1.0)])).endswith(": met")
