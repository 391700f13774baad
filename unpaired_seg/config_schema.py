"""Validation of a resolved config, once, at start-up.

Every key of the config must be declared here (or in a method's own section, which the plug-in
declares in `methods.register_config_sections`: `validate` calls it), every value must have the
declared type and range. A misspelled or unknown key
fails with its full dotted name, instead of being ignored as `config.get('x', default)` would.
"""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from unpaired_seg import metrics as metrics_lib


class ConfigError(ValueError):
  """A config key is unknown, missing or has a bad value; the message names the key."""


@dataclasses.dataclass(frozen=True)
class Field:
  """One config leaf: accepted types, an optional check, and a description for the error."""
  types: tuple[type, ...]
  check: Callable[[Any], bool] | None = None
  expect: str = ""

  def validate(self, key: str, value: Any) -> None:
    if isinstance(value, bool) and bool not in self.types:
      raise ConfigError(f"config key {key!r}: expected {self._names()}, got the boolean {value!r}")
    if not isinstance(value, self.types):
      raise ConfigError(f"config key {key!r}: expected {self._names()}, got {type(value).__name__} "
                        f"{value!r}")
    if self.check is not None and not self.check(value):
      raise ConfigError(f"config key {key!r}: expected {self.expect}, got {value!r}")

  def _names(self) -> str:
    return " or ".join(t.__name__ for t in self.types)


def choice(*options: str) -> Field:
  return Field((str,), lambda v: v in options, f"one of {options}")


def positive_int() -> Field:
  return Field((int,), lambda v: v > 0, "an integer > 0")


def non_negative_int() -> Field:
  return Field((int,), lambda v: v >= 0, "an integer >= 0")


def number(lo: float = float("-inf"), hi: float = float("inf")) -> Field:
  return Field((int, float), lambda v: lo <= v <= hi, f"a number in [{lo}, {hi}]")


def int_tuple(length: int | None = None, positive: bool = True) -> Field:
  def ok(v):
    return ((length is None or len(v) == length) and all(isinstance(i, int) for i in v)
            and (not positive or all(i > 0 for i in v)))
  return Field((tuple, list), ok, f"a sequence of {length or 'any number of'} positive integers")


def str_tuple() -> Field:
  return Field((tuple, list), lambda v: all(isinstance(i, str) for i in v), "a sequence of strings")


def number_pair(lo: float = float("-inf"), hi: float = float("inf"), positive: bool = False) -> Field:
  """(low, high) with low <= high, both in [lo, hi] (and > 0 where `positive`)."""
  def ok(v):
    return (len(v) == 2 and all(isinstance(i, (int, float)) and not isinstance(i, bool)
                                and lo <= i <= hi and (i > 0 or not positive) for i in v)
            and v[0] <= v[1])
  bounds = "" if (lo, hi) == (float("-inf"), float("inf")) else f" in [{lo}, {hi}]"
  return Field((tuple, list), ok,
               f"a pair (low, high) of {'positive ' if positive else ''}numbers{bounds}")


BOOL = Field((bool,))
STRING = Field((str,))

SCHEMA: dict[str, Any] = {
    "method": STRING,  # checked against the method registry by `validate`
    "seed": non_negative_int(),
    "data": {
        "dataset": choice("phantom", "folder"),
        "root": STRING,
        "modalities": Field((tuple, list), lambda v: len(v) >= 1 and len(set(v)) == len(v)
                            and all(isinstance(m, str) for m in v), "distinct modality names"),
        "phantom": {
            "mode": choice("paired", "unpaired"),
            "num_subjects": Field((int,), lambda v: v >= 3, "an integer >= 3"),
            "shape": int_tuple(3),
            "seed": non_negative_int(),
            "pair_misalignment": number(0.0, 4.0),
        },
        "image_size": int_tuple(2),
        "context_slices": non_negative_int(),
        "foreground_fraction": number(0.0, 1.0),
        "oversample": choice("foreground", "class"),
        "target_modality": STRING,
        "label_fraction": number(0.0, 1.0),
        "split": {"train": number(0.0, 1.0), "val": number(0.0, 1.0), "test": number(0.0, 1.0),
                  "folds": Field((int,), lambda v: v == 0 or v >= 2, "0 (fractions) or >= 2"),
                  "fold": non_negative_int()},
        "normalization": STRING,
        "crop": choice("body", "centre"),
        "augment": {
            "enabled": BOOL,
            # Each p_* is a per-sample probability; ranges are (low, high) of a uniform draw.
            **{f"p_{name}": number(0.0, 1.0) for name in (
                "rotate", "scale", "elastic", "mirror", "noise", "blur", "brightness", "contrast",
                "lowres", "gamma", "gamma_inverted")},
            "rotate_deg": number(0.0, 180.0),
            "scale": number_pair(positive=True),
            "elastic": BOOL,
            "elastic_alpha": number_pair(0.0),
            "elastic_sigma": number_pair(positive=True),
            "mirror_axes": Field((tuple, list), lambda v: len(set(v)) == len(v) and all(
                isinstance(a, int) and not isinstance(a, bool) and a in (0, 1) for a in v),
                "distinct axes from (0, 1)"),
            "flip": BOOL,
            "noise_std": number_pair(0.0),
            "blur_sigma": number_pair(positive=True),
            "brightness": number_pair(0.0),
            "contrast": number_pair(0.0),
            "lowres_zoom": number_pair(0.0, 1.0, positive=True),
            "gamma": number_pair(positive=True),
            "gamma_retain_stats": BOOL,
            # Intensity randomisation of labelled samples (data/randomize.py).
            "intensity": {"p_gin": number(0.0, 1.0), "gin_layers": Field(
                              (int,), lambda v: v >= 2, ">= 2 (an input and an output layer)"),
                          "gin_channels": positive_int(), "gin_leak": number(0.0, 1.0),
                          "p_ipa": number(0.0, 1.0),
                          "ipa_grid": Field((int,), lambda v: v >= 2, ">= 2"),
                          "p_global": number(0.0, 1.0), "p_local": number(0.0, 1.0),
                          "p_nonmonotone": number(0.0, 1.0)},
        },
    },
    "model": {
        "name": choice("unet", "resfcn", "dilated"),
        "features": positive_int(),                 # unet
        "depth": positive_int(),                    # unet
        "ndim": Field((int,), lambda v: v in (2, 3), "2 or 3"),
        "filters": int_tuple(),                     # resfcn: channels per scale
        "units_per_scale": positive_int(),          # resfcn
        "strides": Field((tuple, list), lambda v: len(v) >= 1 and all(
            isinstance(s, int) and s > 0 or isinstance(s, (tuple, list)) and all(
                isinstance(a, int) and a > 0 for a in s) for s in v),
            "per scale a positive int or a sequence of them"),   # resfcn
        "dropout": Field((int, float), lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
        "widths": int_tuple(),                      # dilated: channels per stage
        "head_channels": non_negative_int(),        # dilated: 0 = 8 * classes
        "deep_supervision": BOOL,                   # unet
        "sharing": STRING,
        "norm": {
            "kind": choice("batch", "instance", "layer", "group", "none"),
            "momentum": number(0.0, 1.0),
            "epsilon": number(0.0, 1.0),
            "num_groups": positive_int(),
            "sync": BOOL,
        },
    },
    "loss": {
        "dice_weight": number(0.0),
        "ce_weight": number(0.0),
        "class_weights": choice("none", "batch"),   # batch: UMMKD code's 1 - n_c / N, clipped CE
        "ce_clip": Field((int, float), lambda v: 0.0 < v < 1.0, "a number in (0, 1)"),
        "kd_weight": number(0.0),                   # alpha of (alpha / 2) L_kd; 0 = off
        "kd_temperature": Field((int, float), lambda v: v > 0, "a number > 0"),
        "kd_absent": choice("skip", "uniform"),
        "csa_weight": number(0.0),                  # lambda of L_csa; 0 = off
        "csa_layers": Field((tuple, list), lambda v: len(v) in (0, 2) and all(
            isinstance(b, str) and b for b in v), "() or two block names"),
        "csa_class_specific": BOOL,
        "weight_decay": number(0.0),                # eta of the L2 term on kernels and norms
    },
    "train": {
        "steps": non_negative_int(),
        "batch_size": positive_int(),
        "regime": choice("mixed", "alternate"),
        "patch_slices": positive_int(),             # 3D networks: slices per training patch
        "learning_rate": number(0.0),
        "adam_epsilon": Field((int, float), lambda v: v > 0, "a number > 0"),
        # Supervised methods' optimiser and schedule (optim.OPTIMIZERS, optim.SCHEDULES).
        "optimizer": choice("adam", "adamw", "sgd"),
        "momentum": Field((int, float), lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
        "adamw_weight_decay": number(0.0),
        "grad_clip": number(0.0),                   # global norm; 0 = off
        "lr_schedule": choice("exponential", "poly"),
        "lr_decay": {"rate": number(0.0, 1.0), "every": positive_int()},
        "lr_poly_exponent": Field((int, float), lambda v: v > 0, "a number > 0"),
        "lr_warmup_steps": non_negative_int(),
        "ema_decay": Field((int, float), lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
        "log_every": positive_int(),
        "eval_every": positive_int(),
        "checkpoint_every": positive_int(),
        "keep_checkpoints": positive_int(),
        # 'auto' (the user's cache folder), 'off', or a folder (see compile_cache.py).
        "compilation_cache": STRING,
        # float32, or bfloat16 for the networks' arithmetic (ops/precision.py).
        "compute_dtype": choice("float32", "bfloat16"),
    },
    "eval": {
        "batch_size": positive_int(),
        "checkpoint": choice("best", "latest"),
        "max_val_cases": positive_int(),
        "metrics": Field((tuple, list),
                         lambda v: len(v) >= 1 and len(set(v)) == len(v)
                         and all(m in metrics_lib.METRIC_NAMES for m in v),
                         f"distinct names from {metrics_lib.METRIC_NAMES}"),
        "surface_tolerance_mm": number(0.0),
        "hd95_variant": choice(*metrics_lib.HD95_VARIANTS),
        "assd_variant": choice(*metrics_lib.ASSD_VARIANTS),
        "grid": choice("source", "dataset"),
        "tile_overlap": Field((int, float), lambda v: 0.0 <= v < 1.0, "a number in [0, 1)"),
        "save_predictions": non_negative_int(),
    },
}

_METHOD_SECTIONS: dict[str, dict[str, Any]] = {}


def register_section(name: str, schema: Mapping[str, Any]) -> None:
  """Declares a top-level section owned by a method plug-in (e.g. 'kd' or 'mmsdnet'); declaring
  it again replaces it."""
  if name in SCHEMA:
    raise ValueError(f"config section {name!r} is already a core section")
  _METHOD_SECTIONS[name] = dict(schema)


def method_sections() -> dict[str, Any]:
  """The sections of the method plug-ins, by name, each declared by `register_config_sections`."""
  from unpaired_seg import methods  # the plug-ins import this module: only when validating
  methods.register_config_sections()
  return dict(_METHOD_SECTIONS)


# Keys added after runs were already written, with the value that reproduces what such a run did
# (not always today's default: old runs rotated and scaled every slice, and drew no intensity
# transform). `with_added_keys` fills them into a saved config.json, so that `predict` and
# `--mode=evaluate` still read a run made before the key existed.
ADDED_KEYS: dict[str, Any] = {
    "train.compute_dtype": "float32",
    "train.optimizer": "adam", "train.momentum": 0.99, "train.adamw_weight_decay": 1e-4,
    "train.grad_clip": 0.0, "train.lr_schedule": "exponential", "train.lr_poly_exponent": 0.9,
    "train.lr_warmup_steps": 0, "train.ema_decay": 0.0,
    "data.oversample": "foreground", "model.deep_supervision": False,
    "data.augment.p_rotate": 1.0, "data.augment.p_scale": 1.0, "data.augment.elastic": False,
    "data.augment.p_elastic": 0.2, "data.augment.elastic_alpha": (0.0, 200.0),
    "data.augment.elastic_sigma": (9.0, 13.0), "data.augment.mirror_axes": (),
    "data.augment.p_mirror": 0.5, "data.augment.p_noise": 0.0, "data.augment.noise_std": (0.0, 0.1),
    "data.augment.p_blur": 0.0, "data.augment.blur_sigma": (0.5, 1.0),
    "data.augment.p_brightness": 0.0, "data.augment.brightness": (0.75, 1.25),
    "data.augment.p_contrast": 0.0, "data.augment.contrast": (0.75, 1.25),
    "data.augment.p_lowres": 0.0, "data.augment.lowres_zoom": (0.5, 1.0),
    "data.augment.p_gamma": 0.0, "data.augment.p_gamma_inverted": 0.0,
    "data.augment.gamma": (0.7, 1.5), "data.augment.gamma_retain_stats": True,
    "data.augment.intensity": dict(p_gin=0.0, gin_layers=4, gin_channels=2, gin_leak=0.01,
                                   p_ipa=0.0, ipa_grid=4, p_global=0.0, p_local=0.0,
                                   p_nonmonotone=0.0),
}


# Keys that moved, old dotted name -> new, for the same reason: `with_added_keys` moves them in a
# saved config.json. The transformer's options that are not the authors' became one sub-section.
RENAMED_KEYS: dict[str, str] = {
    "mmsdnet.weights.align": "mmsdnet.transformer.align_weight",
    "mmsdnet.weights.mean_offset": "mmsdnet.transformer.mean_offset_weight",
    "mmsdnet.align_target": "mmsdnet.transformer.align_target",
    "mmsdnet.stn_trained_by": "mmsdnet.transformer.trained_by",
    "mmsdnet.warp_gradient": "mmsdnet.transformer.warp_gradient",
    "mmsdnet.stn_start": "mmsdnet.transformer.start",
}


def _node(tree: dict, dotted: str, create: bool = False) -> tuple[dict | None, str]:
  """(the section that holds the dotted key, or None; the key's last part); `create` makes the
  sections on the way."""
  *parents, key = dotted.split(".")
  node = tree
  for name in parents:
    if create:
      node = node.setdefault(name, {})
    else:
      node = node.get(name) if isinstance(node, dict) else None
  return (node if isinstance(node, dict) else None), key


def with_added_keys(tree: dict) -> dict:
  """A saved config (nested dict) with its `RENAMED_KEYS` under their new names (a new key wins
  over an old one) and every `ADDED_KEYS` entry it lacks filled in."""
  for old, new in RENAMED_KEYS.items():
    node, key = _node(tree, old)
    if node is not None and key in node:
      value = node.pop(key)
      target, key = _node(tree, new, create=True)
      target.setdefault(key, value)
  for dotted, value in ADDED_KEYS.items():
    node, key = _node(tree, dotted)
    if node is not None and key not in node:
      node[key] = value
  return tree


def validate(config: ml_collections.ConfigDict, methods: Mapping[str, Any] | None = None) -> None:
  """Raises ConfigError naming the first unknown, missing or bad key.

  Args:
    config: the resolved config.
    methods: the method registry; when given, `config.method` must be one of its keys.
  """
  tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  schema = {**SCHEMA, **method_sections()}
  _walk(tree, schema, prefix="", required=set(SCHEMA))
  if methods is not None and tree["method"] not in methods:
    raise ConfigError(f"config key 'method': {tree['method']!r} is not one of {sorted(methods)}")
  split = tree["data"]["split"]
  if abs(split["train"] + split["val"] + split["test"] - 1.0) > 1e-6:
    raise ConfigError(f"config key 'data.split': train + val + test must be 1, got {split}")
  if split["train"] <= 0:
    raise ConfigError("config key 'data.split.train' must be > 0")
  if split["folds"] and split["fold"] >= split["folds"]:
    raise ConfigError(f"config key 'data.split.fold' must be below data.split.folds = "
                      f"{split['folds']}, got {split['fold']}")
  depth = tree["model"]["depth"]
  if tree["model"]["name"] == "unet" and any(s % 2 ** depth for s in tree["data"]["image_size"]):
    raise ConfigError(f"config key 'data.image_size' {tuple(tree['data']['image_size'])} must be "
                      f"divisible by 2**model.depth = {2 ** depth}")
  if tree["data"]["dataset"] == "folder" and not tree["data"]["root"]:
    raise ConfigError("config key 'data.root' must name the dataset folder when data.dataset='folder'")


def _walk(tree: Mapping[str, Any], schema: Mapping[str, Any], prefix: str,
          required: set[str] | None = None) -> None:
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if key not in schema:
      raise ConfigError(f"unknown config key {name!r}; known keys here: {sorted(schema)}")
    spec = schema[key]
    if isinstance(spec, Mapping):
      if not isinstance(value, Mapping):
        raise ConfigError(f"config key {name!r} must be a section with keys {sorted(spec)}")
      _walk(value, spec, prefix=name + ".", required=set(spec))
    else:
      spec.validate(name, value)
  for key in sorted((required if required is not None else set(schema)) - set(tree)):
    raise ConfigError(f"config key {prefix + key!r} is missing")
