"""Every config file resolves and validates; typos and bad values fail with the key named."""

import pathlib

import pytest
from ml_collections import config_flags  # noqa: F401  (the loader main.py uses)

from configs import common
from unpaired_seg import config_schema, methods
from unpaired_seg.baselines import section

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(p for p in CONFIG_DIR.glob("*.py") if p.name != "common.py")


def _load(path: pathlib.Path, arg=None):
  import importlib.util
  spec = importlib.util.spec_from_file_location(f"configs.{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_every_config_validates(path, arg):
  config = _load(path, arg)
  if "baseline" in config:   # copy / register / multi_atlas: no network, their own registry
    section.validate(config)
    assert config.method in section.METHODS
  else:
    config_schema.validate(config, methods.REGISTRY)
    assert config.method in methods.REGISTRY


def test_config_files_exist_for_the_baselines():
  assert {"joint", "individual"} <= {p.stem for p in CONFIG_FILES}


def test_tiny_is_small():
  tiny = common.get_base_config(tiny=True)
  full = common.get_base_config()
  assert tiny.train.steps < full.train.steps and tiny.model.features < full.model.features


def test_misspelled_key_is_named():
  config = common.get_base_config()
  with config.unlocked():
    config.train.stepz = 3
  with pytest.raises(config_schema.ConfigError, match=r"'train\.stepz'"):
    config_schema.validate(config)


def test_missing_key_is_named():
  config = common.get_base_config()
  del config.train["eval_every"]
  with pytest.raises(config_schema.ConfigError, match=r"'train\.eval_every' is missing"):
    config_schema.validate(config)


@pytest.mark.parametrize("key,value,pattern", [
    ("model.norm.kind", "batchnorm", r"model\.norm\.kind"),
    ("train.steps", -1, r"train\.steps"),
    ("data.split.train", 0.9, r"data\.split"),
    ("data.image_size", (60, 64), r"data\.image_size"),
    ("train.learning_rate", -1.0, r"train\.learning_rate"),
    ("method", "unknown_method", r"'method'"),
])
def test_bad_values_are_named(key, value, pattern):
  config = common.get_base_config()
  node = config
  *parents, leaf = key.split(".")
  for p in parents:
    node = node[p]
  with config.unlocked():
    node[leaf] = value
  with pytest.raises(config_schema.ConfigError, match=pattern):
    config_schema.validate(config, methods.REGISTRY)


def test_parse_arg():
  args = common.parse_arg("tiny,steps=5,name=x", tiny=False, steps=1, name="a", rate=0.5)
  assert args.tiny is True and args.steps == 5 and args.name == "x" and args.rate == 0.5
  with pytest.raises(ValueError, match="'stepz'"):
    common.parse_arg("stepz=5", steps=1)
  with pytest.raises(ValueError, match="steps='many'"):
    common.parse_arg("steps=many", steps=1)


def test_a_config_saved_before_keys_were_added_validates_with_their_old_behaviour():
  import ml_collections
  saved = common.get_base_config().to_dict()
  for dotted in config_schema.ADDED_KEYS:
    node = saved
    *parents, key = dotted.split(".")
    for name in parents:
      node = node[name]
    node.pop(key)
  with pytest.raises(config_schema.ConfigError):
    config_schema.validate(ml_collections.ConfigDict(saved), methods.REGISTRY)
  filled = ml_collections.ConfigDict(config_schema.with_added_keys(saved))
  config_schema.validate(filled, methods.REGISTRY)
  assert filled.train.optimizer == "adam" and filled.train.ema_decay == 0.0
  assert filled.data.augment.p_rotate == 1.0 and filled.data.augment.p_gamma == 0.0
  # Every key the schema knows today is either in the base config or filled in.
  assert set(config_schema.ADDED_KEYS) <= {
      f"{a}.{b}" for a, v in common.get_base_config().to_dict().items()
      if isinstance(v, dict) for b in v} | {
      f"data.augment.{k}" for k in common.get_base_config().data.augment}
