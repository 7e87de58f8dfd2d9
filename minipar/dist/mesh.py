"""The rank mesh: one grid dp x cp x pp x tp over a world ``Comm``, a sub-communicator per group.

Rank order follows Megatron-LM (Narayanan et al. 2021, PTD-P): tensor parallel fastest, then
context parallel, then data parallel, then pipeline parallel,

    world_rank = ((pp_rank * dp + dp_rank) * cp + cp_rank) * tp + tp_rank

so a tp group is consecutive ranks (the chattiest group stays inside one node, where bandwidth
is highest) and pp, which only passes activations between neighbours, is outermost. Example,
dp=2, pp=2, tp=2 (8 ranks):

    pp stage 0:  dp 0: tp ranks [0 1]    dp 1: tp ranks [2 3]
    pp stage 1:  dp 0: tp ranks [4 5]    dp 1: tp ranks [6 7]
    dp groups: {0,2} {1,3} {4,6} {5,7}     pp groups: {0,4} {1,5} {2,6} {3,7}

A layer gets the group it needs (``mesh.tp``, ``mesh.dp``, ``mesh.pp``); nothing is global, so
every rank of an in-process thread world can hold its own mesh.

Context parallelism (``cp``, ``minipar.parallel.context``) splits each sequence over the cp
group; its ranks see different tokens of the same rows, so for the gradients they are data
parallel ranks too: ``mesh.grad`` is the dp x cp group that sums (and, under ZeRO, shards) the
gradients, the same group as ``mesh.dp`` when cp = 1 (Megatron-LM's context parallelism does
the same). With cp = 1 the ranks are numbered exactly as before.
"""

from __future__ import annotations

from minipar.dist.comm import Comm, local_comm

GROUPS = ("world", "dp", "pp", "tp", "cp", "dpcp")


class LayoutError(ValueError):
    """A layout that does not fit the world (one clear line, raised before any collective)."""


def validate_layout(world_size: int, dp: int, pp: int, tp: int, cp: int = 1) -> None:
    """Raise ``LayoutError`` unless dp, pp, tp, cp are positive ints whose product is
    world_size.

    Pure and cheap, so the CLI can call it on every rank before building anything.
    """
    for flag, value in (("dp", dp), ("pp", pp), ("tp", tp), ("cp", cp)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise LayoutError(f"{flag} must be a positive integer, got {value!r}")
    if dp * pp * tp * cp != world_size:
        what = f"dp x pp x tp = {dp} x {pp} x {tp}" if cp == 1 else \
            f"dp x cp x pp x tp = {dp} x {cp} x {pp} x {tp}"
        raise LayoutError(f"{what} = {dp * pp * tp * cp} does not equal "
                          f"the world size {world_size}")


class Mesh:
    """One rank grid dp x cp x pp x tp over a world Comm, with a sub-communicator per group."""

    def __init__(self, world: Comm, dp: int = 1, pp: int = 1, tp: int = 1, cp: int = 1) -> None:
        validate_layout(world.size, dp, pp, tp, cp)  # on every rank, before any collective
        self.dp_size, self.pp_size, self.tp_size, self.cp_size = dp, pp, tp, cp
        r = world.rank
        self.tp_rank = r % tp
        self.cp_rank = (r // tp) % cp
        self.dp_rank = (r // (tp * cp)) % dp
        self.pp_rank = r // (tp * cp * dp)
        self.world = world
        # Each split is a collective on the world: every rank makes all of them, in this order.
        # A group's color numbers the other coordinates; its key is the rank inside it.
        pp_r, dp_r, cp_r, tp_r = self.pp_rank, self.dp_rank, self.cp_rank, self.tp_rank
        self.tp = world.split((pp_r * dp + dp_r) * cp + cp_r, tp_r, "tp")
        self.dp = world.split((pp_r * cp + cp_r) * tp + tp_r, dp_r, "dp")
        self.pp = world.split((dp_r * cp + cp_r) * tp + tp_r, pp_r, "pp")
        self.cp = world.split((pp_r * dp + dp_r) * tp + tp_r, cp_r, "cp")
        # The gradient group: dp x cp ranks that hold the same parameters (just dp when cp = 1).
        self.grad = self.dp if cp == 1 else world.split(pp_r * tp + tp_r, dp_r * cp + cp_r,
                                                        "dpcp")

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

    def rank_of(self, dp: int, pp: int, tp: int, cp: int = 0) -> int:
        """The world rank at grid coordinates (dp, pp, tp, cp)."""
        for flag, value, size in (("dp", dp, self.dp_size), ("pp", pp, self.pp_size),
                                  ("tp", tp, self.tp_size), ("cp", cp, self.cp_size)):
            if not 0 <= value < size:
                raise LayoutError(f"rank_of: {flag} coordinate {value} is outside 0..{size - 1}")
        return ((pp * self.dp_size + dp) * self.cp_size + cp) * self.tp_size + tp

    def describe(self) -> str:
        """``DP(2)-PP(2)-TP(2) rank 5`` (``DP(2)-CP(2)-PP(2)-TP(2)`` with context parallelism)."""
        cp = f"-CP({self.cp_size})" if self.cp_size > 1 else ""
        return (f"DP({self.dp_size}){cp}-PP({self.pp_size})-TP({self.tp_size}) "
                f"rank {self.world.rank}")

    def __repr__(self) -> str:
        return (f"Mesh({self.describe()}: dp {self.dp_rank}, cp {self.cp_rank}, "
                f"pp {self.pp_rank}, tp {self.tp_rank})")

    def grad_sync_view(self) -> "Mesh | GradSyncView":
        """The mesh as the data-parallel strategy sees it: ``dp`` is the gradient group
        (dp x cp ranks). The mesh itself when cp = 1."""
        return self if self.cp_size == 1 else GradSyncView(self)

    def comms(self) -> dict[str, Comm]:
        """Every group by name; "cp" and "dpcp" (the gradient group) only with cp > 1."""
        out = {"world": self.world, "dp": self.dp, "pp": self.pp, "tp": self.tp}
        if self.cp_size > 1:
            out.update(cp=self.cp, dpcp=self.grad)
        return out

    def stats(self) -> dict[str, dict]:
        """Per group ``CommStats.as_dict()``: the world, and every group with two or more ranks."""
        return {name: c.stats.as_dict() for name, c in self.comms().items()
                if name == "world" or c.size > 1}

    def reset_stats(self) -> None:
        for c in self.comms().values():
            c.stats.reset()


class GradSyncView:
    """A mesh whose ``dp`` group is the dp x cp gradient group: context-parallel ranks hold
    the same parameters and partial gradients of the same rows, so the strategies of
    ``minipar.parallel.data``/``zero`` sum, and under ZeRO shard, over dp x cp unchanged."""

    def __init__(self, mesh: Mesh) -> None:
        self._mesh = mesh
        self.dp = mesh.grad
        self.dp_rank = mesh.grad.rank
        self.dp_size = mesh.grad.size

    def __getattr__(self, name: str):
        return getattr(self._mesh, name)
