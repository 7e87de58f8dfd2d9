"""The cost model and simulator, where every number is written once: parameters, FLOPs, ZeRO
memory and the activation table (``costmodel``), the bytes of every collective
(``comm_volume``), their time on a cluster (``timing``, ``hardware``, ``kernels``), the
discrete-event simulator that times a pipeline program (``simulator``), the pipeline partition
(``partition``), published models and runs (``presets``), and the measurement of a block's
activations that the table is checked against (``activations``). Its counts are checked against
the runtime's, so it may import ``models`` and the layers below to lay out the very same
buffers; never the engine or the commands.
"""
