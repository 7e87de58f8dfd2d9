"""Lessons and notebooks: every lesson has an in-sync notebook, and both of them run.

The machinery itself (sync, check, execution, the mpirun helper) is tested on a temporary lesson;
the real lessons are found in ``lessons/`` and a suite that finds none fails.
"""

from __future__ import annotations

import os
import subprocess
import sys

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

from minipar import lessons
from minipar.lessons import MPIRunError, execute_notebook, lesson_files, mpirun, notebook_for

LESSON_TIMEOUT = 300  # seconds per lesson (per cell when run as a notebook)
REAL_LESSONS = lesson_files()

TOY_LESSON = '''\
# %% [markdown]
# # A toy lesson
# It prints where it runs.

# %%
import os
import matplotlib
x = 6 * 7
print(x)

# %%
print(os.getcwd(), matplotlib.get_backend().lower())
'''


@pytest.fixture()
def dirs(tmp_path):
    src, out = tmp_path / "lessons", tmp_path / "notebooks"
    src.mkdir()
    (src / "01_toy.py").write_text(TOY_LESSON)
    (src / "notes.py").write_text("# not a lesson: no NN_ prefix\n")
    return src, out


def test_sync_then_check_roundtrip(dirs):
    src, out = dirs
    assert [p.name for p in lesson_files(src)] == ["01_toy.py"]
    assert "missing" in " ".join(lessons.check(src, out))
    assert lessons.sync(src, out) == [out / "01_toy.ipynb"]
    assert lessons.check(src, out) == []
    assert lessons.sync(src, out) == []  # regenerating an unchanged lesson rewrites nothing
    nb = nbformat.read(out / "01_toy.ipynb", as_version=4)
    assert [c.cell_type for c in nb.cells] == ["markdown", "code", "code"]
    assert nb.cells[1].source.splitlines()[-1] == "print(x)"
    assert all(c.outputs == [] for c in nb.cells if c.cell_type == "code")

    # metadata noise (a kernel name, cell ids, an execution count) is not a difference
    nb.metadata["kernelspec"]["display_name"] = "Something else"
    nb.cells[1].id, nb.cells[1].execution_count = "other-id", 3
    nbformat.write(nb, out / "01_toy.ipynb")
    assert lessons.check(src, out) == []

    (src / "01_toy.py").write_text(TOY_LESSON.replace("6 * 7", "6 * 9"))
    problems = lessons.check(src, out)
    assert len(problems) == 1 and "out of sync" in problems[0] and "cell 1" in problems[0]
    (out / "02_gone.ipynb").write_text((out / "01_toy.ipynb").read_text())
    assert any("02_gone" in p and "no lesson" in p for p in lessons.check(src, out))
    lessons.sync(src, out)
    (out / "02_gone.ipynb").unlink()
    assert lessons.check(src, out) == []


def test_command_line_check_fails_with_the_fix(dirs, capsys):
    src, out = dirs
    args = ["--lessons", str(src), "--notebooks", str(out)]
    assert lessons.main(["check", *args]) == 1
    assert lessons.SYNC_COMMAND in capsys.readouterr().err
    assert lessons.main(["sync", *args]) == 0
    assert lessons.main(["check", *args]) == 0
    empty = src.parent / "empty"
    empty.mkdir()
    assert lessons.main(["check", "--lessons", str(empty), "--notebooks", str(out)]) == 1


def test_notebook_executes_in_repo_root_with_agg(dirs):
    src, out = dirs
    lessons.sync(src, out)
    nb = execute_notebook(out / "01_toy.ipynb", timeout=60)
    printed = [o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert printed[0].strip() == "42"
    assert printed[1].split() == [str(lessons.REPO_ROOT), "agg"]


def test_failing_notebook_raises(dirs):
    src, out = dirs
    (src / "01_toy.py").write_text("# %%\nraise ValueError('lesson broke')\n")
    lessons.sync(src, out)
    with pytest.raises(CellExecutionError, match="lesson broke"):
        execute_notebook(out / "01_toy.ipynb", timeout=60)


def test_mpirun_helper_runs_ranks_and_reports_failures():
    script = ("import os; from mpi4py import MPI; "
              "print('rank', MPI.COMM_WORLD.rank, 'of', MPI.COMM_WORLD.size, "
              "os.environ['OPENBLAS_NUM_THREADS'], flush=True)")
    out = mpirun(2, ["-c", script], timeout=60, stream=False)
    assert sorted(line for line in out.splitlines() if line.startswith("rank")) == [
        "rank 0 of 2 1", "rank 1 of 2 1"]
    failing = ("import sys; from mpi4py import MPI; r = MPI.COMM_WORLD.rank; "
               "print('rank-says-bye', flush=True); sys.exit(3 if r == 1 else 0)")
    with pytest.raises(MPIRunError, match="(?s)exit.*rank-says-bye"):
        mpirun(2, ["-c", failing], timeout=60, stream=False)
    with pytest.raises(MPIRunError, match="timed out"):
        mpirun(1, ["-c", "import time; time.sleep(60)"], timeout=2, stream=False)


# -- the real lessons -----------------------------------------------------------------------------

def _lesson_params():
    if not REAL_LESSONS:  # a suite that collects no lesson must not pass
        return [pytest.param(None, id="no-lessons")]
    return [pytest.param(p, id=p.stem) for p in REAL_LESSONS]


def _require(lesson):
    if lesson is None:
        pytest.fail(f"no lessons ({lessons.LESSON_GLOB}) found in {lessons.LESSONS_DIR}")


@pytest.mark.parametrize("lesson", _lesson_params())
def test_lesson_notebook_is_in_sync(lesson):
    _require(lesson)
    problems = [p for p in lessons.check() if lesson.stem in p]
    assert not problems, "\n".join(problems) + f"\nfix: {lessons.SYNC_COMMAND}"


def test_no_notebook_without_a_lesson():
    orphans = [p for p in lessons.check() if "no lesson" in p]
    assert not orphans, "\n".join(orphans)


@pytest.mark.timeout(LESSON_TIMEOUT + 60)
@pytest.mark.parametrize("lesson", _lesson_params())
def test_notebook_executes(lesson):
    _require(lesson)
    path = notebook_for(lesson)
    assert path.exists(), f"{path} is missing; run: {lessons.SYNC_COMMAND}"
    execute_notebook(path, timeout=LESSON_TIMEOUT)


@pytest.mark.timeout(LESSON_TIMEOUT + 60)
@pytest.mark.parametrize("lesson", _lesson_params())
def test_lesson_runs_as_a_script(lesson):
    _require(lesson)
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(lesson)], cwd=lessons.REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=LESSON_TIMEOUT)
    assert proc.returncode == 0, f"{lesson} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
