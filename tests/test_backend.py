"""Backend selection, GPU choice by local rank, one-line errors, and the host-staging path.

No GPU here: "CuPy installed" is simulated with small fake ``cupy`` modules (in ``sys.modules``
or on the path of a subprocess), and the staging path runs on the strict backend's stand-in
device (``minipar.backend.standin``), whose arrays, like CuPy's, MPI cannot read, and whose
host -> device copies run later, as a GPU's do. The real MPI path with staged device arrays is
in ``tests/mpi/test_backend_mpi.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar import backend
from minipar.dist.staging import Staging
from minipar.dist.stats import CommStats, OpStats
from minipar.backend.strict import StrictArray

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_INSTALLED = "--backend cupy: CuPy is not installed (pip install -e '.[gpu]')"


@pytest.fixture(autouse=True)
def keep_backend():
    """Each test may switch backends; the session's choice comes back afterwards."""
    before = backend.name()
    yield
    backend.use(before)


# ----------------------------------------------------------------------------- fake CuPy
class CUDARuntimeError(RuntimeError):
    """CuPy's error type when the CUDA runtime fails (same name, for the message)."""


def fake_cupy(devices: int | None, fail: dict[str, Exception] | None = None,
              runtime_version: int = 12080) -> types.ModuleType:
    """A ``cupy`` with ``devices`` GPUs (None: the runtime raises, as without a driver), whose
    array functions are NumPy's; ``fail`` makes the named ones raise (a missing library)."""
    cupy = types.ModuleType("cupy")
    used: list[int] = []
    fail = fail or {}

    def count():
        if devices is None:
            raise CUDARuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")
        return devices

    class Device:
        def __init__(self, index):
            self.index = index

        def use(self):
            used.append(self.index)

    def function(name):
        def call(*args, **kwargs):
            if name in fail:
                raise fail[name]
            return getattr(np, name)(*args, **kwargs)
        return call

    runtime = types.SimpleNamespace(getDeviceCount=count, runtimeGetVersion=lambda: runtime_version,
                                    getDevice=lambda: used[-1] if used else 0,
                                    getDeviceProperties=lambda i: {"name": b"Fake GPU"})
    cupy.cuda = types.SimpleNamespace(runtime=runtime, Device=Device)
    for name in ("arange", "multiply", "matmul", "argsort"):
        setattr(cupy, name, function(name))
    cupy.used = used
    return cupy


def without_launcher_env(monkeypatch) -> None:
    for var in backend.LOCAL_RANK_VARS:
        monkeypatch.delenv(var, raising=False)


# ----------------------------------------------------------------------------- selection
def test_numpy_and_strict_are_selected_by_name():
    assert backend.use("numpy") is np and backend.xp() is np and backend.name() == "numpy"
    assert not backend.on_device() and backend.from_host(a := np.ones(2)) is a
    xp = backend.use("strict")
    assert backend.name() == "strict" and backend.on_device() and xp.ndarray is StrictArray
    assert "strict" in backend.describe()


def test_unknown_backend_is_one_line_naming_the_choices():
    with pytest.raises(backend.BackendError) as err:
        backend.use("torch")
    assert str(err.value) == ("--backend torch: unknown backend 'torch' "
                              "(choose numpy, cupy, strict)")


@pytest.mark.parametrize("value, expected", [("", "numpy"), ("numpy", "numpy"),
                                             ("strict", "strict")])
def test_env_var_selects_the_backend(monkeypatch, value, expected):
    monkeypatch.setenv("MINIPAR_BACKEND", value)
    backend.use_from_env()
    assert backend.name() == expected


def test_env_var_errors_name_the_variable(monkeypatch):
    monkeypatch.setenv("MINIPAR_BACKEND", "cupy")
    monkeypatch.setitem(sys.modules, "cupy", None)  # as if not installed, even on a GPU node
    with pytest.raises(backend.BackendError, match=r"^MINIPAR_BACKEND=cupy: CuPy is not "):
        backend.use_from_env()
    monkeypatch.delenv("MINIPAR_BACKEND")
    backend.use_from_env()
    assert backend.name() == "numpy"


def test_cupy_not_installed_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)
    with pytest.raises(backend.BackendError) as err:
        backend.use("cupy")
    assert str(err.value) == NOT_INSTALLED
    assert backend.name() != "cupy"


def test_cupy_that_cannot_import_says_why(monkeypatch, tmp_path):
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text(
        "raise ImportError('libcudart.so.12: cannot open shared object file')\n")
    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(backend.BackendError) as err:
        backend.use("cupy")
    assert str(err.value) == ("--backend cupy: CuPy is installed but does not import "
                              "(ImportError: libcudart.so.12: cannot open shared object file)")


@pytest.mark.parametrize("devices, reason", [
    (None, "no CUDA device is available here (CUDARuntimeError: cudaErrorNoDevice: no "
           "CUDA-capable device is detected)"),
    (0, "no CUDA device is available here"),
])
def test_cupy_without_a_device_is_one_clear_line(monkeypatch, devices, reason):
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(devices))
    with pytest.raises(backend.BackendError) as err:
        backend.use("cupy")
    assert str(err.value) == f"--backend cupy: {reason}"
    assert "\n" not in str(err.value) and backend.name() != "cupy"


def test_a_gpu_that_cannot_run_fails_at_selection(monkeypatch):
    driver = CUDARuntimeError("cudaErrorInsufficientDriver")
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(2, {"multiply": driver}))
    without_launcher_env(monkeypatch)
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "3")
    with pytest.raises(backend.BackendError) as err:
        backend.use("cupy")
    assert str(err.value) == ("--backend cupy: CuPy cannot run an elementwise kernel and a "
                              "reduction (NVRTC) on GPU 1 (CUDARuntimeError: "
                              "cudaErrorInsufficientDriver); the NVIDIA driver may be too old "
                              "for this CuPy (see nvidia-smi)")


@pytest.mark.parametrize("probe, what, version", [
    ("multiply", "an elementwise kernel and a reduction (NVRTC)", 12080),
    ("matmul", "a matmul (cuBLAS)", 12080),
    ("argsort", "a sort (CUB)", 13000),
])
def test_a_missing_cuda_library_names_what_to_install(monkeypatch, probe, what, version):
    """The start-up check runs each kind of work training does, so a CuPy installed without
    CUDA's libraries (cupy-cuda12x without [ctk]) fails at once with the pip line to fix it,
    also when only cuBLAS is missing (the first matmul would fail mid-run otherwise)."""
    lib = {"multiply": "libnvrtc.so.12", "matmul": "libcublas.so.12",
           "argsort": "libcudart.so.13"}[probe]
    missing = ImportError(f"{lib}: cannot open shared object file: No such file or directory")
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy(1, {probe: missing}, version))
    without_launcher_env(monkeypatch)
    with pytest.raises(backend.BackendError) as err:
        backend.use("cupy")
    major = version // 1000
    assert str(err.value) == (f"--backend cupy: CuPy cannot run {what} on GPU 0 (ImportError: "
                              f"{lib}: cannot open shared object file: No such file or "
                              f"directory); install CUDA's libraries from PyPI: pip install "
                              f"'cupy-cuda{major}x[ctk]' (pip install -e '.[gpu]' does)")
    assert backend.name() != "cupy"


def test_the_gpu_extra_installs_cupy_with_cudas_libraries():
    """setup.cfg's gpu extra is CuPy's documented pip-only install: the ctk extra brings the
    CUDA runtime, NVRTC and cuBLAS from PyPI (cupy-cuda12x 14's metadata: cuda-toolkit[cublas,
    cudart,...,nvrtc]==12.* for extra == "ctk")."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    gpu = [line for line in cfg["options.extras_require"]["gpu"].splitlines() if line.strip()]
    assert gpu == ["cupy-cuda12x[ctk]>=14"]


@pytest.mark.parametrize("var", backend.LOCAL_RANK_VARS)
def test_each_rank_takes_the_gpu_of_its_local_rank(monkeypatch, var):
    cupy = fake_cupy(4)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    without_launcher_env(monkeypatch)
    monkeypatch.setenv(var, "6")
    assert backend.use("cupy") is cupy and backend.name() == "cupy"
    assert cupy.used == [2]  # local rank 6 of a node with 4 GPUs
    assert backend.describe() == "cupy on GPU 2 of 4 (Fake GPU)"


def test_local_rank_reads_the_launchers_variables(monkeypatch):
    without_launcher_env(monkeypatch)
    assert backend.local_rank() == 0  # not launched by MPI
    monkeypatch.setenv("SLURM_LOCALID", "5")
    assert backend.local_rank() == 5
    monkeypatch.setenv("MPI_LOCALRANKID", "1")  # Hydra's variable comes first
    assert backend.local_rank() == 1
    monkeypatch.setenv("MPI_LOCALRANKID", "x")  # not a number: ignored
    assert backend.local_rank() == 5


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 8), ranks=st.integers(1, 32))
def test_ranks_of_a_node_share_its_gpus_round_robin(n, ranks):
    picks = [backend.pick_device(r, n) for r in range(ranks)]
    assert all(0 <= d < n for d in picks)
    assert picks[:n] == list(range(min(n, ranks)))  # the first n ranks get distinct GPUs
    loads = [picks.count(d) for d in range(n)]
    assert max(loads) - min(loads) <= 1  # and the rest spread evenly


def test_pick_device_needs_a_device():
    with pytest.raises(ValueError, match="no devices"):
        backend.pick_device(0, 0)


# ----------------------------------------------------------------------------- the CLIs
FAKES = {
    "missing": ("raise ModuleNotFoundError(\"No module named 'cupy'\", name='cupy')\n",
                NOT_INSTALLED),
    "no-device": ("class CUDARuntimeError(RuntimeError): pass\n"
                  "def _count():\n"
                  "    raise CUDARuntimeError('cudaErrorNoDevice: no CUDA-capable device is "
                  "detected')\n"
                  "class cuda:\n"
                  "    class runtime:\n"
                  "        getDeviceCount = staticmethod(_count)\n",
                  "--backend cupy: no CUDA device is available here (CUDARuntimeError: "
                  "cudaErrorNoDevice: no CUDA-capable device is detected)"),
}


@pytest.mark.parametrize("tool", ["train", "bench"])
@pytest.mark.parametrize("fake", sorted(FAKES))
def test_cli_backend_cupy_fails_with_one_line(tmp_path, tool, fake):
    source, reason = FAKES[fake]
    (tmp_path / "cupy").mkdir()
    (tmp_path / "cupy" / "__init__.py").write_text(source)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), OMP_NUM_THREADS="1")
    env.pop("MINIPAR_BACKEND", None)
    proc = subprocess.run([sys.executable, "-m", f"minipar.{tool}", "--backend", "cupy",
                           "--steps", "1"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"minipar.{tool}: error: {reason}\n"
    assert proc.stdout == ""


# ----------------------------------------------------------------------------- staging
arrays = st.tuples(st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple),
                   st.sampled_from(["float32", "float64", "int64"]), st.integers(0, 2**16))


def host_array(shape, dtype, seed) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * 100).astype(dtype)


@settings(max_examples=20, deadline=None)
@given(arrays)
def test_host_staging_copies_and_counts_every_byte(spec):
    """Not CUDA-aware: MPI gets host copies; every d2h and h2d is recorded with its bytes."""
    host = host_array(*spec)
    n = host.nbytes
    xp = backend.use("strict")
    stats = CommStats()
    wire = Staging(stats, direct=False)
    x = xp.asarray(host)

    sent = wire.outgoing(x)  # what MPI would read
    assert type(sent) is np.ndarray and np.array_equal(sent, host)
    assert not np.shares_memory(sent, x._a)

    buf, finish = wire.incoming(host.shape, host.dtype)  # what MPI would write
    assert type(buf) is np.ndarray and buf.shape == host.shape and buf.dtype == host.dtype
    buf[...] = host * 2
    got = finish()
    assert type(got) is StrictArray and np.array_equal(backend.to_host(got), host * 2)

    buf, write_back = wire.inplace(x)
    buf[...] = host + 1
    assert np.array_equal(backend.to_host(x), host)  # x changes only when written back
    write_back()
    assert np.array_equal(backend.to_host(x), host + 1)

    copies = stats.copies_as_dict()
    assert set(copies) == {"d2h", "h2d"} and stats.as_dict() == {}  # no communication op
    assert (copies["d2h"]["calls"], copies["d2h"]["bytes"]) == (2, 2 * n)  # outgoing, inplace
    assert (copies["h2d"]["calls"], copies["h2d"]["bytes"]) == (2, 2 * n)  # incoming, write-back
    assert copies["d2h"]["wire_bytes"] == copies["h2d"]["wire_bytes"] == 0


@settings(max_examples=10, deadline=None)
@given(arrays)
def test_cuda_aware_mode_hands_device_memory_after_a_sync(spec):
    host = host_array(*spec)
    xp = backend.use("strict")
    dev = backend.device()
    stats = CommStats()
    wire = Staging(stats, direct=True)
    x = xp.asarray(host)
    syncs = dev.syncs
    assert wire.outgoing(x) is x._a  # the device buffer itself
    buf, finish = wire.incoming(host.shape, host.dtype)
    buf[...] = host
    got = finish()
    assert got._a is buf and np.array_equal(backend.to_host(got), host)
    buf, write_back = wire.inplace(x)
    assert buf is x._a
    write_back()
    assert dev.syncs == syncs + 3  # one stream sync before MPI touches each buffer
    assert stats.as_dict() == {} and stats.copies_as_dict() == {}  # no copies


def test_host_arrays_are_never_staged():
    backend.use("numpy")
    stats = CommStats()
    wire = Staging(stats, direct=False)
    x = np.arange(6.0)
    assert wire.outgoing(x) is x
    buf, finish = wire.incoming((2, 3), np.float64)
    assert finish() is buf and type(buf) is np.ndarray
    buf, write_back = wire.inplace(x)
    assert buf is x
    write_back()
    assert stats.as_dict() == {} and stats.copies_as_dict() == {}


def test_copies_are_kept_apart_from_communication():
    stats = CommStats()
    stats.record("allreduce", 800, 400, 0.5)
    stats.record_copy("d2h", 800, 0.25)
    stats.record_copy("d2h", 16, 0.25)
    with stats.paused():
        stats.record_copy("h2d", 800, 1.0)
    assert stats.copies_as_dict() == {"d2h": OpStats(2, 816, 0, 0.5).as_dict()}
    assert set(stats.as_dict()) == {"allreduce"}
    assert stats.total() == OpStats(1, 800, 400, 0.5)  # copies are not traffic
    with pytest.raises(ValueError, match="not one of"):
        stats.record_copy("allreduce", 8, 0.0)
    stats.reset()
    assert stats.copies_as_dict() == {} == stats.as_dict()


def test_a_staged_receive_is_timed_when_its_copy_has_run_not_when_queued():
    """The h2d copy from pinned memory is queued: its bytes count at once, its seconds are the
    copy's own, added once it is known to have run (here: at the synchronize)."""
    backend.use("strict")
    stats = CommStats()
    wire = Staging(stats, direct=False)
    buf, finish = wire.incoming((64, 64), np.float64)
    buf[...] = 3.0
    got = finish()
    h2d = stats.copies["h2d"]
    assert (h2d.calls, h2d.bytes, h2d.seconds) == (1, 64 * 64 * 8, 0.0)  # queued, not run
    total = got.sum()  # a kernel: the stream runs the copy first
    backend.synchronize()
    assert h2d.seconds > 0.0 and float(total) == 3.0 * 64 * 64


def test_a_pinned_block_is_not_reused_while_a_copy_from_it_may_still_run():
    """The fix of the staging race: the device holds each h2d source until an event after the
    copy is done, so the pool hands out another block meanwhile, and reuses it afterwards."""
    from minipar.backend.stream import POOL

    backend.use("strict")
    wire = Staging(CommStats(), direct=False)

    def receive():
        buf, finish = wire.incoming((100,), np.float32)
        buf[...] = 1.0
        return finish(), buf.__array_interface__["data"][0]

    backend.synchronize()
    (_, first), (_, second) = receive(), receive()  # back to back, nothing ran in between
    assert first != second  # the first block is still held for its queued copy
    blocks = POOL.blocks
    backend.synchronize()  # both copies have run: their blocks are free again
    (_, third) = receive()
    assert third in (first, second) and POOL.blocks == blocks


def test_cupy_device_holds_each_h2d_source_until_the_event_after_its_copy_is_done():
    """CuPyDevice's half of the race fix, on a fake CuPy whose events we complete by hand:
    ``set`` (cudaMemcpyAsync) is queued between two timing events; the pinned source stays
    referenced until the end event reports done; then on_done gets the events' elapsed time."""
    events, copies = [], []

    class Event:
        def __init__(self):
            self.done = False
            events.append(self)

        def record(self):
            pass

    class Array:
        def set(self, src):
            copies.append(src)

    cuda = types.SimpleNamespace(Event=Event, get_elapsed_time=lambda a, b: 2.5,
                                 get_current_stream=lambda: types.SimpleNamespace(
                                     synchronize=lambda: [setattr(e, "done", True)
                                                          for e in events]))
    dev = backend.CuPyDevice(types.SimpleNamespace(cuda=cuda), 0, 1)
    src, seconds = np.ones(4), []
    dev.copy_from_host(Array(), src, seconds.append)
    assert copies == [src] and len(events) == 2 and len(dev.in_flight) == 1
    dev.in_flight.release_done()
    assert len(dev.in_flight) == 1 and seconds == []  # the copy may still be reading src
    dev.synchronize()
    assert len(dev.in_flight) == 0 and seconds == [2.5e-3]  # milliseconds -> seconds


@pytest.mark.parametrize("nbc", [False, True])
def test_a_nonblocking_collective_gets_device_memory_only_where_mpi_allows(nbc):
    """CUDA-aware mode: blocking calls get device buffers; a non-blocking collective's buffer
    is staged (d2h now, h2d at write-back) unless MPI reads device memory there too."""
    xp = backend.use("strict")
    stats = CommStats()
    wire = Staging(stats, direct=True, direct_nonblocking=nbc)
    x = xp.arange(4.0)
    backend.synchronize()
    assert wire.inplace(x)[0] is x._a  # blocking: the device buffer itself
    buf, write_back = wire.inplace(x, nonblocking=True)
    if nbc:
        assert buf is x._a and stats.copies_as_dict() == {}
        return
    assert type(buf) is np.ndarray and np.array_equal(buf, np.arange(4.0))
    buf *= 10  # what MPI's reduction writes
    write_back()
    assert np.array_equal(backend.to_host(x), np.arange(4.0) * 10)
    assert {op: s["bytes"] for op, s in stats.copies_as_dict().items()} == {"d2h": 32, "h2d": 32}
