"""How device arrays reach MPI: straight from device memory, or staged through host buffers.

MPI moves bytes it can address. A host (NumPy) array it reads and writes in place. A device
(CuPy) array lives in GPU memory, which only a *CUDA-aware* MPI can address; ``MPIComm`` then
hands MPI the device buffer itself, after waiting for the GPU stream to finish the kernels that
produce it (MPI does not know about streams). Any other MPI would read garbage or crash, so the
bytes are *staged*: copied device -> host (d2h) into a host buffer (pinned memory, which the copy
engine can move by DMA), sent, and the received host buffer copied host -> device (h2d).

Staging costs two extra copies over PCIe per message and a host round trip; on a GPU node with
a fast interconnect (NVLink, InfiniBand with GPUDirect RDMA) CUDA-aware MPI avoids both.

The d2h copy is blocking: MPI must read finished bytes. The h2d copy is not: from pinned memory
it is queued on the stream and runs later, while the host goes on (and MPI may write the next
message into a recycled pinned block). The device holds each h2d source until the copy is
known done (``minipar.backend.devices``), so staging may drop its buffers at once.

Every staging copy is recorded in the communicator's ``CommStats.copies`` as ``"d2h"`` or
``"h2d"``, a table apart from ``ops``: a copy moves nothing between ranks, so the communication
counts stay those the cost model predicts. Bytes are the array's ``nbytes``, counted when the
copy is made; seconds are the copy's own time on the device (CUDA events around it), for an
h2d copy added once it is known to have run (at the latest at the next ``synchronize``), not
the time its call took to queue it. On a collective of ``p`` ranks with an input of ``n``
bytes, staging records:

    allreduce, allreduce_, iallreduce_   d2h n              h2d n
    allgather                            d2h n              h2d p * n
    reduce_scatter                       d2h n              h2d n / p
    broadcast                            d2h n (root)       h2d n (every other rank)
    send, isend / recv, irecv            d2h n (sender)     h2d n (receiver)

In direct mode nothing is staged, except ``iallreduce_`` (d2h n, h2d n) when the MPI's
non-blocking collectives cannot read device memory (``direct_nonblocking`` False).

Host arrays (the numpy backend) are never staged and record nothing. This module does no MPI
itself, so the staging logic is tested in-process with the strict backend's stand-in device.
"""

from __future__ import annotations

from typing import Any, Callable

from minipar import backend
from minipar.dist.stats import CommStats


class Staging:
    """The buffers one communicator gives MPI. ``direct``: device buffers (CUDA-aware MPI);
    ``direct_nonblocking``: for non-blocking collectives too (not every CUDA-aware MPI)."""

    def __init__(self, stats: CommStats, direct: bool, direct_nonblocking: bool = False) -> None:
        self.stats = stats
        self.direct = direct
        self.direct_nonblocking = direct and direct_nonblocking

    def _d2h(self, x):
        dev = backend.device()
        host = dev.host_empty(x.shape, x.dtype)
        self.stats.record_copy("d2h", host.nbytes, dev.copy_to_host(x, host))
        return host

    def _h2d(self, dst, host) -> None:
        self.stats.record_copy("h2d", host.nbytes, 0.0)  # its time is added once it has run
        backend.device().copy_from_host(dst, host,
                                        lambda s: self.stats.add_copy_seconds("h2d", s))

    def outgoing(self, x):
        """What MPI reads for the contiguous array ``x``."""
        dev = backend.device()
        if not dev.on_device:
            return x
        if self.direct:
            dev.synchronize()  # the kernels writing x must be done before MPI reads it
            return dev.device_buffer(x)
        return self._d2h(x)

    def incoming(self, shape: tuple, dtype) -> tuple[Any, Callable[[], Any]]:
        """(buffer MPI writes, finish) for a new array; ``finish()`` returns the array."""
        dev = backend.device()
        out = dev.xp.empty(shape, dtype=dtype)
        if not dev.on_device:
            return out, lambda: out
        if self.direct:
            dev.synchronize()  # kernels still reading recycled memory must finish first
            return dev.device_buffer(out), lambda: out
        host = dev.host_empty(shape, dtype)

        def finish():
            self._h2d(out, host)
            return out
        return host, finish

    def inplace(self, x, nonblocking: bool = False) -> tuple[Any, Callable[[], None]]:
        """(buffer MPI reads and overwrites, write_back) for an in-place update of ``x``;
        ``nonblocking``: for a non-blocking collective (direct only if MPI allows it there)."""
        dev = backend.device()
        if not dev.on_device:
            return x, lambda: None
        if self.direct_nonblocking if nonblocking else self.direct:
            dev.synchronize()
            return dev.device_buffer(x), lambda: None
        host = self._d2h(x)
        return host, lambda: self._h2d(x, host)
