"""A stand-in GPU for CPU machines: NumPy arrays behind a wall, as CuPy's arrays are.

Why: on a GPU node a kernel that quietly calls NumPy gets a host array, and mixing it with device
arrays fails (or worse, copies) at run time, far from CI, which has no GPU. Selecting this
backend (``backend.use("strict")`` or ``MINIPAR_BACKEND=strict``) makes every such crossing
fail on a CPU, with the same rules CuPy enforces:

- ``numpy.asarray(a)``, ``numpy.array(a)``, ``numpy.ascontiguousarray(a)``: ``TypeError``
  (implicit device -> host conversion);
- a device array meeting a NumPy array, in an operator, a ufunc, a namespace function, an index
  or an assignment: ``TypeError``;
- passing a device array to mpi4py: it has no buffer interface, so mpi4py refuses it (a real
  CuPy array would need a CUDA-aware MPI);
- reductions and scalar indexing return 0-d device arrays, never NumPy scalars, as CuPy does.

What is allowed is what CuPy allows: the ``strict`` namespace (``backend.xp()``) mirrors NumPy's
and returns device arrays; NumPy functions and ufuncs applied to device arrays only are run on
the device (CuPy dispatches them the same way, NEP 13/18); ``float(a)``, ``int(a)``,
``bool(a)``, ``a.item()``, ``a.tolist()``, ``a.get()`` and ``backend.to_host``/``from_host``
are the explicit crossings. Results equal NumPy's bit for bit: the same NumPy code runs behind
the wall.

Why not ``array-api-strict`` (whose arrays on a non-default device also refuse conversion): it
implements only the array API standard, and minipar's kernels are NumPy-style, as CuPy is: array
methods (``x.reshape``, ``x.sum``, ``x.swapaxes``, ``x.copy``, ``x.flags``), ``out=``,
``xp.add.at`` (no scatter-add exists in the standard) and integer-array indexing mixed with
slices. Running them on it would mean rewriting every kernel into a dialect CuPy does not need.

Like a GPU, the stand-in has devices and streams (``minipar.backend.stream``): each thread has a
current device (``select``) and a stream; an array lives on the device current when it was made,
a kernel refuses arrays of another device (as CuPy does without peer access, and with it warns),
``a.set(host)`` from pinned memory is queued on the stream, and every kernel runs after the
copies queued before it. ``StrictDevice`` (``minipar.backend.standin``) is the backend built
on it.
"""

from __future__ import annotations

import threading
from time import perf_counter
from types import ModuleType

import numpy

from minipar.backend.stream import Stream

_IMPLICIT = ("implicit conversion of a strict-device array to a NumPy array is not allowed "
             "(as with CuPy): use backend.to_host(a) explicitly")


def _mixed(where: str) -> TypeError:
    return TypeError(f"{where}: a host NumPy array meets a strict-device array (CuPy refuses "
                     "this too): create it with backend.xp() or upload it with "
                     "backend.from_host()")


class _Thread(threading.local):
    """This thread's current device and stream (CuPy keeps both per thread too)."""

    def __init__(self) -> None:
        self.device = 0
        self.stream = Stream()


THREAD = _Thread()


def select(device: int) -> None:
    """Make ``device`` this thread's current device (``cupy.cuda.Device(i).use()``)."""
    THREAD.device = device


def _elsewhere(where: str, a: "StrictArray", current: int) -> ValueError:
    return ValueError(f"{where}: the device where the array resides ({a._dev}) is different "
                      f"from the current device ({current}) (CuPy refuses this without peer "
                      "access, and warns with it): move it with xp.asarray(a) first")


def _enter(where: str, this: "StrictArray | None" = None, launch: bool = True) -> int:
    """A kernel launch: it runs after the copies queued on this thread's stream, on this
    thread's device, where ``this`` (the array whose method or operator runs) must live.
    An allocation (``launch=False``: ``xp.empty``) queues nothing and waits for nothing."""
    t = THREAD
    if launch:
        t.stream.launch()
    if this is not None and this._dev != t.device:
        raise _elsewhere(where, this, t.device)
    return t.device


def _unwrap(obj, where: str, dev: int, host_ok: bool = False):
    """Device arrays -> their NumPy storage; host arrays refused unless this is an upload,
    arrays of another device refused unless this is an upload (then copied, as CuPy does)."""
    if type(obj) is StrictArray:
        if obj._dev != dev:
            if not host_ok:
                raise _elsewhere(where, obj, dev)
            return obj._a.copy()  # a peer-to-peer copy onto this device
        return obj._a
    if isinstance(obj, numpy.ndarray):
        if host_ok:
            return obj.copy()  # an upload: the device copy is independent of the host one
        raise _mixed(where)
    if isinstance(obj, list):
        return [_unwrap(o, where, dev, host_ok) for o in obj]
    if type(obj) is tuple:
        return tuple(_unwrap(o, where, dev, host_ok) for o in obj)
    return obj


def _wrap(x, sources=()):
    """NumPy results -> device arrays; NumPy scalars become 0-d arrays, as in CuPy.

    A view of one of the ``sources`` (device arrays the result was computed from) gets the
    source's memory owner as its ``base``, so ``a.base`` is the same object on every call, as
    in CuPy and NumPy: memory accounting that follows ``base`` to the owner sees one array.
    """
    if isinstance(x, numpy.ndarray):
        w = StrictArray(x)
        if x.base is not None:
            root = next((s._owner() for s in sources if s._owner()._a is x.base), None)
            if root is not None:  # a view lives where its memory does
                w._root, w._dev = root, root._dev
        return w
    if isinstance(x, numpy.generic):
        return StrictArray(numpy.asarray(x), sources[0]._dev if sources else None)
    if type(x) is tuple:
        return tuple(_wrap(v, sources) for v in x)
    if isinstance(x, list):
        return [_wrap(v, sources) for v in x]
    return x


def _devices(args) -> list:
    """The device arrays among ``args`` (and in lists/tuples inside them)."""
    found = []
    for a in args:
        if type(a) is StrictArray:
            found.append(a)
        elif isinstance(a, (list, tuple)):
            found += _devices(a)
    return found


def _call(fn, where: str, args, kwargs, host_ok: bool = False, this=None, launch=True):
    dev = _enter(where, this, launch)
    out = kwargs.get("out")
    result = fn(*_unwrap(args, where, dev, host_ok),
                **{k: _unwrap(v, where, dev, host_ok) for k, v in kwargs.items()})
    if type(out) is StrictArray and result is out._a:
        return out  # in place: hand back the caller's own array
    sources = ([this] if this is not None else []) + _devices(args)
    return _wrap(result, sources)


class StrictArray:
    """A device array: NumPy storage that only the strict namespace and explicit copies reach."""

    __slots__ = ("_a", "_root", "_dev", "__weakref__")
    __hash__ = None  # type: ignore[assignment]

    def __init__(self, a: numpy.ndarray, dev: int | None = None) -> None:
        self._a = a
        self._root: StrictArray | None = None  # the device array owning a view's memory
        self._dev = THREAD.device if dev is None else dev  # the device holding the memory

    @property
    def device(self) -> int:
        """The index of the stand-in device holding this array (``cupy.ndarray.device.id``)."""
        return self._dev

    def _owner(self) -> "StrictArray":
        """The device array owning this one's memory (itself unless it is a view)."""
        return self if self._a.base is None else self.base

    @property
    def base(self) -> "StrictArray | None":
        """The device array whose memory this view uses (None when it owns its memory)."""
        if self._a.base is None:
            return None
        if self._root is None:  # memory NumPy allocated inside the op (a reshape's copy)
            self._root = StrictArray(self._a.base, self._dev)
        return self._root

    # -- the wall -----------------------------------------------------------------------------

    def __array__(self, *args, **kwargs):
        raise TypeError(_IMPLICIT)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        where = f"numpy.{ufunc.__name__}" + ("" if method == "__call__" else f".{method}")
        return _call(getattr(ufunc, method), where, inputs, kwargs)

    def __array_function__(self, func, types, args, kwargs):
        return _call(func, f"numpy.{func.__name__}", args, kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("_a", "_root", "_dev"):
            raise AttributeError(name)
        if name in ("data", "ctypes", "tobytes", "tofile", "dump", "dumps"):
            raise TypeError(f"a.{name} would read device memory from the host: {_IMPLICIT}")
        attr = getattr(self._a, name)
        if callable(attr):
            return lambda *args, **kwargs: _call(attr, f"ndarray.{name}", args, kwargs,
                                                 this=self)
        return _wrap(attr, (self,))  # .T, .real, ... are device arrays; .shape passes through

    # -- explicit crossings CuPy also has ------------------------------------------------------

    def get(self, out: numpy.ndarray | None = None) -> numpy.ndarray:
        """A host copy (``cupy.ndarray.get``, blocking: it synchronises this thread's stream),
        into ``out`` when given."""
        a = self._synced()
        t0 = perf_counter()
        if out is None:
            out = a.copy()
        else:
            numpy.copyto(out, a)
        THREAD.stream.last_seconds = perf_counter() - t0
        return out

    def set(self, host: numpy.ndarray):
        """Overwrite from a host array of the same dtype and shape (``cupy.ndarray.set``). From
        pinned memory the copy is only queued, as ``cudaMemcpyAsync`` queues it: ``host`` must
        hold its bytes until the stream has run the copy."""
        if not isinstance(host, numpy.ndarray):
            raise TypeError("Only numpy.ndarray can be set to a strict-device array")
        if host.dtype != self._a.dtype or host.shape != self._a.shape:
            raise ValueError(f"set: a {host.shape} {host.dtype} array cannot be set to a "
                             f"{self._a.shape} {self._a.dtype} one (CuPy requires both equal)")
        # CuPy returns None; the queued copy is returned here so that the device can time it.
        return THREAD.stream.copy_from_host(self._a, host)

    def _synced(self) -> numpy.ndarray:
        """The storage, once this thread's stream has finished (what a blocking read waits)."""
        THREAD.stream.synchronize()
        return self._a

    def __float__(self) -> float:
        return float(self._synced())

    def __int__(self) -> int:
        return int(self._synced())

    def __bool__(self) -> bool:
        return bool(self._synced())

    def __complex__(self) -> complex:
        return complex(self._synced())

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self):
        _enter("iteration", self)
        return (_wrap(row, (self,)) for row in self._a)

    def __repr__(self) -> str:
        return f"strict:{self._synced()!r}"

    def __format__(self, spec: str) -> str:
        a = self._synced()
        return format(a.item() if a.ndim == 0 else a, spec)

    def __reduce__(self):
        return (StrictArray, (self._synced(),))

    def __copy__(self) -> "StrictArray":
        _enter("copy", self)
        return StrictArray(self._a.copy(), self._dev)

    def __deepcopy__(self, memo) -> "StrictArray":
        return self.__copy__()

    # -- indexing -------------------------------------------------------------------------------

    def __getitem__(self, key):
        if _basic(key):  # a view (or one element): no kernel, from any device
            return _wrap(self._a[key], (self,))
        dev = _enter("indexing", self)
        return _wrap(self._a[_unwrap(key, "indexing", dev)], (self,))

    def __setitem__(self, key, value) -> None:
        dev = _enter("assignment", self)
        self._a[_unwrap(key, "indexing", dev)] = _unwrap(value, "assignment", dev)


def _basic(key) -> bool:
    """Basic indexing (ints, slices, None, ...): a view, which CuPy makes without a kernel."""
    parts = key if type(key) is tuple else (key,)
    return all(k is None or k is Ellipsis or type(k) in (int, slice) for k in parts)


def _binary(name: str):
    def op(self, other):
        dev = _enter(f"operator {name}", self)
        result = getattr(self._a, name)(_unwrap(other, f"operator {name}", dev))
        return result if result is NotImplemented else _wrap(result)
    op.__name__ = name
    return op


def _inplace(name: str):
    def op(self, other):
        dev = _enter(f"operator {name}", self)
        getattr(self._a, name)(_unwrap(other, f"operator {name}", dev))
        return self  # the same device array, updated
    op.__name__ = name
    return op


def _unary(name: str):
    def op(self):
        _enter(f"operator {name}", self)
        return _wrap(getattr(self._a, name)())
    op.__name__ = name
    return op


for _name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or",
              "xor", "lshift", "rshift"):
    setattr(StrictArray, f"__{_name}__", _binary(f"__{_name}__"))
    setattr(StrictArray, f"__r{_name}__", _binary(f"__r{_name}__"))
    setattr(StrictArray, f"__i{_name}__", _inplace(f"__i{_name}__"))
for _name in ("lt", "le", "eq", "ne", "gt", "ge"):
    setattr(StrictArray, f"__{_name}__", _binary(f"__{_name}__"))
for _name in ("neg", "pos", "abs", "invert"):
    setattr(StrictArray, f"__{_name}__", _unary(f"__{_name}__"))


class _Ufunc:
    """A NumPy ufunc that takes and returns device arrays (``xp.add(a, b, out=a)``,
    ``xp.add.at(w, ids, g)``)."""

    def __init__(self, ufunc: numpy.ufunc) -> None:
        self._u = ufunc
        self.__name__ = ufunc.__name__

    def __call__(self, *args, **kwargs):
        return _call(self._u, f"xp.{self.__name__}", args, kwargs)

    def __getattr__(self, method: str):
        fn = getattr(self._u, method)
        if not callable(fn):
            return fn
        return lambda *args, **kwargs: _call(fn, f"xp.{self.__name__}.{method}", args, kwargs)


class Namespace(ModuleType):
    """The strict array module: NumPy's names, taking and returning device arrays.

    ``asarray`` and ``array`` accept host arrays (an upload, always a copy, as in CuPy); every
    other function refuses them.
    """

    _UPLOADS = ("asarray", "array")
    _ALLOCATIONS = ("empty", "empty_like")  # memory only: no kernel is queued

    def __init__(self, np_module: ModuleType = numpy) -> None:
        super().__init__(f"minipar.backend.strict[{np_module.__name__}]")
        self._np = np_module
        self.ndarray = StrictArray

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        obj = getattr(self._np, name)
        if isinstance(obj, numpy.ufunc):
            wrapped = _Ufunc(obj)
        elif isinstance(obj, type):
            wrapped = obj  # dtypes and scalar types: numpy.float32, numpy.dtype, ...
        elif isinstance(obj, ModuleType):
            wrapped = Namespace(obj)
        elif callable(obj):
            upload, launch = name in self._UPLOADS, name not in self._ALLOCATIONS

            def wrapped(*args, _fn=obj, _name=name, _up=upload, _launch=launch, **kwargs):
                return _call(_fn, f"xp.{_name}", args, kwargs, host_ok=_up, launch=_launch)
            wrapped.__name__ = name
        else:
            wrapped = obj  # constants: inf, pi, newaxis
        setattr(self, name, wrapped)  # resolve each name once
        return wrapped

    @staticmethod
    def asnumpy(a) -> numpy.ndarray:
        """A host copy (``cupy.asnumpy``)."""
        return a.get() if type(a) is StrictArray else numpy.asarray(a)
