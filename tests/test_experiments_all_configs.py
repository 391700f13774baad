"""experiments/all_configs_abdomen.py: every run name resolves to a valid, CPU-sized config."""

import pathlib

import pytest

from tests import experiment_scripts
from unpaired_seg import config_schema, methods

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "all_configs_abdomen.py"
CONFIG_DIR = SCRIPT.parents[1] / "configs"


@pytest.fixture(scope="module")
def script():
  return experiment_scripts.load("all_configs_abdomen")


def test_run_table_names_every_shared_kernel_config(script):
  assert len(set(script.RUN_NAMES)) == len(script.RUN_NAMES)
  assert {m for _, m, _ in script.RUNS} == {
      "individual", "joint", "joint_kd", "y_shaped", "x_shaped", "dualstream", "chilopod",
      "ummkd", "affinity", "csa", "ummkd_3d"}
  assert [n for n in script.RUN_NAMES if n.startswith("dualstream")] == [
      f"dualstream_v{i}" for i in range(1, 5)]
  for _, module, _ in script.RUNS:
    assert (CONFIG_DIR / f"{module}.py").is_file()


@pytest.mark.parametrize("name", [
    "individual", "joint", "joint_kd", "y_shaped", "x_shaped", "dualstream_v1", "dualstream_v2",
    "dualstream_v3", "dualstream_v4", "chilopod", "ummkd", "affinity", "csa", "ummkd_3d"])
def test_every_run_validates_and_keeps_its_published_setting(script, name):
  config = script.experiment_config(name, "/nonexistent/abdomen", steps=7, image_size=96)
  config_schema.validate(config, methods.REGISTRY)
  published = script.published_config(name)
  assert config.method == published.method
  for key in ("name", "ndim", "sharing", "filters", "depth"):
    assert config.model[key] == published.model[key], key
  assert config.train.learning_rate == published.train.learning_rate
  assert config.train.regime == published.train.regime
  assert (config.loss.kd_weight, config.loss.csa_weight) == (
      published.loss.kd_weight, published.loss.csa_weight)
  assert config.data.dataset == "folder" and config.data.root == "/nonexistent/abdomen"
  assert tuple(config.data.image_size) == (96, 96)
  assert config.train.steps == config.train.eval_every == config.train.checkpoint_every == 7
  assert tuple(config.eval.metrics) == ("dice",)


def test_dualstream_variants_differ_and_3d_is_3d(script):
  sharings = {script.experiment_config(f"dualstream_v{i}", "/d", 2, 96).model.sharing
              for i in range(1, 5)}
  assert sharings == {f"dualstream_v{i}" for i in range(1, 5)}
  config = script.experiment_config("ummkd_3d", "/d", 2, 96)
  assert config.model.ndim == 3 and config.train.patch_slices >= 1
