"""Communication between ranks: the ``Comm`` protocol over MPI and over threads, its accounting
(``stats``), the rank mesh, ring algorithms, host staging for device arrays, and process set-up
(``launch``: BLAS threads before NumPy loads; ``mpirun``: start a job with a timeout). Knows
nothing of models: may import ``backend`` and ``config`` only.
"""
