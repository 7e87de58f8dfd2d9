"""Parallel layers and the step's machinery: tensor parallelism with its f/g ops (``tensor``),
zero-bubble's postponed weight gradients (``deferral``), data parallelism and ZeRO behind one
strategy protocol (``data``, ``zero``) over flat gradient buffers (``flat``), pipeline schedules
as data (``schedules``), their checker (``program_checks``) and the executor (``pipeline``).
May import ``dist``, ``nn`` and below; never a model family.
"""
