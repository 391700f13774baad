"""The plan from a dataset's fingerprint: view size, normalisation, width and steps for a budget,
and its application by `data=<prepared>` with the command line still on top."""

import json

import numpy as np
import pytest

from configs import common
from unpaired_seg.data import phantom
from unpaired_seg.data import plan as plan_lib


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  manifest = phantom.generate(tmp_path_factory.mktemp("p") / "ds", mode="unpaired",
                              num_subjects=4, shape=(32, 32, 12), seed=1)
  return manifest.root


def test_body_extent_is_the_bright_region_of_the_mean_slice():
  image = np.zeros((40, 30, 5), np.float32)
  image[5:25, 3:13] = 1.0            # 20 rows x 10 columns of body
  assert plan_lib.body_extent(image) == (20, 10)


def test_fingerprint_of_a_dataset(dataset):
  print_ = plan_lib.fingerprint(dataset)
  assert set(print_["modalities"]) == {"mr", "ct"}
  for m in print_["modalities"].values():
    assert m["cases"] == 4 and len(m["body_extent"]) == 4
    assert m["median_shape"][:2] == [32, 32]
    assert abs(sum(m["foreground_share"].values()) - 1.0) < 1e-3
    assert all(0 < e <= 32 for extent in m["body_extent"] for e in extent)


def _print(extents, largest=(256, 256)):
  return {"labels": ["background", "liver"], "modalities": {
      "mr": {"body_extent": extents, "max_inplane_shape": list(largest),
             "normalization": {"scheme": "zscore"}},
      "ct": {"body_extent": extents, "max_inplane_shape": list(largest),
             "normalization": {"scheme": "zscore"}}}}


def test_view_covers_the_body_of_most_volumes_in_multiples_of_the_pooling_factor():
  extents = [[100, 90]] * 9 + [[200, 200]]          # one outlier of ten
  assert plan_lib.view_size(_print(extents), depth=4, coverage=0.9) == (112, 96)
  assert plan_lib.view_size(_print(extents), depth=4, coverage=1.0) == (208, 208)
  # Never past the largest slice (rounded up to the factor).
  assert plan_lib.view_size(_print([[300, 300]], largest=(120, 120)), depth=4) == (128, 128)


def test_the_widest_network_that_fits_the_steps_into_the_budget_is_chosen():
  timed = []

  def step_seconds(features, batch, size):
    timed.append(features)
    return {32: 2.0, 16: 0.5, 8: 0.2}[features]

  plan = plan_lib.make_plan(_print([[100, 90]]), budget_minutes=20, step_seconds=step_seconds,
                            min_steps=1000)
  config = plan["config"]
  # 20 min * 0.85 = 1020 s: 32 features give 510 steps (< 1000), 16 give 2040.
  assert config["model.features"] == 16 and config["train.steps"] == 2040
  assert timed == [32, 16]                    # stops at the first that fits
  assert config["data.normalization"] == "mr=zscore,ct=foreground_zscore"
  assert config["data.oversample"] == "class"
  assert config["data.image_size"] == [112, 96]
  with pytest.raises(plan_lib.PlanError, match="budget_minutes"):
    plan_lib.make_plan(_print([[100, 90]]), budget_minutes=0, step_seconds=step_seconds)


def test_data_argument_applies_the_plan_and_the_command_line_still_wins(dataset, tmp_path):
  plan = plan_lib.make_plan(plan_lib.fingerprint(dataset), budget_minutes=5,
                            step_seconds=lambda f, b, s: 0.1)
  root = tmp_path / "prepared"
  root.mkdir()
  plan_lib.write_plan(plan, root / plan_lib.PLAN_FILE)
  c = common.get_base_config()
  common.use_prepared_data(c, str(root))
  assert c.train.steps == plan["config"]["train.steps"] == int(5 * 60 * 0.85 / 0.1)
  assert c.model.features == 32 and c.data.oversample == "class"
  assert tuple(c.data.image_size) == tuple(plan["config"]["data.image_size"])
  c.train.steps = 7                         # what --config.train.steps=7 does after get_config
  assert c.train.steps == 7
  # Without a plan the CPU-sized defaults stay.
  bare = common.get_base_config()
  common.use_prepared_data(bare, str(tmp_path / "no_plan"))
  assert bare.train.steps == 600


def test_a_broken_or_foreign_plan_names_its_file(tmp_path):
  (tmp_path / plan_lib.PLAN_FILE).write_text("{not json")
  with pytest.raises(plan_lib.PlanError, match="plan.json"):
    plan_lib.read_plan(tmp_path)
  (tmp_path / plan_lib.PLAN_FILE).write_text(json.dumps(
      {"version": plan_lib.VERSION, "config": {"train.no_such_key": 1}}))
  with pytest.raises(plan_lib.PlanError, match="train.no_such_key"):
    plan_lib.apply_plan(common.get_base_config(), plan_lib.read_plan(tmp_path))
