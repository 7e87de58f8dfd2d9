"""Lessons are the single source; notebooks are generated from them; lessons launch MPI safely.

A lesson is ``lessons/NN_topic.py`` in jupytext's "percent" format (``# %%`` starts a code
cell, ``# %% [markdown]`` a text cell). ``notebooks/NN_topic.ipynb`` is generated from it with
no outputs and is never edited by hand::

    python -m minipar.lessons sync     # regenerate every notebook from its lesson
    python -m minipar.lessons check    # exit 1, listing each notebook missing or out of sync
    python -m minipar.lessons run      # execute every notebook (as CI does)

(``--lessons DIR --notebooks DIR`` choose other directories.) The check compares what a reader
sees, the type and source of each cell, and ignores metadata noise.

A lesson that runs several ranks calls ``mpirun(n, args)``, which launches this interpreter
under the ``mpirun`` installed next to it and raises with the ranks' output when the job fails.
A bare ``!mpirun`` in a notebook would use whatever ``mpirun`` is on the PATH and its failure
would pass silently.

Needs the ``notebooks`` (or ``dev``) extra for sync, check and run; ``mpirun`` needs nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from minipar.dist.mpirun import MPIRunError, mpirun  # noqa: F401 - lessons call mpirun()

REPO_ROOT = Path(__file__).resolve().parent.parent
LESSONS_DIR = REPO_ROOT / "lessons"
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
LESSON_GLOB = "[0-9][0-9]_*.py"
SYNC_COMMAND = "python -m minipar.lessons sync"
OUT_DIR = LESSONS_DIR / "out"  # figures and files the lessons write (ignored by git)


def out_dir(lesson: str) -> Path:
    """The folder where lesson ``lesson`` (its number, ``"03"``) saves its figures and files:
    ``lessons/out/03/``, the same on every run, created if missing. Run again, a lesson
    overwrites its own files and leaves nothing in the temporary folder."""
    path = OUT_DIR / lesson
    path.mkdir(parents=True, exist_ok=True)
    return path


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython  # noqa: PLC0415 - only present with the notebooks extra
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and hasattr(shell, "kernel")


def _shown(path: Path) -> str:
    path = Path(path).resolve()
    return str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)


def show_image(path: str | os.PathLike) -> Path:
    """Print where a saved figure is and, in a notebook, display it inline.

    Displaying the PNG file (rather than a live figure) works under every matplotlib backend,
    so a lesson's figures appear in a notebook whatever backend an earlier cell chose.
    """
    path = Path(path)
    print(f"figure: {_shown(path)}")
    if _in_notebook():
        from IPython.display import Image, display  # noqa: PLC0415

        display(Image(filename=str(path)))
    return path


def save_figure(fig, lesson: str, name: str, dpi: int = 120) -> Path:
    """Save ``fig`` as ``lessons/out/<lesson>/<name>``, print the path, show it in a notebook,
    and close it (so a notebook does not draw it a second time and a script never blocks)."""
    path = out_dir(lesson) / name
    fig.savefig(path, dpi=dpi)
    import matplotlib.pyplot as plt  # noqa: PLC0415 - matplotlib loads only when plotting

    plt.close(fig)
    return show_image(path)


def short_run_note(log: str) -> str:
    """One sentence on the held-out score of a short ``minipar.train`` run, from its output.

    The lessons train for 10-20 steps to show that a layout runs; that is far too short to learn
    a task, so an exact match of 0 is expected. The sentence says so, and what the run does
    show: whether the final loss fell below ln(V), the loss of a uniform guess.
    """
    import math  # noqa: PLC0415

    done = re.search(r"done +\| (\d+) steps.*final loss ([0-9.]+), held-out exact match "
                     r"([0-9.]+)", log)
    vocab = re.search(r"vocab (\d+)", log)
    if done is None or vocab is None:
        raise ValueError("no 'done | ... final loss ..., held-out exact match ...' line and "
                         "'vocab N' in this minipar.train output:\n" + log[-2000:])
    steps, loss, match = int(done[1]), float(done[2]), float(done[3])
    uniform = math.log(int(vocab[1]))
    if match >= 0.5:
        return f"held-out exact match {match:.3f} after {steps} steps: the model learned the task."
    fell = (f"the loss fell from about ln({vocab[1]}) = {uniform:.2f} (a uniform guess over the "
            f"vocabulary) to {loss:.2f}" if loss < uniform else
            f"the loss ({loss:.2f}) is not yet below ln({vocab[1]}) = {uniform:.2f}, a uniform "
            "guess")
    return (f"held-out exact match {match:.3f} after {steps} steps is expected: learning to "
            "sort takes a few hundred steps (lesson 1 trains for 200). A run this short "
            f"only shows that the layout trains: {fell}.")


# -- lessons -> notebooks ---------------------------------------------------------------------

def lesson_files(lessons_dir: str | os.PathLike = LESSONS_DIR) -> list[Path]:
    """The lessons (``NN_topic.py``) in ``lessons_dir``, sorted by name."""
    return sorted(Path(lessons_dir).glob(LESSON_GLOB))


def notebook_for(lesson: str | os.PathLike,
                 notebooks_dir: str | os.PathLike = NOTEBOOKS_DIR) -> Path:
    """Where the notebook generated from ``lesson`` lives."""
    return Path(notebooks_dir) / (Path(lesson).stem + ".ipynb")


def to_notebook(lesson: str | os.PathLike):
    """The notebook of ``lesson``: its cells, no outputs, stable ids and metadata.

    Cell ids are numbered, not random, so that regenerating an unchanged lesson rewrites the
    same bytes and a diff of a notebook shows only what changed in its lesson.
    """
    import jupytext  # noqa: PLC0415 - optional dependency (notebooks extra)
    import nbformat  # noqa: PLC0415

    lesson = Path(lesson)
    nb = jupytext.read(lesson, fmt="py:percent")
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:03d}"
        cell.metadata = {}
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.metadata = nbformat.from_dict({
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
        "minipar": {"generated_from": f"lessons/{lesson.name}",
                    "do_not_edit": f"edit the lesson, then run: {SYNC_COMMAND}"},
    })
    nb.nbformat, nb.nbformat_minor = 4, 5
    return nb


def _cells(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source) for c in nb.cells]


def sync(lessons_dir: str | os.PathLike = LESSONS_DIR,
         notebooks_dir: str | os.PathLike = NOTEBOOKS_DIR) -> list[Path]:
    """Regenerate the notebook of every lesson; returns the notebooks whose bytes changed."""
    import nbformat  # noqa: PLC0415

    Path(notebooks_dir).mkdir(parents=True, exist_ok=True)
    written = []
    for lesson in lesson_files(lessons_dir):
        path = notebook_for(lesson, notebooks_dir)
        text = nbformat.writes(to_notebook(lesson)) + "\n"
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            written.append(path)
    return written


def check(lessons_dir: str | os.PathLike = LESSONS_DIR,
          notebooks_dir: str | os.PathLike = NOTEBOOKS_DIR) -> list[str]:
    """Problems found, one line each (empty when every notebook matches its lesson).

    A problem is a lesson without its notebook, a notebook whose cells (type and source) differ
    from its lesson's, or a notebook left behind by a lesson that no longer exists.
    """
    import nbformat  # noqa: PLC0415

    problems = []
    lessons = lesson_files(lessons_dir)
    for lesson in lessons:
        path = notebook_for(lesson, notebooks_dir)
        if not path.exists():
            problems.append(f"{path}: missing (generated from {lesson})")
            continue
        try:
            stored = nbformat.read(path, as_version=4)
        except Exception as exc:  # any unreadable notebook is out of sync, say why
            problems.append(f"{path}: unreadable ({exc.__class__.__name__}: {exc})")
            continue
        want, have = _cells(to_notebook(lesson)), _cells(stored)
        if want != have:
            first = next((i for i, (w, h) in enumerate(zip(want, have)) if w != h),
                         min(len(want), len(have)))
            problems.append(f"{path}: out of sync with {lesson} (first difference at cell "
                            f"{first}; lesson has {len(want)} cells, notebook {len(have)})")
    stems = {lesson.stem for lesson in lessons}
    for path in sorted(Path(notebooks_dir).glob("*.ipynb")):
        if path.stem not in stems:
            problems.append(f"{path}: no lesson {Path(lessons_dir) / (path.stem + '.py')}")
    return problems


def execute_notebook(path: str | os.PathLike, *, cwd: str | os.PathLike = REPO_ROOT,
                     timeout: int = 300):
    """Run every cell of a notebook in a fresh kernel of this interpreter; returns the result.

    The kernel is launched from ``sys.executable`` directly, not from an installed kernelspec,
    so a fresh virtual environment needs no ``ipykernel install`` step and a user's own
    ``python3`` kernelspec cannot pick another interpreter. Plots go to the Agg backend.
    ``timeout`` bounds each cell in seconds. Raises ``nbclient``'s ``CellExecutionError``
    (with the failing cell and its traceback) if a cell fails.
    """
    import nbformat  # noqa: PLC0415
    from jupyter_client import KernelManager  # noqa: PLC0415
    from jupyter_client.kernelspec import KernelSpec  # noqa: PLC0415
    from nbclient import NotebookClient  # noqa: PLC0415

    class VenvKernelManager(KernelManager):
        @property
        def kernel_spec(self) -> KernelSpec:
            return KernelSpec(
                argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                display_name="Python 3 (minipar)", language="python",
                env={"MPLBACKEND": "Agg", "PYTHONHASHSEED": "0"})

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            kernel_manager_class=VenvKernelManager,
                            resources={"metadata": {"path": str(cwd)}})
    return client.execute()


# -- command line -------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minipar.lessons", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("sync", "check", "run"))
    parser.add_argument("--lessons", default=str(LESSONS_DIR), help="lessons directory")
    parser.add_argument("--notebooks", default=str(NOTEBOOKS_DIR), help="notebooks directory")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per cell (run)")
    opts = parser.parse_args(argv)
    if not lesson_files(opts.lessons):  # a wrong directory must not look like success
        print(f"no lessons ({LESSON_GLOB}) in {opts.lessons}", file=sys.stderr)
        return 1
    if opts.command == "sync":
        for path in sync(opts.lessons, opts.notebooks):
            print(f"wrote {path}")
        return 0
    if opts.command == "check":
        problems = check(opts.lessons, opts.notebooks)
        for line in problems:
            print(line, file=sys.stderr)
        if problems:
            print(f"fix: {SYNC_COMMAND}", file=sys.stderr)
            return 1
        print(f"{len(lesson_files(opts.lessons))} notebooks in sync with their lessons")
        return 0
    failed = 0
    for lesson in lesson_files(opts.lessons):
        path = notebook_for(lesson, opts.notebooks)
        try:
            execute_notebook(path, timeout=opts.timeout)
            print(f"ok      {path}")
        except Exception as exc:  # report every notebook, then fail
            failed += 1
            print(f"FAILED  {path}: {exc}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
