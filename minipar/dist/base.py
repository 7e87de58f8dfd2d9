"""The ``Comm`` interface that both worlds share: checks, the group-of-one shortcut, accounting.

Each public method here validates its arguments, returns at once on a group of one, makes the
input contiguous, times the call and records it in ``self.stats``. A world (``threads.py``,
``mpi_comm.py``) only supplies the raw data movement in the ``_`` primitives. Because the wrapper
is written once, the thread world and the MPI world cannot drift apart in semantics or in
accounting. See ``minipar.dist.comm`` for what each collective does and costs.
"""

from __future__ import annotations

import pickle
from abc import ABC, abstractmethod
from time import perf_counter
from typing import Any, Callable, Iterable, Sequence

from minipar import backend
from minipar.dist.stats import CommStats, wire_bytes

REDUCE_OPS = ("sum", "avg", "max")
PICKLE_PROTOCOL = pickle.HIGHEST_PROTOCOL  # the object ops' byte counts are of this pickle


class CommError(RuntimeError):
    """A collective was called wrongly (bad op or axis, sizes not divisible, ranks disagree)."""


class CommAborted(RuntimeError):
    """Another rank of the in-process world failed, so this rank's wait can never complete."""


class CommDeadlock(RuntimeError):
    """A wait in the in-process world timed out, or waits on a rank that has already returned."""


class Request:
    """A pending non-blocking operation. ``wait()`` completes it and returns its result.

    Waiting twice is allowed and returns the same result (like ``MPI_Wait`` on a completed
    request, which is a no-op).
    """

    def __init__(self, complete: Callable[[], Any]) -> None:
        self._complete: Callable[[], Any] | None = complete
        self._result: Any = None

    @classmethod
    def completed(cls, result: Any = None) -> "Request":
        req = cls(lambda: result)
        req.wait()
        return req

    def wait(self) -> Any:
        if self._complete is not None:
            self._result = self._complete()
            self._complete = None
        return self._result

    @property
    def done(self) -> bool:
        return self._complete is None

    @staticmethod
    def waitall(requests: Iterable["Request"]) -> list:
        return [r.wait() for r in requests]


def describe_call(desc: tuple) -> str:
    """``("allreduce", (3,), "<f8", "sum")`` -> ``allreduce((3,), <f8, sum)``."""
    return f"{desc[0]}({', '.join(str(d) for d in desc[1:])})"


def call_site() -> str:
    """``file:line`` of the innermost caller outside minipar.dist: where a collective was
    called from, for mismatch reports."""
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    frame = sys._getframe(1)
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{os.path.relpath(frame.f_code.co_filename)}:{frame.f_lineno}"


def mismatch_error(comm: "Comm", descs: Sequence[tuple], sites: Sequence[str] | None = None
                   ) -> CommError:
    """The error every rank raises when the ranks of a group made different collective calls.

    Names the first rank whose call differs from rank 0's, then every rank's call (and call
    site, when known).
    """
    first = next((r for r, d in enumerate(descs) if d != descs[0]), 0)
    at = (lambda r: f" at {sites[r]}") if sites else (lambda r: "")
    calls = "; ".join(f"rank {r}: {describe_call(d)}{at(r)}" for r, d in enumerate(descs))
    return CommError(f"{comm!r}: rank {first} disagrees with rank 0 on a collective call (every "
                     f"rank must make the same call with the same shape and dtype): {calls}")


def _contiguous(x):
    # 0-d arrays are always contiguous, so this never turns a scalar into a 1-d array.
    return x if x.flags.c_contiguous else backend.xp().ascontiguousarray(x)


# Axis moves as one transpose with an explicit permutation: ``xp.moveaxis`` normalises its
# arguments in Python and costs ~10 us a call, more than the rest of a collective's wrapper.
def _move_first(a, axis: int):
    """A view of ``a`` with its axis 0 moved to position ``axis``."""
    perm = list(range(1, a.ndim))
    perm.insert(axis, 0)
    return a.transpose(perm)


def _move_to_front(a, axis: int):
    """A view of ``a`` with axis ``axis`` moved to position 0."""
    return a.transpose([axis, *(i for i in range(a.ndim) if i != axis)])


def _as_array(x):
    xp = backend.xp()
    return x if isinstance(x, xp.ndarray) else xp.asarray(x)


class Comm(ABC):
    """A group of ranks and the collectives between them; see ``minipar.dist.comm``."""

    rank: int
    size: int
    name: str
    stats: CommStats

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name}, rank {self.rank} of {self.size})"

    def describe(self) -> str:
        return repr(self)

    # ---- argument checks, identical on every rank so that every rank fails the same way ----

    def _check_reduce(self, call: str, op: str, dtype) -> None:
        if op not in REDUCE_OPS:
            raise CommError(f"{self!r}: {call}(op={op!r}): op must be one of {REDUCE_OPS}")
        if op == "avg" and dtype.kind not in "fc":
            raise CommError(f"{self!r}: {call}(op='avg') needs a floating dtype, got {dtype}")

    def _axis(self, call: str, axis: int, ndim: int) -> int:
        if ndim == 0:
            raise CommError(f"{self!r}: {call} needs an array with at least one axis, got 0-d")
        if not -ndim <= axis < ndim:
            raise CommError(f"{self!r}: {call}(axis={axis}) is out of range for {ndim}-d input")
        return axis % ndim

    def _peer(self, call: str, peer: int, tag: int) -> None:
        if not isinstance(peer, int) or not 0 <= peer < self.size or peer == self.rank:
            raise CommError(f"{self!r}: {call}: peer {peer!r} must be another rank in "
                            f"0..{self.size - 1}")
        if not isinstance(tag, int) or tag < 0:
            raise CommError(f"{self!r}: {call}: tag must be a non-negative int, got {tag!r}")

    def _record(self, op: str, nbytes: int, t0: float) -> None:
        self.stats.record(op, nbytes, wire_bytes(op, nbytes, self.size), perf_counter() - t0)

    # ---- collectives ----

    def allreduce(self, x, op: str = "sum"):
        """Every rank gets the elementwise reduction of all ranks' ``x``, as a new array."""
        x = _as_array(x)
        self._check_reduce("allreduce", op, x.dtype)
        if self.size == 1:
            return x
        t0 = perf_counter()
        out = self._allreduce(_contiguous(x), _prim(op), ("allreduce", x.shape, x.dtype.str, op))
        if op == "avg":
            out /= self.size
        self._record("allreduce", x.nbytes, t0)
        return out

    def allreduce_(self, x, op: str = "sum") -> None:
        """In-place allreduce of a contiguous array (big gradient buffers: no extra copy)."""
        self._check_inplace("allreduce_", x, op)
        if self.size == 1:
            return
        t0 = perf_counter()
        self._allreduce_inplace(x, _prim(op), ("allreduce", x.shape, x.dtype.str, op))
        if op == "avg":
            x /= self.size
        self._record("allreduce", x.nbytes, t0)

    def iallreduce_(self, x, op: str = "sum") -> Request:
        """Start an in-place allreduce; ``wait()`` finishes it. Do not touch ``x`` until then."""
        self._check_inplace("iallreduce_", x, op)
        if self.size == 1:
            return Request.completed()
        t0 = perf_counter()
        finish = self._iallreduce_inplace(x, _prim(op), ("allreduce", x.shape, x.dtype.str, op))
        self._record("allreduce", x.nbytes, t0)

        def complete() -> None:
            t1 = perf_counter()
            finish()
            if op == "avg":
                x[...] /= self.size  # x[...]: x is the caller's array, not a local name
            self.stats.add_seconds("allreduce", perf_counter() - t1)
        return Request(complete)

    def _check_inplace(self, call: str, x, op: str) -> None:
        if not isinstance(x, backend.xp().ndarray) or not x.flags.c_contiguous:
            raise CommError(f"{self!r}: {call} needs a C-contiguous array to update in place")
        self._check_reduce(call, op, x.dtype)

    def allgather(self, x, axis: int = 0):
        """Concatenate every rank's ``x`` (same shape on all ranks) along ``axis``, rank order."""
        x = _as_array(x)
        axis = self._axis("allgather", axis, x.ndim)
        if self.size == 1:
            return x
        t0 = perf_counter()
        stacked = self._allgather(_contiguous(x), ("allgather", x.shape, x.dtype.str, axis))
        shape = x.shape[:axis] + (self.size * x.shape[axis],) + x.shape[axis + 1:]
        # (p, *shape) -> rank index next to `axis`, then merge the two: rank-major concatenation.
        # Along axis 0 that is only a reshape of the contiguous result (a view, no copy).
        out = stacked.reshape(shape) if axis == 0 else _move_first(stacked, axis).reshape(shape)
        self._record("allgather", out.nbytes, t0)
        return out

    def reduce_scatter(self, x, axis: int = 0, op: str = "sum"):
        """This rank's ``1/size`` slice along ``axis`` of the reduction of all ranks' ``x``."""
        x = _as_array(x)
        axis = self._axis("reduce_scatter", axis, x.ndim)
        self._check_reduce("reduce_scatter", op, x.dtype)
        n = x.shape[axis]
        if n % self.size:
            raise CommError(f"{self!r}: reduce_scatter: axis {axis} has length {n}, which is not "
                            f"divisible by the group size {self.size}")
        if self.size == 1:
            return x
        t0 = perf_counter()
        # The world reduces along axis 0: other axes are moved there and back (copies); axis 0
        # costs nothing more than making the input contiguous.
        front = _contiguous(x if axis == 0 else _move_to_front(x, axis))
        out = self._reduce_scatter(front, _prim(op),
                                   ("reduce_scatter", x.shape, x.dtype.str, axis, op))
        if op == "avg":
            out /= self.size
        if axis:
            out = backend.xp().ascontiguousarray(_move_first(out, axis))
        self._record("reduce_scatter", x.nbytes, t0)
        return out

    def broadcast(self, x, root: int = 0):
        """Every rank gets ``root``'s ``x`` (all pass the same shape and dtype; root gets x)."""
        x = _as_array(x)
        if not isinstance(root, int) or not 0 <= root < self.size:
            raise CommError(f"{self!r}: broadcast: root {root!r} is not a rank in "
                            f"0..{self.size - 1}")
        if self.size == 1:
            return x
        t0 = perf_counter()
        desc = ("broadcast", x.shape, x.dtype.str, root)
        if self.rank == root:
            self._broadcast(_contiguous(x), root, desc)
            out = x
        else:
            out = self._broadcast(x, root, desc)
        self._record("broadcast", x.nbytes, t0)
        return out

    def barrier(self) -> None:
        """Wait until every rank of the group has arrived."""
        if self.size == 1:
            return
        t0 = perf_counter()
        self._barrier(("barrier",))
        self._record("barrier", 0, t0)

    # ---- point to point ----

    def send(self, x, dest: int, tag: int = 0) -> None:
        """Send ``x`` to rank ``dest``; messages of one (source, dest, tag) arrive in order."""
        x = _as_array(x)
        self._peer("send", dest, tag)
        t0 = perf_counter()
        self._send(_contiguous(x), dest, tag)
        self._record("send", x.nbytes, t0)

    def recv(self, shape, dtype, source: int, tag: int = 0):
        """Receive the next message from ``source`` with ``tag`` as a new array."""
        shape, dtype = _shape(shape), backend.xp().dtype(dtype)
        self._peer("recv", source, tag)
        t0 = perf_counter()
        out = self._recv(shape, dtype, source, tag)
        self._record("recv", out.nbytes, t0)
        return out

    def recv_any(self, shape, dtype, tag: int = 0):
        """Receive the next message with ``tag`` from whichever rank sent one first
        (``MPI_ANY_SOURCE``); returns ``(array, source)``. A parameter server uses it to serve
        workers in the order they arrive, with no barrier."""
        shape, dtype = _shape(shape), backend.xp().dtype(dtype)
        if self.size == 1:
            raise CommError(f"{self!r}: recv_any: a group of one has nobody to receive from")
        if not isinstance(tag, int) or tag < 0:
            raise CommError(f"{self!r}: recv_any: tag must be an int >= 0, got {tag!r}")
        t0 = perf_counter()
        out, source = self._recv_any(shape, dtype, tag)
        self._record("recv", out.nbytes, t0)
        return out, source

    def isend(self, x, dest: int, tag: int = 0) -> Request:
        """Start a send; ``wait()`` returns None once ``x`` may be reused."""
        x = _as_array(x)
        self._peer("isend", dest, tag)
        t0 = perf_counter()
        finish = self._isend(_contiguous(x), dest, tag)
        self._record("send", x.nbytes, t0)
        return Request(self._timed_finish("send", finish))

    def irecv(self, shape, dtype, source: int, tag: int = 0) -> Request:
        """Post a receive; ``wait()`` returns the array. Posting order decides matching order."""
        shape, dtype = _shape(shape), backend.xp().dtype(dtype)
        self._peer("irecv", source, tag)
        t0 = perf_counter()
        finish = self._irecv(shape, dtype, source, tag)
        self._record("recv", _nbytes(shape, dtype), t0)
        return Request(self._timed_finish("recv", finish))

    def _timed_finish(self, op: str, finish: Callable[[], Any]) -> Callable[[], Any]:
        def complete() -> Any:
            t1 = perf_counter()
            result = finish()
            self.stats.add_seconds(op, perf_counter() - t1)
            return result
        return complete

    # ---- groups and control-path objects ----

    def split(self, color: int, key: int, name: str) -> "Comm":
        """Collective: ranks with equal ``color`` form a new group, ordered by (key, rank)."""
        if not isinstance(color, int) or color < 0 or not isinstance(key, int):
            raise CommError(f"{self!r}: split: color must be an int >= 0 and key an int, got "
                            f"color={color!r}, key={key!r}")
        return self._split(color, key, name)

    def allgather_obj(self, obj) -> list:
        """Every rank's ``obj`` in rank order (pickled; control path only)."""
        if self.size == 1:
            return [obj]
        t0 = perf_counter()
        payloads = self._allgather_bytes(pickle.dumps(obj, PICKLE_PROTOCOL), ("allgather_obj",))
        self._record("object", sum(len(b) for b in payloads), t0)
        return [pickle.loads(b) for b in payloads]

    def bcast_obj(self, obj, root: int = 0):
        """``root``'s ``obj`` on every rank (pickled; control path only)."""
        if not isinstance(root, int) or not 0 <= root < self.size:
            raise CommError(f"{self!r}: bcast_obj: root {root!r} is not a rank in "
                            f"0..{self.size - 1}")
        if self.size == 1:
            return obj
        t0 = perf_counter()
        mine = pickle.dumps(obj, PICKLE_PROTOCOL) if self.rank == root else None
        payload = self._bcast_bytes(mine, root, ("bcast_obj", root))
        self._record("object", len(payload), t0)
        return obj if self.rank == root else pickle.loads(payload)

    # ---- what a world implements: raw movement of contiguous arrays, no checks, no stats ----

    @abstractmethod
    def _allreduce(self, x, op: str, desc: tuple): ...
    @abstractmethod
    def _allreduce_inplace(self, x, op: str, desc: tuple) -> None: ...
    @abstractmethod
    def _iallreduce_inplace(self, x, op: str, desc: tuple) -> Callable[[], None]: ...
    @abstractmethod
    def _allgather(self, x, desc: tuple): ...  # -> (p, *x.shape)
    @abstractmethod
    def _reduce_scatter(self, x, op: str, desc: tuple): ...  # along axis 0
    @abstractmethod
    def _broadcast(self, x, root: int, desc: tuple): ...  # non-root: a new array
    @abstractmethod
    def _barrier(self, desc: tuple) -> None: ...
    @abstractmethod
    def _send(self, x, dest: int, tag: int) -> None: ...
    @abstractmethod
    def _recv(self, shape: tuple, dtype, source: int, tag: int): ...
    @abstractmethod
    def _recv_any(self, shape: tuple, dtype, tag: int): ...  # -> (array, source)

    @abstractmethod
    def _isend(self, x, dest: int, tag: int) -> Callable[[], None]: ...
    @abstractmethod
    def _irecv(self, shape: tuple, dtype, source: int, tag: int) -> Callable[[], Any]: ...
    @abstractmethod
    def _split(self, color: int, key: int, name: str) -> "Comm": ...
    @abstractmethod
    def _allgather_bytes(self, payload: bytes, desc: tuple) -> list[bytes]: ...
    @abstractmethod
    def _bcast_bytes(self, payload: bytes | None, root: int, desc: tuple) -> bytes: ...


def _prim(op: str) -> str:
    """The reduction the world performs: "avg" is a sum divided afterwards."""
    return "max" if op == "max" else "sum"


def _shape(shape) -> tuple[int, ...]:
    return (int(shape),) if isinstance(shape, int) else tuple(int(s) for s in shape)


def _nbytes(shape: tuple[int, ...], dtype) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n
