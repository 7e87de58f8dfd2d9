"""CPU threads for one rank's kernels: BLAS threads chosen per operation, and rows split over
a few worker threads for the kernels NumPy runs on one core.

Why per operation. A large GEMM splits well over every core the rank has. A batch of small ones
does not: attention's ``q @ k^T`` over (B, H, T, D) is B x H separate BLAS calls, and with two
BLAS threads each call hands half its work to the other thread and waits for it. When another
process holds a core, that wait is a scheduler time slice per call: measured here, 744 ms per
product against 4.4 ms with one thread. So batched small products run with one BLAS thread
each (``one_blas_thread``), and their batch is split over the workers instead, one wait per
operation instead of one per matrix (``map_rows``).

The linear layers' large GEMMs (``matmul``) are cut into row (or column) blocks that the workers
take as they come free, each one BLAS call with one thread: a worker that loses its core to
another process takes fewer blocks instead of making the product wait for it.

Why workers. NumPy's elementwise kernels (GELU, softmax, LayerNorm, AdamW) use one core; on a
machine with two, half of it idles through them. ``map_rows`` runs the same plain kernel on
contiguous pieces of the rows in a small pool of threads (NumPy releases the GIL inside its
loops). Each piece is computed exactly as the whole would be, row by row, so what ``map_rows``
computes is the same bit for bit whatever the number of workers (``matmul``'s blocks are close
to the one-call product, not always the same bits: see its docstring).

The worker count is the rank's BLAS thread count (set by ``minipar.dist.launch`` before NumPy
loads: cores / ranks on this machine), or ``MINIPAR_WORKERS``. Only the NumPy backend is split;
on a GPU every function here is the plain call over all rows (a slice there would only add a
kernel launch).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from minipar import backend

MIN_ROWS_ELEMENTS = 1 << 16  # below this many elements a split costs more than it saves

_lock = threading.Lock()
_state = {"depth": 0, "saved": None, "pool": None, "pool_key": None, "controller": None}


def _controller():
    """threadpoolctl's view of the BLAS libraries loaded in this process (None without it)."""
    if _state["controller"] is None:
        try:
            from threadpoolctl import ThreadpoolController

            _state["controller"] = ThreadpoolController()
        except Exception:  # noqa: BLE001 - no threadpoolctl: BLAS keeps its own setting
            _state["controller"] = False
    return _state["controller"] or None


def workers() -> int:
    """Threads a kernel may use on this rank: ``MINIPAR_WORKERS``, else the BLAS threads."""
    env = os.environ.get("MINIPAR_WORKERS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return max(1, os.cpu_count() or 1)


@contextmanager
def one_blas_thread():
    """Run the block with one BLAS thread per call (batched small GEMMs), then restore.

    The BLAS setting is per process, so nested and concurrent uses (ranks of an in-process
    world are threads) are counted: the first entry sets 1, the last exit restores."""
    ctl = _controller() if backend.name() == "numpy" else None
    if ctl is None:
        yield
        return
    with _lock:
        if _state["depth"] == 0:
            blas = [lib for lib in ctl.lib_controllers if lib.user_api == "blas"]
            _state["saved"] = [(lib, lib.num_threads) for lib in blas]
            for lib in blas:
                lib.set_num_threads(1)
        _state["depth"] += 1
    try:
        yield
    finally:
        with _lock:
            _state["depth"] -= 1
            if _state["depth"] == 0:
                for lib, n in _state["saved"]:
                    lib.set_num_threads(n)


def _pool(n: int) -> ThreadPoolExecutor:
    """The process's pool of ``n`` kernel threads (a forked child makes its own: threads do not
    survive a fork, and the parent's pool would wait forever for them)."""
    with _lock:
        key = (os.getpid(), n)
        if _state["pool"] is None or _state["pool_key"] != key:
            _state["pool"] = ThreadPoolExecutor(n, thread_name_prefix="minipar-kernel")
            _state["pool_key"] = key
        return _state["pool"]


def row_slices(rows: int, parts: int) -> list[slice]:
    """``parts`` contiguous, nearly equal slices covering range(rows) (fewer if rows < parts)."""
    parts = max(1, min(parts, rows))
    bounds = [rows * i // parts for i in range(parts + 1)]
    return [slice(bounds[i], bounds[i + 1]) for i in range(parts)]


def map_rows(fn, rows: int, elements: int, block: int | None = None,
             parts: int | None = None) -> None:
    """Call ``fn(rows_slice)`` over ``range(rows)``: one contiguous piece per worker, run in
    parallel on the NumPy backend when the work (``elements``) is large enough, each piece in
    turn cut into slices of at most ``block`` rows (so that a kernel's passes over a slice stay
    in cache). ``fn`` writes its slice of the outputs itself; exceptions propagate."""
    n = workers() if parts is None else parts
    on_cpu = backend.name() == "numpy"
    if not on_cpu or n <= 1 or rows < 2 or elements < MIN_ROWS_ELEMENTS:
        n = 1
    step = max(1, block or rows) if on_cpu else max(1, rows)

    def run(piece: slice) -> None:
        for lo in range(piece.start, piece.stop, step):
            fn(slice(lo, min(lo + step, piece.stop)))

    pieces = row_slices(rows, n)
    if n == 1 or threading.current_thread().name.startswith("minipar-kernel"):
        for piece in pieces:  # no nested pools
            run(piece)
        return
    futures = [_pool(n).submit(run, piece) for piece in pieces[1:]]
    try:
        run(pieces[0])  # the calling thread takes the first piece
    finally:
        for f in futures:
            f.result()


def map_blocks(fn, n_blocks: int, parts: int | None = None) -> None:
    """Call ``fn(i)`` for every i in range(n_blocks), each worker taking the next block as it
    comes free: a worker slowed down by another process on its core takes fewer blocks instead
    of making the others wait for it (static halves would wait for the slower one)."""
    n = workers() if parts is None else parts
    if (backend.name() != "numpy" or n <= 1 or n_blocks <= 1
            or threading.current_thread().name.startswith("minipar-kernel")):
        for i in range(n_blocks):
            fn(i)
        return
    blocks = iter(range(n_blocks))
    take = threading.Lock()

    def drain() -> None:
        while True:
            with take:
                i = next(blocks, None)
            if i is None:
                return
            fn(i)

    futures = [_pool(n).submit(drain) for _ in range(min(n, n_blocks) - 1)]
    try:
        drain()  # the calling thread works too
    finally:
        for f in futures:
            f.result()


def cache_rows(row_elements: int, target: int = 1 << 17) -> int:
    """Rows per slice so a slice of one array holds about ``target`` elements (512 KiB of
    float32). Each NumPy call on a slice costs a few microseconds of Python and of handing the
    GIL between workers; a slice must be large enough that this is small beside its work, yet
    small enough that a kernel's next pass finds it in cache. Measured on this repository's
    2-core machines (small preset, per call): 2^15 -> 2^17 elements took GELU from 2.4 to
    1.6 ms and LayerNorm from 1.1 to 0.6 ms; 2^18 gained nothing more on GELU."""
    return max(1, target // max(1, row_elements))

GEMM_BLOCK_ROWS = 64  # the least rows (or columns) of a block: below it BLAS runs far from peak
GEMM_BLOCKS_PER_WORKER = 2  # enough for a slowed worker to take fewer, few enough to stay large


def gemm_blocks(n: int, m: int, parts: int) -> tuple[str, int]:
    """How to cut an (n, m) product over ``parts`` workers: ("rows" | "cols", blocks).

    Measured at one BLAS thread on this machine's shapes (CPU time, so load does not matter):
    a block runs near BLAS's one-call rate (~100 GFLOP/s a core) while both of its output sides
    stay large, and falls to ~70% as one side shrinks to ~50: the weight gradient x^T dy cut
    into 8 row blocks of 48 rows ran at 68-76 GFLOP/s, cut into 4 column blocks at 92-94. So
    cut the side that stays larger, and only into 2 blocks per worker."""
    axis = "cols" if m > 2 * n else "rows"
    side = m if axis == "cols" else n
    return axis, max(1, min(GEMM_BLOCKS_PER_WORKER * parts, side // GEMM_BLOCK_ROWS))


def matmul(a, b):
    """a @ b for 2-D a (n, k) and b (k, m).

    Plain form: ``a @ b``. On the NumPy backend a large product is cut into blocks of rows of
    a (or of columns of b, ``gemm_blocks``), each one single-threaded BLAS call, taken by the
    rank's worker threads as they come free (``map_blocks``): with another process on a core,
    the other worker simply takes more blocks, where BLAS's own threads split the work in fixed
    halves and wait for the slower. The blocks depend only on the shape and the worker count,
    never on timing, so a result is reproducible bit for bit (the tests check it). It is close
    to the one-call result, not always the same bits: BLAS may round a block's rows differently
    from the whole product's (OpenBLAS's AVX-512 float32 kernels do), as it does when its own
    thread count changes."""
    xp = backend.xp()
    n, m = a.shape[0], b.shape[1]
    parts = workers()
    if (backend.name() != "numpy" or parts <= 1 or max(n, m) < 2 * GEMM_BLOCK_ROWS
            or n * m * a.shape[1] < (1 << 22)):
        return a @ b
    out = xp.empty((n, m), dtype=xp.result_type(a, b))  # (n, m)
    axis, blocks = gemm_blocks(n, m, parts)
    side = m if axis == "cols" else n
    bounds = [side * i // blocks for i in range(blocks + 1)]

    def block(i):
        lo, hi = bounds[i], bounds[i + 1]
        if axis == "rows":
            xp.matmul(a[lo:hi], b, out=out[lo:hi])  # (hi - lo, m)
        else:
            xp.matmul(a, b[:, lo:hi], out=out[:, lo:hi])  # (n, hi - lo)

    with one_blas_thread():
        map_blocks(block, blocks)
    return out


__all__ = ["workers", "one_blas_thread", "row_slices", "map_rows", "map_blocks", "cache_rows",
           "matmul", "gemm_blocks", "MIN_ROWS_ELEMENTS", "GEMM_BLOCK_ROWS"]
