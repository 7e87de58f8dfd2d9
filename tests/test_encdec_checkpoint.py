"""Encoder-decoder checkpoints: saved in one layout, resumed in another, the losses continue the
uninterrupted run's, and --show decodes the resumed model (in-process thread worlds)."""

import json

import numpy as np
import pytest

from inproc import train
from minipar import checkpoint

# --pos-bias: a tensor split over tp by heads, so resuming under tp must cut each rank's heads
BASE = ["--arch", "encdec", "--task", "summarize", "--quiet", "--dtype", "float64", "--model",
        "tiny", "--eval-every", "100", "--batch-size", "8", "--pos-bias"]


def losses(path):
    return json.loads(path.read_text())["losses"]


@pytest.mark.parametrize("save_layout, resume_layout, n_save, n_resume", [
    (["--dp", "2", "--zero", "2"], ["--tp", "2"], 2, 2),
    (["--tp", "2", "--dp", "2", "--zero", "3"], [], 4, 1),
])
def test_encdec_resume_in_another_layout(tmp_path, save_layout, resume_layout, n_save, n_resume):
    full, first, second, ckpt = (tmp_path / "full.json", tmp_path / "a.json",
                                 tmp_path / "b.json", tmp_path / "run")
    assert max(train([*BASE, "--steps", "4", "--summary", str(full)], n=1)[0]) == 0
    codes, _, err = train([*BASE, *save_layout, "--steps", "2", "--save", str(ckpt),
                           "--summary", str(first)], n=n_save)
    assert max(codes) == 0, err
    assert checkpoint.list_steps(str(ckpt)) == [2]
    codes, out, err = train([*BASE, *resume_layout, "--steps", "4", "--resume", str(ckpt),
                             "--summary", str(second), "--show", "1"], n=n_resume)
    assert max(codes) == 0, err
    assert "resume  | from step 2" in out
    np.testing.assert_allclose(losses(first) + losses(second), losses(full), rtol=1e-9)
    shown = [ln for ln in out.splitlines() if ln.startswith("show    |") and " -> " in ln]
    assert len(shown) == 1 and "exact match" in out, out
