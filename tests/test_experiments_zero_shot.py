"""experiments/mmsdnet_zero_shot.py: its runs are the configs it claims, on the phantom it asks for."""

import pathlib

import pytest

from tests import experiment_scripts
from unpaired_seg import config_schema, methods

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "mmsdnet_zero_shot.py"


@pytest.fixture(scope="module")
def script():
  return experiment_scripts.load("mmsdnet_zero_shot")


@pytest.mark.parametrize("misalignment", [1.0, 3.0])
def test_phantom_runs_are_zero_shot_ct_on_the_requested_paired_phantom(script, misalignment):
  runs = script.phantom_runs(0, misalignment)
  assert set(runs) == {"mmsdnet_stn_on", "mmsdnet_stn_off", "mmsdnet_stn_on_partners_unaugmented",
                       "mmsdnet_stn_off_partners_unaugmented", "joint"}
  for name, config in runs.items():
    config_schema.validate(config, methods.REGISTRY)
    assert config.data.phantom.mode == "paired"
    assert config.data.phantom.pair_misalignment == misalignment
    assert (config.data.target_modality, config.data.label_fraction) == ("ct", 0.0)
    if name != "joint":
      assert config.mmsdnet.stn == ("stn_on" in name)
      assert config.mmsdnet.augment_partners == ("unaugmented" not in name)
      assert config.train.steps == 1000
  assert runs["joint"].method == "joint"


def test_steps_scale_swa_and_evaluations(script):
  runs = script.phantom_runs(40)
  assert runs["mmsdnet_stn_on"].train.steps == 40
  assert runs["mmsdnet_stn_on"].mmsdnet.swa_start == 28
  assert runs["mmsdnet_stn_on"].mmsdnet.stn_start == 12
  assert script.phantom_runs(0)["mmsdnet_stn_on"].mmsdnet.stn_start == 300
  assert runs["joint"].train.eval_every == runs["joint"].train.checkpoint_every == 10


def test_a_partial_command_does_not_replace_the_published_table(script, tmp_path):
  assert script.results_path(tmp_path, "phantom", {"joint"}) == tmp_path / "results.md"
  published = script.results_path(tmp_path, "phantom", set())
  assert published == SCRIPT.parent / "results" / "mmsdnet_zero_shot_phantom.md"
