"""minipar: data, tensor and pipeline parallel Transformer training, by hand, in NumPy and MPI."""

__version__ = "0.1.0"
