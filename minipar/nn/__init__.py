"""Serial building blocks: kernel pairs with hand-written backward (``functional``), ``Param``
and ``Module`` with per-microbatch caches (``module``), optimizers (``optim``), the activation
meter (``memory``). Knows nothing of ranks: may import ``backend`` and ``config`` only.
"""
