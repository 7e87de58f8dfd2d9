"""The rank mesh on thread worlds: coordinates, groups, validation (also run under MPI)."""

from __future__ import annotations

import numpy as np
import pytest

from accounting_cases import check_mesh, check_mesh_layouts, factorizations
from minipar.dist.comm import local_comm, run_threads
from minipar.dist.mesh import LayoutError, Mesh, validate_layout
from on_device import up


@pytest.mark.parametrize("world_size", (1, 2, 4, 8))
def test_every_layout_of_the_world(world_size):
    run_threads(check_mesh_layouts, world_size)


def test_factorizations_are_complete():
    assert sorted(factorizations(4)) == sorted(
        [(1, 1, 4), (1, 2, 2), (1, 4, 1), (2, 1, 2), (2, 2, 1), (4, 1, 1)])
    assert all(dp * pp * tp == 12 for dp, pp, tp in factorizations(12))
    assert len(factorizations(8)) == 10


def test_megatron_rank_order_dp2_pp2_tp2():
    """The worked example of the mesh module docstring."""
    def fn(world):
        mesh = Mesh(world, dp=2, pp=2, tp=2)
        return (mesh.describe(), mesh.tp.allgather_obj(world.rank),
                mesh.dp.allgather_obj(world.rank), mesh.pp.allgather_obj(world.rank))
    out = run_threads(fn, 8)
    assert out[5][0] == "DP(2)-PP(2)-TP(2) rank 5"
    assert [o[1] for o in out[::2]] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert sorted({tuple(o[2]) for o in out}) == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert sorted({tuple(o[3]) for o in out}) == [(0, 4), (1, 5), (2, 6), (3, 7)]


def test_validate_layout_messages():
    validate_layout(8, 2, 2, 2)
    with pytest.raises(LayoutError) as info:
        validate_layout(8, 2, 2, 1)
    assert str(info.value) == "dp x pp x tp = 2 x 2 x 1 = 4 does not equal the world size 8"
    for bad in (0, -1, 1.0, True, "2"):
        with pytest.raises(LayoutError, match="pp must be a positive integer"):
            validate_layout(2, 2, bad, 1)


def test_bad_layout_fails_on_every_rank_before_any_collective():
    def fn(world):
        try:
            Mesh(world, dp=3)
        except LayoutError as exc:
            return str(exc), world.stats.as_dict()
    out = run_threads(fn, 4, timeout=5)
    assert out == [("dp x pp x tp = 3 x 1 x 1 = 3 does not equal the world size 4", {})] * 4


def test_serial_mesh_is_all_no_ops():
    mesh = Mesh.serial()
    assert (mesh.dp_size, mesh.pp_size, mesh.tp_size) == (1, 1, 1)
    assert mesh.is_first_stage and mesh.is_last_stage
    assert mesh.next_stage is None and mesh.prev_stage is None
    x = up(np.ones(3))
    assert mesh.dp.allreduce(x) is x and mesh.tp.allgather(x) is x
    assert mesh.stats() == {"world": {}}
    assert mesh.describe() == "DP(1)-PP(1)-TP(1) rank 0"


def test_rank_of_rejects_coordinates_outside_the_grid():
    mesh = Mesh(local_comm())
    with pytest.raises(LayoutError, match="tp coordinate 1"):
        mesh.rank_of(0, 0, 1)


def test_single_layout_check_runs_alone():
    run_threads(lambda world: check_mesh(world, 1, 2, 3), 6)
