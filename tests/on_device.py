"""Host data in, host data out, whatever the backend: how a test drives device kernels.

Under ``MINIPAR_BACKEND=strict`` (or ``cupy``) the suite runs on a device, whose arrays refuse
to meet host arrays. A test keeps its reference computations in NumPy on the host and moves
data explicitly: ``up`` uploads every host array in a (nested) argument, ``down`` downloads every
device array in a result, and ``OnBackend(module)`` wraps a module's functions with both, so
that ``F.linear_fwd(x, w)`` reads the same in a test on any backend. On NumPy all three are
the identity (no copies).
"""

from __future__ import annotations

from types import ModuleType

import numpy as np

from minipar import backend


def _tree(obj, leaf, convert):
    if leaf(obj):
        return convert(obj)
    if type(obj) is tuple:
        return tuple(_tree(o, leaf, convert) for o in obj)
    if type(obj) is list:
        return [_tree(o, leaf, convert) for o in obj]
    if type(obj) is dict:
        return {k: _tree(v, leaf, convert) for k, v in obj.items()}
    return obj


def up(obj):
    """``obj`` with every host (NumPy) array in it uploaded to the backend's device."""
    if not backend.on_device():
        return obj
    return _tree(obj, lambda a: isinstance(a, np.ndarray), backend.from_host)


def down(obj):
    """``obj`` with every array of the backend in it copied to the host."""
    if not backend.on_device():
        return obj
    return _tree(obj, lambda a: isinstance(a, backend.xp().ndarray), backend.to_host)


def on_backend(fn):
    """``fn`` run on the backend's device, taking and returning host arrays."""
    def run(*args, **kwargs):
        return down(fn(*up(args), **up(kwargs)))
    run.__name__ = getattr(fn, "__name__", "fn")
    return run


class OnBackend:
    """A module whose functions run on the backend's device from and to host arrays."""

    def __init__(self, module: ModuleType) -> None:
        self._module = module

    def __getattr__(self, name: str):
        obj = getattr(self._module, name)
        return on_backend(obj) if callable(obj) and not isinstance(obj, type) else obj
