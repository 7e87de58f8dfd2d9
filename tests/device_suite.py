"""The parallel == serial tests that must also pass on a device backend.

``MINIPAR_BACKEND=strict python -m pytest`` runs the whole suite on the CPU stand-in for a GPU;
``MINIPAR_BACKEND=cupy`` on a real one. The normal CI run cannot afford the whole suite twice,
so it runs this subset on the stand-in (``tests/test_device_suite.py``): the properties that
every layout equals the serial run, whose data must cross to the device and back explicitly.
``.ci/gpu`` runs the GPU list on a GPU node. ``python tests/device_suite.py [--gpu]`` prints
the node ids, one per line.
"""

from __future__ import annotations

import sys

# Each well under a minute on the stand-in: every dp option, every schedule, tp on every kind of
# stage and under ZeRO, and the staged in-process world.
PARALLEL_EQUALS_SERIAL = (
    "tests/test_data_parallel.py::test_data_parallel_equals_serial_and_moves_the_theoretical_bytes",
    "tests/test_pipeline.py::test_pipeline_equals_serial",
    "tests/test_tensor_parallel.py::test_tp_traffic_of_every_pipeline_stage_is_the_formula",
    "tests/test_tensor_parallel.py::"
    "test_under_zero_each_dp_rank_sums_its_shard_of_the_partial_gradients",
)

# On a GPU node time is cheaper: the drawn tp layouts too, and the kernels against central
# differences (which also run each kernel once on the GPU).
ON_GPU = PARALLEL_EQUALS_SERIAL + (
    "tests/test_tensor_parallel.py::test_tensor_parallel_training_equals_serial",
    "tests/test_functional.py",
    "tests/test_blockwise.py",
    "tests/test_model.py",
    "tests/test_dropout.py",  # masks drawn on the host, uploaded: equal on the device too
    "tests/test_dropout_layouts.py::test_each_axis_with_dropout_equals_serial",
)

if __name__ == "__main__":
    print("\n".join(ON_GPU if "--gpu" in sys.argv[1:] else PARALLEL_EQUALS_SERIAL))
