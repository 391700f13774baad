"""experiments/stn_label_registration.py: the label-registration bound of the transformer."""

import numpy as np
import pytest

from configs import mmsdnet
from tests import experiment_scripts


@pytest.fixture(scope="module")
def script():
  return experiment_scripts.load("stn_label_registration")


def test_mean_dice_by_hand(script):
  a = np.array([[0, 1, 1], [2, 2, 0]])
  b = np.array([[0, 1, 0], [2, 0, 0]])
  # class 1: 2 * 1 / (2 + 1); class 2: 2 * 1 / (2 + 1); class 3 absent from both: left out, as
  # in summary.json's alignment block.
  assert script.mean_dice(a, b, ("background", "x", "y", "z")) == pytest.approx(2 / 3)


def test_a_short_run_starts_at_the_identity_and_reports_finite_figures(script, tmp_path):
  config = mmsdnet.get_config("tiny")
  config.data.root = str(tmp_path / "phantom")
  lines = []
  rows = script.run(config, steps=3, learning_rate=1e-3, seed=0, workdir=tmp_path / "work",
                    report=lines.append)
  assert [r["step"] for r in rows] == [0, 3] and len(lines) == 2
  first, last = rows
  assert first["warped"] == first["unwarped"] and first["offset_px"] == 0.0   # zero last layer
  assert 0.0 < first["unwarped"] <= 1.0
  assert last["offset_px"] > 0.0 and np.isfinite(last["warped"])
