"""The Table II driver: fold configs, the recipe, reuse of finished runs, pooling over folds."""

import json
import types

import numpy as np
import pytest

from tests import experiment_scripts


@pytest.fixture(scope="module")
def table2():
  return experiment_scripts.load("table2_abdomen")


def _settings(table2, **changes):
  return types.SimpleNamespace(**{**table2.DEFAULTS, **changes})


def test_each_fold_gets_its_split_and_the_recipe(table2, tmp_path):
  config = table2.experiment_config("ummkd", tmp_path, fold=2, settings=_settings(table2))
  assert config.data.split.folds == 5 and config.data.split.fold == 2
  assert config.data.oversample == "class" and config.train.ema_decay == 0.999
  assert config.data.normalization == "ct=foreground_zscore"
  assert config.train.steps == table2.DEFAULTS["steps"]
  plain = table2.experiment_config("ummkd", tmp_path, 2, _settings(table2, recipe="plain"))
  assert plain.data.oversample == "foreground" and plain.train.ema_decay == 0.0


def test_a_finished_run_is_reused_only_with_the_same_settings(table2, tmp_path):
  config = table2.experiment_config("joint", tmp_path, fold=0, settings=_settings(table2))
  run = tmp_path / "run"
  run.mkdir()
  assert table2.finished(run, config) is None
  (run / "config.json").write_text(json.dumps(config.to_dict()))
  (run / "summary.json").write_text(json.dumps({"modalities": {}}))
  assert table2.finished(run, config) == {"modalities": {}}
  other = table2.experiment_config("joint", tmp_path, fold=1, settings=_settings(table2))
  assert table2.finished(run, other) is None


def test_folds_are_pooled_over_every_test_volume(table2):
  def summary(values):
    cases = {f"c{i}": {o: {"dice": v} for o in table2.ORGANS} for i, v in enumerate(values)}
    return {"modalities": {"mr": {"per_case": cases}, "ct": {"per_case": cases}}}
  pooled = table2.pooled_rows({("joint", 0): summary([0.5, 0.7]), ("joint", 1): summary([0.9])})
  np.testing.assert_allclose(pooled["joint"]["mr"]["liver"], [0.5, 0.7, 0.9])
  np.testing.assert_allclose(pooled["joint"]["ct"]["mean"], [0.5, 0.7, 0.9])
  text = table2.format_table({("joint", 0): summary([0.5, 0.7]), ("joint", 1): summary([0.9])},
                             {("joint", 0): 60.0, ("joint", 1): 120.0})
  assert "| Joint | 0.700 +- 0.163" in text and "| 3 | 3 |" in text
