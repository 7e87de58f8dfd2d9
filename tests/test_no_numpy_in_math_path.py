"""No NumPy array work in the math path: kernels, layers, optimizers, parallel code and comms.

On a GPU node ``backend.xp()`` is CuPy; a stray ``numpy.exp`` or ``numpy.zeros`` in a kernel
makes a host array that then meets device arrays (an error, or a silent copy every step). This
test reads the source (AST) of every module under ``minipar/`` except the host-only ones named
below, and fails on any use of the ``numpy`` module that is not a dtype/type name or one of the
exemptions below, each named with its function and why it is host work.
"""

from __future__ import annotations

import ast
from fnmatch import fnmatch
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "minipar"

# Whole modules (path patterns under minipar/) that work on the host by design; everything else
# in minipar/ is scanned.
HOST_ONLY = {
    "backend/__init__.py": "the backend itself: the host side of every host<->device copy",
    "backend/devices.py": "the host side of every host<->device copy",
    "backend/strict.py": "the CPU stand-in for a GPU is NumPy behind a wall, by definition",
    "backend/standin.py": "the CPU stand-in's host/device operations",
    "backend/stream.py": "the CPU stand-in's streams and pinned host memory",
    "bench/*.py": "measurement tools: host data and timings (bench.py uploads its matrices "
                 "with from_host; the others time MPI on host buffers and this CPU's NumPy "
                 "kernels for the cost model, on purpose)",
    "checkpoint.py": "files on disk: full host tensors by name",
    "compare.py": "compares gathered host copies (full_params returns host arrays)",
    "tasks.py": "makes host batches; the engine uploads them",
    "seq2seq.py": "makes host batches of the encoder-decoder's tasks; the engine uploads them",
    "train/show.py": "--show renders decoded rows on the host (after to_host)",
    "dist/assertions.py": "test assertions on host copies (backend.to_host first)",
    "train/cli.py": "the CLI: numpy.errstate for the host process",
}

# Names that are types, not array work: dtypes for xp calls and isinstance checks.
TYPE_NAMES = {"ndarray", "dtype", "generic", "floating", "integer", "number", "bool_",
              "float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8",
              "uint16", "uint32", "uint64", "complex64", "complex128", "finfo", "iinfo"}

# (module, function qualname, numpy name used, or "*" for any) -> why it is host work.
ALLOWED = {
    ("parallel/param_server.py", "Server._stop", "numpy.array"):
        "a one-integer STOP message built on the host and uploaded with from_host",
    ("parallel/param_server.py", "Server._answer", "numpy.array"):
        "the one-integer version message built on the host and uploaded with from_host",
    ("parallel/param_server.py", "Worker._header", "numpy.array"):
        "the three-integer message header built on the host and uploaded with from_host",
    ("parallel/param_server.py", "run_parameter_server", "numpy.concatenate"):
        "the servers' shards arrive as host copies (allgather_obj) and are uploaded once",
    ("parallel/stragglers.py", "make_delay", "numpy.random.default_rng"):
        "a host RNG for how long a slow rank sleeps: no array work",
    ("nn/module.py", "Sharding.local", "numpy"):
        "init cuts the host tensor drawn by init_full before the one upload per shard",
    ("nn/module.py", "Sharding.full", "numpy"):
        "full_params/checkpoints reassemble host copies from every rank's pieces",
    ("nn/precision.py", "to_float16", "numpy"):
        "asks whether the backend is NumPy: the detour avoids NumPy's slow conversion only",
    ("nn/precision.py", "from_float16", "numpy"):
        "asks whether the backend is NumPy: the table avoids NumPy's slow conversion only",
    ("nn/precision.py", "_half_table", "numpy.arange"):
        "the 65536 float16 bit patterns: a host table, used on the NumPy backend only",
    ("nn/module.py", "init_full", "numpy.ones"): "layout-independent init runs on the host",
    ("nn/module.py", "init_full", "numpy.zeros"): "layout-independent init runs on the host",
    ("nn/module.py", "init_full", "numpy.random.default_rng"):
        "weights drawn from (seed, name) on the host: every backend starts from the same bits",
    ("nn/module.py", "make_param", "numpy.ascontiguousarray"):
        "the host shard is made contiguous before its upload",
    ("engine.py", "Engine._microbatches", "numpy.ascontiguousarray"):
        "the host batch is made contiguous before its upload",
    ("engine.py", "Engine._loss_and_norm", "numpy.array"):
        "two host floats (loss, grad_sq) packed for the one world allreduce of metrics",
    ("engine.py", "Engine._loss_and_norm", "numpy.sqrt"):
        "the global norm from the downloaded host sum of squares",
    ("engine.py", "Engine.forward_only", "numpy.ascontiguousarray"):
        "the host batch is made contiguous before its upload",
    ("engine.py", "Engine.local_tokens", "numpy.asarray"):
        "a cp rank's columns of the host batch, cut before its upload",
    ("engine.py", "Engine._cp_gather", "*"):
        "evaluation's predictions of every cp rank, reordered on the host (token ids)",
    ("parallel/context.py", "token_indices", "*"):
        "host integer positions of a rank's tokens (uploaded once by the embedding)",
    ("train/loop.py", "continuation", "numpy.zeros"):
        "host token ids (like every batch) and the next token, uploaded by forward_only and "
        "the allreduce",
    ("train/loop.py", "continuation", "numpy.array"): "host token ids rendered as text",
    ("train/loop.py", "_start", "numpy.zeros_like"):
        "a fresh optimizer state (--force) as full host tensors, like a checkpoint's",
    ("dist/mpi_comm.py", "_op16", "*"):
        "MPI's user-defined reduction of 16-bit floats runs on host buffers MPI hands it",
    ("dist/mpi_comm.py", "_op16.combine", "*"):
        "MPI's user-defined reduction of 16-bit floats runs on host buffers MPI hands it",
    ("engine.py", "Engine.train_step.quiet", "numpy.errstate"):
        "fp16 overflow is expected and handled: NumPy's floating-point warnings off for the step",
    ("engine.py", "Engine.init_weights", "numpy.zeros"):
        "a fresh optimizer state (--init-from) as full host tensors, like a checkpoint's",
    ("engine.py", "Engine.evaluate", "*"):
        "host bookkeeping around forward_only (which uploads): padding host batches, host "
        "targets against downloaded predictions, metric counters, perplexity of a float",
    ("nn/dropout.py", "site_key", "numpy.random.SeedSequence"):
        "a dropout site's Philox key, hashed on the host from (seed, step, site)",
    ("nn/dropout.py", "philox_words", "numpy.random.Philox"):
        "NumPy's Philox runs on the host; the same bits on every backend, masks uploaded once",
    ("nn/dropout.py", "keep_mask", "numpy.empty"):
        "the host keep mask, filled run by run from Philox, then uploaded by MaskSource.keep",
    ("nn/dropout.py", "TileMasks.__call__", "numpy.empty"):
        "a blockwise tile's host keep mask, cut from whole host mask rows, then uploaded",
    ("nn/dropout.py", "Dropout._keep_runs", "numpy.flatnonzero"):
        "where a cp rank's host token positions (an int array of the layout) stop being one run",
    ("nn/dropout.py", "Dropout._keep_runs", "numpy.diff"):
        "where a cp rank's host token positions (an int array of the layout) stop being one run",
    ("sim/activations.py", "measure_block_activations", "numpy.random.default_rng"):
        "a measurement helper: host random input, uploaded with from_host",
    ("sim/activations.py", "measure_block_activations.rank", "numpy.ascontiguousarray"):
        "the host input shard is made contiguous before its upload",
}


def numpy_uses(source: str) -> list[tuple[str, str, int]]:
    """Every use of the numpy module in ``source``: (function qualname, dotted name, line).

    Follows ``import numpy``, ``import numpy as np`` and ``from numpy[.x] import y`` anywhere in
    the module; a use is the longest dotted attribute chain on such a name (``numpy.random.
    default_rng``), or the bare name when it is not an attribute base (``xp = numpy``).
    """
    tree = ast.parse(source)
    aliases: dict[str, str] = {}  # local name -> dotted numpy name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "numpy" or a.name.startswith("numpy."):
                    aliases[(a.asname or a.name).split(".")[0]] = (
                        a.name if a.asname else "numpy")
        elif isinstance(node, ast.ImportFrom) and node.module and (
                node.module == "numpy" or node.module.startswith("numpy.")):
            for a in node.names:
                aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    uses: list[tuple[str, str, int]] = []

    def dotted(node) -> str | None:
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id in aliases:
            return ".".join([aliases[node.id], *reversed(parts)])
        return None

    def visit(node, scope: list[str]) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            scope = [*scope, node.name]
        if isinstance(node, (ast.Attribute, ast.Name)):
            name = dotted(node)
            if name is not None:
                uses.append((".".join(scope), name, node.lineno))
                return  # the chain's inner nodes are part of this one use
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            return
        for child in ast.iter_child_nodes(node):
            visit(child, scope)

    visit(tree, [])
    return uses


def violations(rel: str, source: str) -> list[str]:
    """Uses in module ``rel`` (path under minipar/) that are neither type names nor allowed."""
    bad = []
    for scope, name, line in numpy_uses(source):
        if name.split(".")[-1] in TYPE_NAMES and name.count(".") == 1:
            continue
        if (rel, scope, name) in ALLOWED or (rel, scope, "*") in ALLOWED:
            continue
        bad.append(f"minipar/{rel}:{line} in {scope or '<module>'}: {name}")
    return bad


def scanned_modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py")
                  if not any(fnmatch(p.relative_to(PACKAGE).as_posix(), pattern)
                             for pattern in HOST_ONLY))


def test_math_path_uses_the_backend_not_numpy():
    bad = []
    for path in scanned_modules():
        bad += violations(path.relative_to(PACKAGE).as_posix(), path.read_text())
    assert not bad, ("NumPy array work in the math path; use backend.xp() (or, for host-only "
                     "work, add a named exemption with its reason to this test):\n"
                     + "\n".join(bad))


def test_the_scan_covers_the_math_path():
    rels = {p.relative_to(PACKAGE).as_posix() for p in scanned_modules()}
    for needed in ("nn/functional.py", "nn/module.py", "nn/optim.py", "parallel/tensor.py",
                   "parallel/data.py", "parallel/pipeline.py", "dist/base.py",
                   "dist/threads.py", "dist/mpi_comm.py", "dist/staging.py", "engine.py"):
        assert needed in rels


def test_every_exemption_is_still_used():
    """An exemption whose use is gone must go too, so the list stays exact."""
    used = set()
    for path in scanned_modules():
        rel = path.relative_to(PACKAGE).as_posix()
        for scope, name, _ in numpy_uses(path.read_text()):
            used |= {(rel, scope, name), (rel, scope, "*")}
    assert not set(ALLOWED) - used, f"stale exemptions: {sorted(set(ALLOWED) - used)}"


SAMPLE = '''
import numpy as np
from numpy import exp as e
import numpy.random

def kernel(x):
    y = np.exp(x)                 # array math on the host
    z = e(y) + np.zeros(3)
    return y.astype(np.float32), numpy.random.rand(2)

class Layer:
    def forward(self, x):
        xp = np
        return xp.tanh(x)

def init_full(seed):
    return np.random.default_rng(seed)
'''


def test_the_scanner_finds_each_kind_of_use():
    found = {(scope, name) for scope, name, _ in numpy_uses(SAMPLE)}
    assert found == {("kernel", "numpy.exp"), ("kernel", "numpy.zeros"),
                     ("kernel", "numpy.float32"), ("kernel", "numpy.random.rand"),
                     ("Layer.forward", "numpy"), ("init_full", "numpy.random.default_rng")}
    # As a module of the math path: dtype names pass, the rest is reported, and an exemption
    # holds only in the function it names.
    bad = violations("nn/module.py", SAMPLE)
    names = sorted(b.split(": ")[-1] for b in bad)
    assert names == ["numpy", "numpy.exp", "numpy.exp", "numpy.random.rand", "numpy.zeros"]
    assert all("init_full" not in b for b in bad)  # exempt there, by ALLOWED
    assert any(b.startswith("minipar/nn/module.py:7 in kernel: ") for b in bad)


def test_a_wildcard_exemption_covers_its_function_only():
    source = ("import numpy\n"
              "class Engine:\n"
              "    def evaluate(self):\n"
              "        return numpy.ones(3)\n"
              "    def train_step(self):\n"
              "        return numpy.ones(3)\n")
    assert violations("engine.py", source) == [
        "minipar/engine.py:6 in Engine.train_step: numpy.ones"]
