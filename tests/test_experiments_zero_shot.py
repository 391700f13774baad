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
  assert runs["mmsdnet_stn_on"].mmsdnet.transformer.start == 12
  assert script.phantom_runs(0)["mmsdnet_stn_on"].mmsdnet.transformer.start == 300
  assert runs["joint"].train.eval_every == runs["joint"].train.checkpoint_every == 10


def test_a_partial_command_does_not_replace_the_published_table(script, tmp_path):
  assert script.results_path(tmp_path, "phantom", {"joint"}) == tmp_path / "results.md"
  published = script.results_path(tmp_path, "phantom", set())
  assert published == SCRIPT.parent / "results" / "mmsdnet_zero_shot_phantom.md"


def test_seeds_repeat_every_run_and_summarise_the_mean_dice(script):
  runs = script.phantom_runs(0)
  assert script.with_seeds(runs, ["0"]) is runs            # one seed 0: names unchanged
  seeded = script.with_seeds(runs, ["0", "2"])
  assert set(seeded) == {f"{n}_seed{s}" for n in runs for s in (0, 2)}
  assert seeded["joint_seed2"].seed == 2 and seeded["joint_seed0"].seed == 0
  assert runs["joint"].seed == 0                            # the originals are not changed
  with pytest.raises(ValueError, match="repeated"):
    script.with_seeds(runs, ["1", "1"])
  rows = [("a_seed0 multi input", {"mean": 0.5}, "a_seed0"),
          ("a_seed1 multi input", {"mean": 0.7}, "a_seed1"),
          ("a_seed0 single input", {"mean": 0.2}, "a_seed0"),
          ("b single input", {"mean": 0.9}, "b")]
  summary = {label: (mean, sd, n) for label, mean, sd, n in script.seed_summary(rows)}
  assert set(summary) == {"a multi input", "a single input"}
  mean, sd, n = summary["a multi input"]
  assert n == 2 and mean == pytest.approx(0.6) and sd == pytest.approx(0.1414213, rel=1e-5)
