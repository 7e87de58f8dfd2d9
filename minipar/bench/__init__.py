"""``python -m minipar.bench``: measure this machine and this code.

``step`` times a serial training step against the GEMM peak (the default); ``comm`` compares
minipar's collectives with raw mpi4py and measures data-parallel scaling (``--collectives``);
``probe`` and ``validate`` measure this machine for the cost model and compare predicted with
measured step times (``--validate``, ``--measure-hardware``). Speed targets are checked here, by
measurement, never by timed tests. May import every layer below the commands.
"""
