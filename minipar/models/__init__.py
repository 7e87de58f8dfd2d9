"""The model families, built only from ``parallel``'s layers and ``nn``'s kernels: ``blocks``
(attention, MLP, the pre-LN block) and ``gpt`` (the decoder-only GPT, cut into pipeline chunks).
The same code is the serial model on a 1 x 1 x 1 mesh. May import ``parallel`` and below.
"""
