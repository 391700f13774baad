"""A training plan from a prepared dataset's fingerprint: nnU-Net's "fingerprint -> plan".

  python -m unpaired_seg.plan --data=/tmp/abdomen_ctmr_2mm    # writes <data>/plan.json
  python -m unpaired_seg.plan --data=/tmp/abdomen_ctmr_2mm --budget_minutes=45 --output=/tmp/p.json
  python -m unpaired_seg.main --config=configs/joint.py:data=/tmp/abdomen_ctmr_2mm  # reads it

The fingerprint is what the data says: per modality the number of cases, the median voxel
spacing and volume shape, the in-plane extent of the body per volume and how often each organ
appears. The plan turns it into the settings a config would otherwise hard-code:

  data.image_size       the view that covers the body in `coverage` of the volumes (a multiple of
                        2**depth, at most the largest slice)
  data.normalization    MR z-scored per volume; CT (a modality whose manifest clips or windows)
                        'foreground_zscore': clipped to the 0.5/99.5 percentiles of the training
                        split's labelled voxels, z-scored with their mean and std (fitted per run
                        on its own training split, never here, so no test voxel informs it)
  model.features, train.batch_size, train.steps
                        the widest U-Net whose measured step fits `min_steps` steps into the
                        compute budget (`budget_minutes`), 85 % of it for training
  data.oversample, data.foreground_fraction, the optimiser and schedule
                        nnU-Net's recipe: class-balanced sampling of one third of every batch,
                        SGD with Nesterov momentum 0.99, polynomial decay, gradient clipping

Every choice lands in `plan.json` under "config" as a flat `key: value` map; `data=<prepared>`
applies it after the config's defaults and before the command line, so any `--config.<key>`
overrides the plan.
"""

import json
import math
import os
import pathlib
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from unpaired_seg.data import dataset as ds
from unpaired_seg.data import geometry

PLAN_FILE = "plan.json"
VERSION = 1
FEATURE_CANDIDATES = (32, 16, 8)
TRAIN_SHARE = 0.85          # of the budget; the rest is validation and the final evaluation


class PlanError(ValueError):
  pass


def body_extent(image: np.ndarray) -> tuple[int, int]:
  """In-plane (rows, cols) of the body in an [X, Y, Z] volume on the model grid.

  The body is where the mean over slices exceeds Otsu's threshold (as `geometry.body_crop_box`
  finds it); its extent runs from the 0.5th to the 99.5th percentile of those pixels.
  """
  mean = np.asarray(image, np.float64).reshape(image.shape[0], image.shape[1], -1).mean(-1)
  rows, cols = np.nonzero(mean > geometry.otsu_threshold(mean))
  if not rows.size:
    return int(image.shape[0]), int(image.shape[1])
  return tuple(int(math.ceil(np.percentile(c, 99.5) - np.percentile(c, 0.5))) + 1
               for c in (rows, cols))


def fingerprint(root: os.PathLike) -> dict:
  """What `plan` needs to know of a prepared dataset, per modality (reads every volume once)."""
  manifest = ds.load_manifest(root)
  out = {"dataset": manifest.name, "labels": list(manifest.labels), "modalities": {}}
  for modality in manifest.modalities:
    spacings, shapes, extents = [], [], []
    class_voxels = np.zeros(len(manifest.labels), np.int64)
    for case in ds.list_cases(manifest, modality):
      v = ds.load_volume(manifest, modality, case, require_label=False)
      image, label, affine, _ = geometry.to_model_grid(v.image, v.label, v.affine, None)
      spacings.append(geometry.spacing_of(affine))
      shapes.append(image.shape)
      extents.append(body_extent(image))
      if label is not None:
        class_voxels += np.bincount(label.ravel(), minlength=len(manifest.labels))[
            :len(manifest.labels)]
    if not shapes:
      raise PlanError(f"{manifest.root}: modality {modality!r} has no case")
    total = max(int(class_voxels[1:].sum()), 1)
    out["modalities"][modality] = {
        "cases": len(shapes),
        "median_spacing_mm": [round(float(s), 3) for s in np.median(spacings, axis=0)],
        "median_shape": [int(s) for s in np.median(shapes, axis=0)],
        "max_inplane_shape": [int(s) for s in np.max(shapes, axis=0)[:2]],
        "body_extent": [list(e) for e in extents],
        "foreground_share": {name: round(float(class_voxels[i] / total), 4)
                             for i, name in enumerate(manifest.labels) if i > 0},
        "normalization": dict(manifest.modalities[modality].normalization),
    }
  return out


def view_size(print_: Mapping, depth: int = 4, coverage: float = 0.9) -> tuple[int, int]:
  """The smallest view, a multiple of 2**depth, covering the body in `coverage` of all volumes."""
  factor = 2 ** depth
  sizes = []
  for axis in range(2):
    extents = [e[axis] for m in print_["modalities"].values() for e in m["body_extent"]]
    largest = max(m["max_inplane_shape"][axis] for m in print_["modalities"].values())
    # The smallest extent at or above which `coverage` of the volumes lie (no interpolation).
    want = float(np.quantile(extents, coverage, method="inverted_cdf"))
    size = int(math.ceil(want / factor) * factor)
    sizes.append(max(factor, min(size, int(math.ceil(largest / factor) * factor))))
  return sizes[0], sizes[1]


def normalization_setting(print_: Mapping) -> str:
  """`data.normalization`: as nnU-Net decides by the channel's name, a modality named CT (or one
  whose manifest windows or clips it) gets foreground_zscore, every other one zscore per
  volume: CT intensities mean the same in every scanner, MR intensities do not."""
  items = []
  for modality, m in print_["modalities"].items():
    scheme = m["normalization"].get("scheme", "zscore")
    ct_like = modality.lower() == "ct" or scheme in ("clip_zscore", "dataset_zscore") or \
        m["normalization"].get("window") is not None
    items.append(f"{modality}={'foreground_zscore' if ct_like else 'zscore'}")
  return ",".join(items)


def make_plan(print_: Mapping, *, budget_minutes: float,
              step_seconds: Callable[[int, int, tuple[int, int]], float],
              batch_size: int = 8, min_steps: int = 2000, depth: int = 4,
              coverage: float = 0.9) -> dict:
  """The plan of a fingerprint for a compute budget.

  Args:
    print_: `fingerprint(root)`.
    budget_minutes: wall time for training and evaluation.
    step_seconds: (features, batch_size, image_size) -> measured seconds per train step.
    batch_size: slices per modality per step.
    min_steps: the widest network with at least this many steps in the budget wins; if none
      reaches it, the narrowest.
  """
  if not budget_minutes > 0:
    raise PlanError(f"--budget_minutes must be > 0, got {budget_minutes}")
  size = view_size(print_, depth, coverage)
  seconds = budget_minutes * 60 * TRAIN_SHARE
  timed = {}
  choice = None
  for features in FEATURE_CANDIDATES:
    timed[features] = float(step_seconds(features, batch_size, size))
    if seconds / timed[features] >= min_steps:
      choice = features
      break
  if choice is None:
    choice = FEATURE_CANDIDATES[-1]
  steps = max(1, int(seconds / timed[choice]))
  every = max(1, steps // 8)
  config = {
      "data.image_size": list(size),
      "data.normalization": normalization_setting(print_),
      "data.oversample": "class",
      "data.foreground_fraction": round(1 / 3, 4),
      "model.features": choice,
      "model.depth": depth,
      "train.batch_size": batch_size,
      "train.steps": steps,
      "train.eval_every": every,
      "train.checkpoint_every": every,
      "train.log_every": max(1, every // 4),
  }
  return {"version": VERSION, "budget_minutes": budget_minutes,
          "seconds_per_step": {str(k): round(v, 4) for k, v in timed.items()},
          "fingerprint": {k: v for k, v in print_.items()}, "config": config}


def write_plan(plan: Mapping, path: os.PathLike) -> pathlib.Path:
  from unpaired_seg.data import pipeline  # atomic writer
  path = pathlib.Path(path)
  pipeline.write_text_atomic(path, json.dumps(plan, indent=1) + "\n")
  return path


def read_plan(root: os.PathLike) -> dict | None:
  """The plan beside a prepared dataset's manifest, or None when it has none."""
  path = pathlib.Path(root) / PLAN_FILE
  if not path.is_file():
    return None
  try:
    plan = json.loads(path.read_text())
    if plan.get("version") != VERSION or not isinstance(plan.get("config"), dict):
      raise ValueError(f"version {plan.get('version')!r}, expected {VERSION} with a 'config' map")
  except (json.JSONDecodeError, ValueError, AttributeError) as e:
    raise PlanError(f"{path}: not a plan file ({e}); write it again with "
                    f"`python -m unpaired_seg.plan --data={root}`") from e
  return plan


def apply_plan(config, plan: Mapping, where: str = PLAN_FILE) -> None:
  """Sets each `section.key` of the plan's config map on `config` (which must have the key)."""
  for dotted, value in plan["config"].items():
    node = config
    *parents, key = dotted.split(".")
    for name in parents:
      node = node.get(name) if hasattr(node, "get") else None
      if node is None:
        break
    if node is None or key not in node:
      raise PlanError(f"{where}: key {dotted!r} is not a config key")
    node[key] = tuple(value) if isinstance(value, list) else value


def measured_step_seconds(num_classes: int, method: str = "joint", steps: int = 3) -> Callable:
  """A `step_seconds` that times the method's real train step on this machine (a few steps)."""
  def measure(features: int, batch_size: int, size: Sequence[int]) -> float:
    from configs import common
    from unpaired_seg import benchmark
    config = common.get_base_config()
    config.method = method
    config.model.features = features
    config.train.batch_size = batch_size
    config.data.image_size = tuple(size)
    return benchmark.run(config, steps=steps, num_classes=num_classes)["step_ms"] / 1000
  return measure


def plan_dataset(root: os.PathLike, budget_minutes: float, out: os.PathLike | None = None,
                 step_seconds: Callable | None = None) -> pathlib.Path:
  """Fingerprints `root`, plans for the budget and writes the plan (default: root/plan.json)."""
  print_ = fingerprint(root)
  step_seconds = step_seconds or measured_step_seconds(len(print_["labels"]))
  plan = make_plan(print_, budget_minutes=budget_minutes, step_seconds=step_seconds)
  return write_plan(plan, out or pathlib.Path(root) / PLAN_FILE)


def _define_flags() -> None:
  from absl import flags
  flags.DEFINE_string("data", None, "A prepared dataset (python -m unpaired_seg.prepare).",
                      required=True)
  flags.DEFINE_float("budget_minutes", 30.0, "Wall time for training and evaluation.")
  flags.DEFINE_string("output", None, "The plan file (default: <data>/plan.json).")


def main(argv) -> int:
  from absl import flags
  del argv
  f = flags.FLAGS
  try:
    path = plan_dataset(f.data, f.budget_minutes, f.output)
  except (PlanError, ds.DatasetError) as e:
    raise SystemExit(f"plan: {e}") from None
  plan = json.loads(pathlib.Path(path).read_text())
  print(json.dumps({"plan": str(path), **plan["config"]}))
  return 0
