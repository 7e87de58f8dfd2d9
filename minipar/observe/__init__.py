"""Seeing a run: Chrome traces of every rank's events (``trace``) and pictures of timelines and
loss curves (``render``, matplotlib). Reads programs, simulator timelines and recorded events;
may import ``parallel`` (programs) and the layers below, never the engine or the commands.
"""
