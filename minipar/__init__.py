"""minipar: data, tensor and pipeline parallel Transformer training, by hand, in NumPy and MPI.

Each folder is a layer that imports only from the layers below it (the import-linter contract in
``setup.cfg``; the README's "How the code holds together" draws it), from the bottom:
``config`` and ``backend``; ``nn`` and ``dist``; ``parallel``; ``models``; ``sim``; ``tasks``
and ``checkpoint``; ``engine``; ``compare``; ``observe``; the commands ``train``, ``simulate``,
``bench`` and ``lessons``.
"""

__version__ = "0.1.0"
