"""Fine-tuning under real mpirun: the properties of tests/test_finetune.py, one process per rank
(run with 2 and 4 ranks by tests/test_mpi_launch.py).

The command (``minipar.train.cli.main`` on the job's world) pre-trains and saves a checkpoint
in one layout; every rank then loads it and fine-tunes in another layout, with some parameters
frozen, and compares with the serial fine-tuning run it computes by itself: exact weights at
step 0, losses, gradients and updated weights equal, frozen weights bit for bit unchanged.
"""

from __future__ import annotations

import shutil
import tempfile

from test_finetune import PRETRAIN, check_fine_tuned, fine_tune, serial_fine_tune
from minipar import checkpoint
from minipar.config import ParallelConfig
from minipar.dist.assertions import collective_assert
from minipar.train.cli import main

# ranks -> [(layout the command saves in, layout fine-tuning runs in, frozen prefixes)]
CASES = {
    2: [(["--dp", "2", "--zero", "3"], ParallelConfig(tp=2, sequence_parallel=True),
         ("blocks.0",)),
        (["--tp", "2"], ParallelConfig(pp=2, microbatches=2), ("pos", "embed", "blocks.0")),
        (["--pp", "2"], ParallelConfig(dp=2, zero=3), ("blocks.1", "head"))],
    4: [(["--tp", "2", "--pp", "2", "--microbatches", "2"], ParallelConfig(dp=2, tp=2, zero=2),
         ("embed", "blocks.0")),
        (["--dp", "4", "--zero", "3"], ParallelConfig(dp=2, pp=2, zero=1),
         ("blocks.1.mlp", "ln_f")),
        (["--dp", "2", "--tp", "2", "--zero", "1"], ParallelConfig(dp=4, zero=3),
         ("pos", "blocks.0.attn"))],
}


def test_init_from_another_layout_equals_serial_under_mpi(world):
    directory = world.allgather_obj(tempfile.mkdtemp(prefix="minipar-ft-")
                                    if world.rank == 0 else None)[0]
    for k, (save, par, freeze) in enumerate(CASES.get(world.size, [])):
        run_dir = f"{directory}/case{k}"
        code = main([*PRETRAIN, *save, "--save", run_dir], world=world)
        collective_assert(world, code == 0, f"pre-training as {save} failed ({code})")
        world.barrier()  # rank 0's checkpoint is complete before anyone reads it
        saved, _, _ = checkpoint.load_weights(run_dir)
        result = fine_tune(world, par, saved, freeze)
        bad = check_fine_tuned(result, serial_fine_tune(saved, freeze), saved, freeze)
        collective_assert(world, not bad, f"saved as {save}, fine-tuned as {par}: {bad[:3]}")
    collective_assert(world, world.size in CASES, f"no fine-tuning case for {world.size} ranks")
    world.barrier()
    if world.rank == 0:
        shutil.rmtree(directory, ignore_errors=True)
