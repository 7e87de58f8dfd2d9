"""Communication events in a trace: a ``Comm`` that records a span around every collective.

``TracedComm`` wraps a communicator and forwards everything to it; each collective call also
becomes an event of ``minipar.observe.trace.Tracer`` (kind ``allreduce``, ``allgather``, ...; name
``allreduce tp``; args: group and payload bytes). Semantics and byte accounting are the wrapped
Comm's own: the wrapper calls the same method and shares its ``stats``. Point-to-point calls
pass through untraced: the pipeline executor already records each send and receive with the
microbatch it carries. A group of one moves nothing and records nothing.

``traced_mesh`` gives a mesh whose groups are wrapped, so every layer built from it (tensor
parallel f/g, data parallel sync, the engine's metrics allreduce) is traced without a change.
"""

from __future__ import annotations

import copy
from typing import Any

from minipar.dist.base import Request

# Comm method -> event kind (the names minipar.observe.trace puts on the communication row).
TRACED = {
    "allreduce": "allreduce", "allreduce_": "allreduce", "iallreduce_": "allreduce",
    "allgather": "allgather", "reduce_scatter": "reduce_scatter", "broadcast": "broadcast",
    "barrier": "collective", "allgather_obj": "collective", "bcast_obj": "collective",
}


# Point-to-point calls traced on a group made with ``p2p=True`` (cp: nothing else records them).
P2P = {"isend": "send", "irecv": "recv"}


def _nbytes(args: tuple) -> int:
    x = args[0] if args else None
    return int(getattr(x, "nbytes", 0))


class TracedComm:
    """``comm`` with a tracer span around each collective; every other attribute is ``comm``'s."""

    def __init__(self, comm, tracer, p2p: bool = False) -> None:
        self._comm = comm
        self._tracer = tracer
        self._p2p = p2p  # trace isend/irecv too (the ring of context parallelism)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._comm, name)
        kind = TRACED.get(name) or (P2P.get(name) if self._p2p else None)
        if kind is None or self._comm.size == 1:
            return attr
        group = self._comm.name
        tracer = self._tracer

        def traced(*args, **kwargs):
            label = f"{name.rstrip('_')} {group}"
            with tracer.span(label, kind, group=group, bytes=_nbytes(args)):
                out = attr(*args, **kwargs)
            if isinstance(out, Request):  # non-blocking: its wait is an event of its own
                return Request(lambda: _traced_wait(tracer, out, f"wait {label}", kind, group))
            return out

        return traced

    def __repr__(self) -> str:
        return f"Traced{self._comm!r}"


def _traced_wait(tracer, req: Request, label: str, kind: str, group: str):
    with tracer.span(label, kind, group=group):
        return req.wait()


def traced_mesh(mesh, tracer):
    """A copy of ``mesh`` whose world, dp, pp, tp, cp and gradient groups record collectives in
    ``tracer`` (cp its ring's sends and receives too)."""
    out = copy.copy(mesh)
    for name in ("world", "dp", "pp", "tp"):
        setattr(out, name, TracedComm(getattr(mesh, name), tracer))
    if hasattr(mesh, "cp"):
        out.cp = TracedComm(mesh.cp, tracer, p2p=True)
        out.grad = out.dp if mesh.grad is mesh.dp else TracedComm(mesh.grad, tracer)
    return out


__all__ = ["TracedComm", "traced_mesh", "TRACED"]
