"""``python -m minipar.train``: the training command.

``cli`` parses and validates the flags (one line per bad flag, on every rank, before any
collective); ``loop`` runs the steps, evaluations, checkpoints and reports. May import every
layer below the commands.
"""
