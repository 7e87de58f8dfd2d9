"""The cost model and simulator: every formula once (parameters, FLOPs, bytes, activation
memory), the discrete-event simulator that times a pipeline program, hardware and model
presets. Its byte counts are checked against the runtime's, so it may import ``models`` and the
layers below to lay out the very same buffers; never the engine or the commands.
"""
