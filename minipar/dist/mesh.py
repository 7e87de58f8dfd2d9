"""The rank mesh: one grid dp x pp x tp over a world ``Comm``, with a sub-communicator per group.

Rank order follows Megatron-LM (Narayanan et al. 2021, PTD-P): tensor parallel fastest, then
data parallel, then pipeline parallel,

    world_rank = (pp_rank * dp + dp_rank) * tp + tp_rank

so a tp group is consecutive ranks (the chattiest group stays inside one node, where bandwidth
is highest) and pp, which only passes activations between neighbours, is outermost. Example,
dp=2, pp=2, tp=2 (8 ranks):

    pp stage 0:  dp 0: tp ranks [0 1]    dp 1: tp ranks [2 3]
    pp stage 1:  dp 0: tp ranks [4 5]    dp 1: tp ranks [6 7]
    dp groups: {0,2} {1,3} {4,6} {5,7}     pp groups: {0,4} {1,5} {2,6} {3,7}

A layer gets the group it needs (``mesh.tp``, ``mesh.dp``, ``mesh.pp``); nothing is global, so
every rank of an in-process thread world can hold its own mesh.
"""

from __future__ import annotations

from minipar.dist.comm import Comm, local_comm

GROUPS = ("world", "dp", "pp", "tp")


class LayoutError(ValueError):
    """A layout that does not fit the world (one clear line, raised before any collective)."""


def validate_layout(world_size: int, dp: int, pp: int, tp: int) -> None:
    """Raise ``LayoutError`` unless dp, pp, tp are positive ints with dp * pp * tp == world_size.

    Pure and cheap, so the CLI can call it on every rank before building anything.
    """
    for flag, value in (("dp", dp), ("pp", pp), ("tp", tp)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise LayoutError(f"{flag} must be a positive integer, got {value!r}")
    if dp * pp * tp != world_size:
        raise LayoutError(f"dp x pp x tp = {dp} x {pp} x {tp} = {dp * pp * tp} does not equal "
                          f"the world size {world_size}")


class Mesh:
    """One rank grid dp x pp x tp over a world Comm, with a sub-communicator per group."""

    def __init__(self, world: Comm, dp: int = 1, pp: int = 1, tp: int = 1) -> None:
        validate_layout(world.size, dp, pp, tp)  # on every rank, before the first collective
        self.dp_size, self.pp_size, self.tp_size = dp, pp, tp
        r = world.rank
        self.tp_rank = r % tp
        self.dp_rank = (r // tp) % dp
        self.pp_rank = r // (tp * dp)
        self.world = world
        # Each split is a collective on the world: every rank makes all three, in this order.
        self.tp = world.split(self.pp_rank * dp + self.dp_rank, self.tp_rank, "tp")
        self.dp = world.split(self.pp_rank * tp + self.tp_rank, self.dp_rank, "dp")
        self.pp = world.split(self.dp_rank * tp + self.tp_rank, self.pp_rank, "pp")

    @classmethod
    def serial(cls) -> "Mesh":
        """The 1 x 1 x 1 mesh of a serial run: every collective is a no-op."""
        return cls(local_comm())

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def next_stage(self) -> int | None:
        """The pp-group rank of the next pipeline stage (None on the last stage)."""
        return None if self.is_last_stage else self.pp_rank + 1

    @property
    def prev_stage(self) -> int | None:
        """The pp-group rank of the previous pipeline stage (None on the first stage)."""
        return None if self.is_first_stage else self.pp_rank - 1

    def rank_of(self, dp: int, pp: int, tp: int) -> int:
        """The world rank at grid coordinates (dp, pp, tp)."""
        for flag, value, size in (("dp", dp, self.dp_size), ("pp", pp, self.pp_size),
                                  ("tp", tp, self.tp_size)):
            if not 0 <= value < size:
                raise LayoutError(f"rank_of: {flag} coordinate {value} is outside 0..{size - 1}")
        return (pp * self.dp_size + dp) * self.tp_size + tp

    def describe(self) -> str:
        """``DP(2)-PP(2)-TP(2) rank 5``."""
        return (f"DP({self.dp_size})-PP({self.pp_size})-TP({self.tp_size}) "
                f"rank {self.world.rank}")

    def __repr__(self) -> str:
        return (f"Mesh({self.describe()}: dp {self.dp_rank}, pp {self.pp_rank}, "
                f"tp {self.tp_rank})")

    def comms(self) -> dict[str, Comm]:
        return {"world": self.world, "dp": self.dp, "pp": self.pp, "tp": self.tp}

    def stats(self) -> dict[str, dict]:
        """Per group ``CommStats.as_dict()``: the world, and every group with two or more ranks."""
        return {name: c.stats.as_dict() for name, c in self.comms().items()
                if name == "world" or c.size > 1}

    def reset_stats(self) -> None:
        for c in self.comms().values():
            c.stats.reset()
