"""No array silently falls back to NumPy: the kernels and parallel steps on the strict device.

The strict backend (``minipar.backend.strict``) is NumPy behind the wall CuPy puts around GPU
memory: implicit conversion to NumPy and any meeting of host and device arrays raise. Running
the model on it proves on a CPU what a GPU run needs, and since the same NumPy code runs behind
the wall, the results must equal the numpy backend's bit for bit. Like a GPU node it also has
devices per thread, streams that run host -> device copies later, and CuPy's pinned-memory
reuse (``minipar.backend.stream``), tested at the end of this file.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipar import backend
from minipar.compare import mismatches, random_batches, serial_reference, train_layout
from minipar.config import SCHEDULE_NAMES, ModelConfig, ParallelConfig
from minipar.dist.comm import run_threads
from minipar.dist.mesh import Mesh
from minipar.engine import Engine
from minipar.nn import functional as F
from minipar.nn import optim
from minipar.backend.strict import StrictArray
from on_device import down, up


@pytest.fixture()
def xp():
    before = backend.name()
    yield backend.use("strict")
    backend.use(before)


def on_each_backend(fn):
    """``fn()`` on numpy, then on the strict device; both results as host arrays."""
    before = backend.name()
    try:
        backend.use("numpy")
        host = fn()
        backend.use("strict")
        device = fn()
    finally:
        backend.use(before)
    return host, device


# ------------------------------------------------------------------------------ the wall
def test_implicit_host_conversion_raises(xp):
    a = xp.arange(6.0).reshape(2, 3)
    for convert in (np.asarray, np.array, np.ascontiguousarray):
        with pytest.raises(TypeError, match="implicit conversion"):
            convert(a)
    for attr in ("data", "tobytes"):
        with pytest.raises(TypeError):
            getattr(a, attr)


def test_host_and_device_arrays_never_meet(xp):
    a = xp.ones((2, 3))
    h = np.ones((2, 3))
    attempts = [lambda: a + h, lambda: h + a, lambda: h * a, lambda: a @ h.T,
                lambda: xp.concatenate([a, h]), lambda: xp.where(h > 0, a, 0.0),
                lambda: a[np.array([0, 1])], lambda: a.__setitem__(0, h[0]),
                lambda: xp.add.at(a, np.array([0]), a[:1]), lambda: np.add(a, h),
                lambda: a.__iadd__(h)]
    for attempt in attempts:
        with pytest.raises(TypeError, match="host NumPy array meets"):
            attempt()
    assert np.array_equal(backend.to_host(a), np.ones((2, 3)))  # nothing was changed


def test_what_cupy_allows_is_allowed(xp):
    h = np.arange(4.0)
    a = xp.asarray(h)  # an upload is a copy
    h[0] = 99.0
    assert type(a) is StrictArray and float(a[0]) == 0.0
    total = a.sum()
    assert type(total) is StrictArray and total.shape == ()  # 0-d, not a NumPy scalar
    assert float(total) == 6.0 and int(a[3]) == 3 and bool(a[1]) and a.item(2) == 2.0
    assert a.tolist() == [0.0, 1.0, 2.0, 3.0] and len(a) == 4
    assert type(np.exp(a)) is StrictArray  # NumPy ufuncs on device arrays run on the device
    assert type(np.float64(2.0) * a) is StrictArray and type(2.0 * a) is StrictArray
    b = a.copy()
    b += 1.0  # in place keeps the array
    assert np.array_equal(b.get(), np.arange(4.0) + 1)
    out = xp.exp(b, out=b)
    assert out is b
    assert np.array_equal(backend.to_host(pickle.loads(pickle.dumps(a))), np.arange(4.0))
    assert copy.deepcopy(a)._a is not a._a
    assert f"{total:.1f}" == "6.0"


# ------------------------------------------------------------------------------ kernels
def kernel_outputs() -> list:
    """Every kernel pair and optimizer update, on fixed random data; results on the host."""
    rng = np.random.default_rng(0)
    up = backend.from_host
    x = up(rng.standard_normal((2, 4, 8)))
    w, b = up(rng.standard_normal((8, 6))), up(rng.standard_normal(6))
    out = []
    y, cache = F.linear_fwd(x, w, b)
    out += [y, *F.linear_bwd(y * 0.5, cache)]
    y, cache = F.layernorm_fwd(x, up(rng.standard_normal(8)), up(rng.standard_normal(8)))
    out += [y, *F.layernorm_bwd(y, cache)]
    y, cache = F.gelu_fwd(x)
    out += [y, F.gelu_bwd(x, cache)]
    p, cache = F.softmax_fwd(x)
    out += [p, F.softmax_bwd(x, cache)]
    qkv = up(rng.standard_normal((2, 4, 24)))
    y, cache = F.mha_fwd(qkv, n_heads=2)
    out += [y, F.mha_bwd(y, cache)]
    ids = up(rng.integers(0, 5, (2, 4)))
    table = up(rng.standard_normal((5, 8)))
    y, cache = F.embedding_fwd(ids, table, valid=ids < 3)
    out += [y, F.embedding_bwd(y, cache)]
    y, cache = F.embedding_fwd(ids, table)
    out += [y, F.embedding_bwd(y, cache)]
    out += [F.sinusoidal_positions(4, 8), F.causal_bias(4, "float64")]
    out += [*F.add_positions_bwd(x), *F.residual_fwd(x, x)[:1]]
    targets = up(np.array([0, 1, -100, 4, 2, 3, -100, 0]))
    loss, cache = F.cross_entropy_fwd(x.reshape(8, 8)[:, :5], targets)
    out += [loss, F.cross_entropy_bwd(1.0, cache)]
    p, g, m, v = (up(rng.standard_normal(5)) for _ in range(4))
    v = v * v
    optim.adamw_update(p, g, m, v, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8,
                       weight_decay=0.01, step=3)
    optim.sgd_update(p, g, m, lr=0.1, momentum=0.9, weight_decay=0.01, step=1)
    out += [p, m, v]
    if backend.on_device():
        escaped = [i for i, o in enumerate(out) if type(o) is not StrictArray]
        assert not escaped, f"kernel outputs {escaped} are not device arrays"
    return [backend.to_host(o) for o in out]


def test_every_kernel_runs_on_the_device_and_equals_numpy_bitwise():
    host, device = on_each_backend(kernel_outputs)
    assert len(host) == len(device)
    for i, (h, d) in enumerate(zip(host, device)):
        assert h.dtype == d.dtype and np.array_equal(h, d, equal_nan=True), f"output {i}"


# ------------------------------------------------------------------------------ parallel steps
@st.composite
def layouts(draw):
    """A model and a dp x tp x pp layout of at most 4 ranks, with the options of each axis."""
    pp = draw(st.sampled_from([1, 2]))
    tp = draw(st.sampled_from([1, 2]))
    dp = draw(st.sampled_from([d for d in (1, 2, 4) if d * tp * pp <= 4]))
    schedule = draw(st.sampled_from(SCHEDULE_NAMES))
    m = pp * draw(st.integers(1, 2)) if schedule == "interleaved" else draw(st.integers(1, 2))
    v = draw(st.integers(1, 2)) if schedule == "interleaved" else 1
    # ZB-H1 defers weight gradients, which ZeRO-3 and buckets sync per unit (config forbids it).
    zeros = [0, 1, 2] if schedule == "zb-h1" else [0, 1, 2, 3]
    zero = draw(st.sampled_from(zeros)) if dp > 1 else 0
    bucket = 0.0 if zero == 3 or schedule == "zb-h1" else draw(st.sampled_from([0.0, 1e-4]))
    cfg = ModelConfig(vocab_size=draw(st.integers(6, 12)), seq_len=4, n_layers=pp * v,
                      d_model=8, n_heads=2, pos=draw(st.sampled_from(["learned", "sinusoidal"])))
    par = ParallelConfig(dp=dp, tp=tp, pp=pp, zero=zero, schedule=schedule, microbatches=m,
                         virtual_stages=v, sequence_parallel=tp > 1 and draw(st.booleans()),
                         bucket_mb=bucket)
    par.validate(cfg, world_size=par.world)  # a drawn layout is always a valid one
    return cfg, par


@settings(max_examples=20, deadline=None, derandomize=True)
@given(layouts())
def test_parallel_steps_on_the_device_equal_numpy_and_serial(layout):
    cfg, par = layout
    batches = random_batches(cfg, steps=2, batch=4 * par.dp, seed=par.world)

    def run():
        return run_threads(lambda w: train_layout(w, cfg, par, batches), par.world)[0]

    host, device = on_each_backend(run)
    assert not mismatches(device, host, rtol=0.0)  # the same NumPy code behind the wall
    assert not mismatches(device, serial_reference(cfg, batches), rtol=1e-9)


def test_evaluation_and_checkpoint_state_cross_the_wall_explicitly():
    cfg = ModelConfig(vocab_size=8, seq_len=4, n_layers=2, d_model=8, n_heads=2)
    batches = random_batches(cfg, steps=1, batch=4)

    def run():
        engine = Engine(cfg, ParallelConfig(), Mesh.serial(), dtype="float64")
        engine.train_step(*batches[0], normalizer=float((batches[0][1] >= 0).sum()))
        state = engine.full_optimizer_state()
        engine.load_full_state(engine.full_params(), state, engine.optimizer_steps())
        metrics = engine.evaluate(batches)
        return [metrics["loss"], metrics["exact_match"], *state.values()]

    host, device = on_each_backend(run)
    assert all(np.array_equal(h, d) for h, d in zip(host, device))


# ------------------------------------------------------------------------------ as async as a GPU
def test_pinned_pool_rounds_and_recycles_like_cupys():
    from minipar.backend.stream import PinnedPool, pooled_size

    assert [pooled_size(n) for n in (1, 512, 513, 1500, 5000)] == [512, 512, 1024, 2048, 8192]
    pool = PinnedPool()
    a = pool.empty((3, 4), np.float64)  # 96 bytes -> a 512-byte block
    address = a.__array_interface__["data"][0]
    view = a[1:]
    del a
    b = pool.empty((10,), np.float32)  # the same size class, but the view keeps the block
    assert b.__array_interface__["data"][0] != address and pool.blocks == 2
    del view
    c = pool.empty((64,), np.int64)  # 512 bytes: the freed block comes straight back
    assert c.__array_interface__["data"][0] == address and pool.blocks == 2
    assert pool.memory(c) is not None and pool.memory(np.ones(3)) is None


def test_a_copy_from_pinned_memory_runs_when_the_stream_needs_it(xp):
    dev = backend.device()
    pinned = dev.host_empty((4,), np.float64)
    pinned[...] = 1.0
    dst = xp.zeros(4)
    dst.set(pinned)  # queued, as cudaMemcpyAsync from pinned memory is
    assert np.array_equal(dst._a, np.zeros(4))  # (a peek behind the wall: not yet run)
    y = dst * 2.0  # a kernel: stream order runs the copy first
    assert np.array_equal(backend.to_host(y), np.full(4, 2.0))
    pageable = np.full(4, 3.0)
    dst.set(pageable)  # CUDA stages pageable memory before returning: done at once
    assert np.array_equal(dst._a, np.full(4, 3.0))


def test_rewriting_a_queued_copys_source_is_a_race(xp):
    dev = backend.device()
    pinned = dev.host_empty((4,), np.float64)
    pinned[...] = 1.0
    dst = xp.zeros(4)
    dst.set(pinned)
    total = dst.sum()  # the copy runs here and reads 1.0 ...
    pinned[...] = 5.0  # ... but the host cannot know that: a GPU may not have got there yet
    from minipar.backend.stream import StreamRace

    with pytest.raises(StreamRace, match=r"rewrote its pinned source before it knew"):
        float(total)  # a blocking read: the host learns the copy is done, and checks
    dst.set(pinned)
    pinned[...] = 6.0  # rewritten before the copy even ran: the device gets the later bytes
    with pytest.raises(StreamRace, match=r"before the copy ran, so the device got the later"):
        backend.synchronize()


def test_an_event_tells_when_a_queued_copy_has_run(xp):
    from minipar.backend.strict import THREAD

    dst = xp.zeros(2)
    pinned = backend.device().host_empty((2,), np.float64)
    pinned[...] = 7.0
    dst.set(pinned)
    event = THREAD.stream.record()
    assert not event.done  # still queued
    dst += 1.0
    assert event.done and np.array_equal(backend.to_host(dst), np.full(2, 8.0))


def test_each_array_lives_on_a_device_and_kernels_do_not_mix_them(xp):
    dev = backend.device()
    assert dev.count == 2 and dev.current() == 0
    a = xp.arange(3.0)
    dev.select(1)
    try:
        b = xp.ones(3)
        assert (a.device, b.device, a[1:].device) == (0, 1, 0)  # a view stays with its memory
        for mix in (lambda: a + b, lambda: b * a, lambda: xp.add(b, a), lambda: a.sum(),
                    lambda: b.__setitem__(0, a[0])):
            with pytest.raises(ValueError, match=r"resides \(0\) is different from the "
                                                 r"current device \(1\)"):
                mix()
        moved = xp.asarray(a)  # CuPy moves an array from another device on asarray
        assert moved.device == 1 and np.array_equal(backend.to_host(moved + b), [1.0, 2.0, 3.0])
        assert backend.from_host(a).device == 1 and float(a[2]) == 2.0  # reads cross freely
    finally:
        dev.select(0)


def test_thread_world_ranks_run_on_their_own_devices(xp):
    def rank(w):
        x = xp.full(2, float(w.rank))
        total = w.allreduce(x)  # every other rank's copy comes from another device
        return backend.device().current(), total.device, backend.to_host(total).tolist()

    assert run_threads(rank, 4) == [(0, 0, [6.0, 6.0]), (1, 1, [6.0, 6.0]),
                                    (0, 0, [6.0, 6.0]), (1, 1, [6.0, 6.0])]
    assert backend.device().current() == 0  # the caller's thread keeps its device


def test_mpi_may_not_read_device_memory_that_queued_work_may_still_write(xp):
    from minipar.backend.stream import StreamRace

    x = xp.ones(3) * 2.0  # a kernel, not yet synchronised
    with pytest.raises(StreamRace, match=r"MPI is handed device memory while 0 copies and \d+ "):
        backend.device().device_buffer(x)
    backend.synchronize()
    assert backend.device().device_buffer(x) is x._a


def test_the_causal_mask_cache_keeps_one_mask_per_device(xp):
    dev = backend.device()
    on0 = F.causal_bias(5, "float64")
    dev.select(1)
    try:
        on1 = F.causal_bias(5, "float64")
    finally:
        dev.select(0)
    assert (on0.device, on1.device) == (0, 1)
    assert np.array_equal(backend.to_host(on0), backend.to_host(on1))
    assert F.causal_bias(5, "float64") is on0


# ------------------------------------------------------------------------------ embedding backward
@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 40), st.integers(1, 6), st.integers(0, 2**16),
       st.booleans())
def test_embedding_backward_sums_each_rows_tokens_without_atomics(b, t, v, seed, masked):
    """The sort + pairwise-tree backward (no add.at, whose GPU atomics are not repeatable)
    equals a plain per-token loop, with long runs of one id and the vocabulary-parallel mask."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, v, (b, t))
    ids[0, : t // 2] = 0  # one long run
    dy = rng.standard_normal((b, t, 3))
    valid = rng.random((b, t)) < 0.7 if masked else None
    expected = np.zeros((v, 3))
    for i in np.ndindex(b, t):
        if valid is None or valid[i]:
            expected[ids[i]] += dy[i]
    _, cache = F.embedding_fwd(up(ids), up(np.ones((v, 3))), valid=up(valid))
    got = F.embedding_bwd(up(dy), cache)
    assert got.shape == (v, 3) and got.flags.c_contiguous
    got = down(got)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
