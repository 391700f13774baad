"""configs/zero_shot.py and experiments/zero_shot_abdomen.py: the target keeps no label, the
randomisation is on, the trainer's step (augmentation included) lowers the loss on a tiny config,
and a finished zero-label row is reused only with the same randomisation."""

import json
import pathlib

import chex
import jax
import numpy as np
import pytest

from configs import zero_shot
from unpaired_seg import config_schema, methods, train
from tests import experiment_scripts
from tests.method_steps import two_modality_batch


@pytest.fixture(scope="module")
def driver():
  return experiment_scripts.load("zero_shot_abdomen")


def test_config_leaves_the_target_unlabelled_and_randomises_the_other():
  config = zero_shot.get_config("tiny,target=ct")
  config_schema.validate(config)
  assert config.method == "joint" and config.data.target_modality == "ct"
  assert config.data.label_fraction == 0.0 and config.eval.checkpoint == "latest"
  aug = config.data.augment.intensity
  assert aug.p_gin > 0 and aug.p_global > 0 and aug.p_local > 0
  assert zero_shot.get_config("tiny,randomization=none").data.augment.intensity.p_gin == 0
  with pytest.raises(ValueError, match="randomization 'gn'"):
    zero_shot.get_config("tiny,randomization=gn")


def test_tiny_zero_shot_step_lowers_the_loss_and_traces_once():
  config = zero_shot.get_config("tiny")
  config.train.learning_rate = 1e-2
  # nnU-Net's transforms off (they have tests of their own): the step traces the randomisation.
  aug = config.data.augment
  aug.update({k: 0.0 for k in aug if k.startswith("p_")})
  method = methods.create(config, num_classes=5, modalities=("mr", "ct"))
  batch = two_modality_batch()
  batch["mr"]["labelled"] = np.zeros(4, np.float32)          # the target: no label
  state = method.init(jax.random.PRNGKey(0), batch)
  chex.clear_trace_counter()
  step = train.make_train_step(method, config)
  losses = []
  for _ in range(20):
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["grad_norm"]))
    losses.append(float(metrics["loss"]))
  assert step._cache_size() == 1
  # Each step draws other intensities for the CT images: the loss is noisy, so compare averages.
  assert np.mean(losses[-5:]) < 0.85 * np.mean(losses[:5]), losses


def test_rows_differ_only_in_the_randomisation_and_reuse_needs_the_same(driver, tmp_path):
  root = pathlib.Path("/nonexistent/prepared")
  none, gin = (driver.row_config(k, "mr", root, 1) for k in ("none", "gin"))
  assert none.data.split.fold == 1 and none.data.target_modality == "mr"
  assert none.data.label_fraction == 0.0 and none.method == "joint"
  assert none.data.augment.intensity.p_gin == 0 and gin.data.augment.intensity.p_gin == 1.0
  assert driver.table2.settings_of(none) == driver.table2.settings_of(gin)
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text(json.dumps(gin.to_dict()))
  (run / "summary.json").write_text(json.dumps({"modalities": {}}))
  assert driver.finished(run, gin) == {"modalities": {}}
  assert driver.finished(run, none) is None


def test_the_multi_atlas_row_uses_the_folds_splits_and_grid_of_the_trained_rows(driver, tmp_path):
  from unpaired_seg.baselines import section
  root = pathlib.Path("/nonexistent/prepared")
  atlas, none = driver.atlas_config("mr", root, 2), driver.row_config("none", "mr", root, 2)
  section.validate(atlas)
  assert atlas.method == "multi_atlas" and section.targets(atlas) == {"mr": "ct"}
  assert atlas.data.split.to_dict() == none.data.split.to_dict()
  assert atlas.data.root == none.data.root and atlas.eval.grid == none.eval.grid
  run = tmp_path / "atlas"
  run.mkdir()
  (run / "config.json").write_text(json.dumps(atlas.to_dict()))
  (run / "summary.json").write_text(json.dumps({"modalities": {}}))
  assert driver.table2.finished(run, atlas, key=driver.atlas_settings_of) == {"modalities": {}}
  other = driver.atlas_config("mr", root, 3)
  assert driver.table2.finished(run, other, key=driver.atlas_settings_of) is None


def test_an_instance_norm_row_changes_the_norm_and_is_not_the_batch_norm_run(driver, tmp_path):
  root = pathlib.Path("/nonexistent/prepared")
  slaug, instance = (driver.row_config(k, "mr", root, 0) for k in ("slaug", "slaug_instance"))
  assert slaug.model.norm.kind == "batch" and instance.model.norm.kind == "instance"
  assert instance.data.augment.intensity.to_dict() == slaug.data.augment.intensity.to_dict()
  config_schema.validate(instance, methods.REGISTRY)
  run = tmp_path / "run"
  run.mkdir()
  (run / "config.json").write_text(json.dumps(slaug.to_dict()))
  (run / "summary.json").write_text(json.dumps({"modalities": {}}))
  assert driver.finished(run, instance) is None
