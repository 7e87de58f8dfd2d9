"""The architecture is enforced, not hoped for: layers import only downwards, and no module
imports itself through others (no cycle, not even one hidden in a function body)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parent.parent


def test_layers_contract_holds():
    """`lint-imports` checks the layers contract declared in setup.cfg."""
    exe = Path(sys.executable).parent / "lint-imports"
    cmd = [str(exe)] if exe.exists() else [shutil.which("lint-imports") or "lint-imports"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "1 kept, 0 broken" in done.stdout


def import_cycles(graph, package: str = "minipar") -> list[list[str]]:
    """Every strongly connected set of more than one module (Tarjan), each a cycle's members."""
    modules = sorted(m for m in graph.modules if m == package or m.startswith(package + "."))
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in sorted(graph.find_modules_directly_imported_by(m)):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            members = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                members.append(n)
                if n == m:
                    break
            if len(members) > 1:
                found.append(sorted(members))

    for m in modules:
        if m not in index:
            visit(m)
    return found


def test_no_import_cycles():
    graph = grimp.build_graph("minipar")  # function-local imports included
    assert import_cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for m in ("p", "p.a", "p.b", "p.c"):
        graph.add_module(m)
    graph.add_import(importer="p.a", imported="p.b")
    graph.add_import(importer="p.b", imported="p.a")
    graph.add_import(importer="p.c", imported="p.a")
    assert import_cycles(graph, "p") == [["p.a", "p.b"]]
