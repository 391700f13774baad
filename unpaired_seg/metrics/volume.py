"""Label volumes: per-class metrics, their aggregate over cases, and the record for summary.json.

`evaluate_volume` checks a predicted and a reference label volume and scores each foreground class
with the mask metrics of `unpaired_seg.metrics.binary`; `aggregate` averages such results over
cases, `metric_settings` records how they were computed and `to_jsonable` makes all of it JSON.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from unpaired_seg.metrics.binary import ASSD_VARIANTS, HD95_VARIANTS, METRIC_NAMES, metrics_of_masks
from unpaired_seg.metrics.checks import (MetricInputError, checked_choice, checked_spacing,
                                         checked_tolerance)

# The explicit empty-mask policy (nnU-Net-like), JSON-serialisable and written into summary.json.
EMPTY_POLICY: dict[str, Any] = {
    "both_empty": {
        "dice": "nan (excluded from means)",
        "surface_dice": "nan (excluded from means)",
        "distances": "nan (excluded from means); distances are hausdorff, hd95, assd",
    },
    "one_empty": {
        "dice": 0.0,
        "surface_dice": 0.0,
        "distances": ("nan (excluded from means, no finite penalty): a distance to an empty "
                      "surface is undefined; the per-case table and the aggregate counts show "
                      "these cases"),
    },
    "per_slice_dice": ("per 2D slice: both empty counts 1.0, exactly one empty counts 0.0; "
                       "averaged over all slices of the volume, so never nan"),
    "aggregate": ("mean and sample std (ddof=1) over the cases with a finite value, then the "
                  "mean over classes; a class with no finite value is nan (null in JSON)"),
}

_SURFACE_DEFINITION = ("mask minus its scipy.ndimage.binary_erosion with the face-connectivity "
                       "structure generate_binary_structure(ndim, 1); the outside of the array is "
                       "background")
_DISTANCE_DEFINITION = ("Euclidean distance in mm between voxel centres, "
                        "scipy.ndimage.distance_transform_edt(~surface, sampling=spacing)")
_SURFACE_DICE_DEFINITION = ("normalised surface Dice: (pred surface voxels within tolerance of "
                            "the ref surface + ref surface voxels within tolerance of the pred "
                            "surface) / (pred surface voxels + ref surface voxels); voxels "
                            "counted, not weighted by surfel area; distance <= tolerance counts")
_PER_SLICE_DICE_DEFINITION = ("Dice of each 2D slice along slice_axis, averaged over all slices of "
                              "the volume (the MMSDNet authors' evaluation); see empty_policy")
_DICE_DEFINITION = "3D Dice per volume and class: 2 |P & R| / (|P| + |R|)"


def _foreground_classes(class_names: Any) -> dict[int, str]:
  """{label value: name} of the foreground classes."""
  if isinstance(class_names, Mapping):
    classes = {}
    for label, name in class_names.items():
      if isinstance(label, (bool, np.bool_)) or not isinstance(label, (int, np.integer)):
        raise MetricInputError(f"class_names: labels must be integers, got {label!r}")
      if int(label) < 1:
        raise MetricInputError(
            f"class_names: a mapping lists foreground labels (>= 1) only, got {label!r}")
      classes[int(label)] = name
  elif isinstance(class_names, Sequence) and not isinstance(class_names, str):
    if len(class_names) < 2:
      raise MetricInputError(
          "class_names: expected names in label order with the background first, e.g. "
          f"('background', 'liver'), got {class_names!r}")
    classes = dict(enumerate(class_names))
    del classes[0]  # Background is not evaluated.
  else:
    raise MetricInputError(
        f"class_names: expected a sequence (background first) or a {{label: name}} mapping, "
        f"got {class_names!r}")
  names = list(classes.values())
  if not all(isinstance(n, str) and n for n in names):
    raise MetricInputError(f"class_names: names must be non-empty strings, got {names!r}")
  if len(set(names)) != len(names):
    raise MetricInputError(f"class_names: names must be unique, got {names!r}")
  return classes


def _label_volume(x: Any, name: str, allowed: set[int]) -> np.ndarray:
  arr = np.asarray(x)
  if arr.dtype.kind not in "iub":
    raise MetricInputError(f"{name}: expected an integer label volume, got dtype {arr.dtype}")
  unknown = sorted(set(np.unique(arr).tolist()) - allowed)
  if unknown:
    raise MetricInputError(
        f"{name}: label values {unknown[:8]} are not in class_names (known: {sorted(allowed)})")
  return arr


def evaluate_volume(pred_labels: Any, ref_labels: Any, class_names: Any, spacing: Any, *,
                    metrics: Sequence[str] = ("dice", "hd95", "assd"),
                    surface_tolerance_mm: float = 2.0,
                    hd95_variant: str = "max_directed",
                    assd_variant: str = "mean_of_directed_means",
                    slice_axis: int = -1) -> dict[str, dict[str, float]]:
  """Per-class metrics of one predicted label volume against its reference.

  Args:
    pred_labels: integer label volume, e.g. [H, W, D], in the reference's geometry.
    ref_labels: integer reference label volume of the same shape.
    class_names: names in label order with the background first, e.g. ("background", "liver",
      "spleen"), or a {label: name} mapping of the foreground labels.
    spacing: voxel size in mm along each volume axis.
    metrics: names from METRIC_NAMES.
    surface_tolerance_mm: tolerance of "surface_dice".
    hd95_variant: a key of HD95_VARIANTS.
    assd_variant: a key of ASSD_VARIANTS.
    slice_axis: the slice axis of "per_slice_dice".

  Returns:
    {class name: {metric: value}} for each foreground class (label >= 1); NaN per EMPTY_POLICY.
  """
  metrics = tuple(metrics)
  if not metrics:
    raise MetricInputError(f"metrics: expected at least one of {METRIC_NAMES}")
  for m in metrics:
    checked_choice(m, METRIC_NAMES, "metrics")
  checked_choice(hd95_variant, HD95_VARIANTS, "hd95_variant")
  checked_choice(assd_variant, ASSD_VARIANTS, "assd_variant")
  tol = checked_tolerance(surface_tolerance_mm, "surface_tolerance_mm")
  classes = _foreground_classes(class_names)
  allowed = {0, *classes}
  pred_arr = _label_volume(pred_labels, "pred_labels", allowed)
  ref_arr = _label_volume(ref_labels, "ref_labels", allowed)
  if pred_arr.shape != ref_arr.shape:
    raise MetricInputError(
        f"pred_labels and ref_labels shapes differ: {pred_arr.shape} vs {ref_arr.shape}")
  spacing_mm = checked_spacing(spacing, ref_arr.ndim)
  if "per_slice_dice" in metrics and not -ref_arr.ndim <= slice_axis < ref_arr.ndim:
    raise MetricInputError(
        f"slice_axis: {slice_axis} is out of range for {ref_arr.ndim} dimensions")

  results: dict[str, dict[str, float]] = {}
  for label, name in classes.items():
    results[name] = metrics_of_masks(pred_arr == label, ref_arr == label, spacing_mm, metrics,
                                     tolerance_mm=tol, hd95_variant=hd95_variant,
                                     assd_variant=assd_variant, slice_axis=slice_axis)
  return results


def _finite_values(values: list[float]) -> np.ndarray:
  arr = np.asarray([math.nan if v is None else float(v) for v in values], dtype=np.float64)
  return arr[np.isfinite(arr)]


def aggregate(per_case: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, Any]:
  """Means over cases per class, and over classes, leaving out NaN.

  Args:
    per_case: {case id: {class name: {metric: value}}}, e.g. `evaluate_volume` outputs; every
      case must have the same classes and metrics. None counts as NaN (as read back from JSON).

  Returns:
    {"mean": {metric: mean over classes of the per-class means},
     "per_class": {class: {metric: mean over cases}},
     "std": {class: {metric: sample standard deviation over cases (ddof=1)}},
     "count": {class: {metric: number of cases with a finite value}}}.
    NaN values are left out; a class with no finite value has mean NaN, a class with fewer than two
    has std NaN, and "mean" leaves out classes whose mean is NaN (NaN if all are).
  """
  if not per_case:
    raise MetricInputError("per_case: no cases to aggregate")
  cases = list(per_case)
  first = per_case[cases[0]]
  if not first:
    raise MetricInputError(f"per_case: case {cases[0]!r} has no classes")
  class_list = list(first)
  metric_list = list(first[class_list[0]])
  for case in cases:
    if set(per_case[case]) != set(class_list):
      raise MetricInputError(
          f"per_case: case {case!r} has classes {sorted(per_case[case])}, "
          f"expected {sorted(class_list)}")
    for cls in class_list:
      if set(per_case[case][cls]) != set(metric_list):
        raise MetricInputError(
            f"per_case: case {case!r} class {cls!r} has metrics {sorted(per_case[case][cls])}, "
            f"expected {sorted(metric_list)}")

  per_class: dict[str, dict[str, float]] = {}
  std: dict[str, dict[str, float]] = {}
  count: dict[str, dict[str, int]] = {}
  for cls in class_list:
    per_class[cls], std[cls], count[cls] = {}, {}, {}
    for m in metric_list:
      finite = _finite_values([per_case[case][cls][m] for case in cases])
      # Computed by hand instead of np.nanmean/np.nanstd, which warn on all-NaN input.
      per_class[cls][m] = float(finite.mean()) if finite.size else math.nan
      std[cls][m] = float(finite.std(ddof=1)) if finite.size >= 2 else math.nan
      count[cls][m] = int(finite.size)
  mean: dict[str, float] = {}
  for m in metric_list:
    finite = _finite_values([per_class[cls][m] for cls in class_list])
    mean[m] = float(finite.mean()) if finite.size else math.nan
  return {"mean": mean, "per_class": per_class, "std": std, "count": count}


def metric_settings(*, metrics: Sequence[str] = ("dice", "hd95", "assd"),
                    surface_tolerance_mm: float = 2.0,
                    hd95_variant: str = "max_directed",
                    assd_variant: str = "mean_of_directed_means",
                    slice_axis: int = -1) -> dict[str, Any]:
  """A JSON-serialisable record of how the metrics were computed, for summary.json.

  Takes the same keyword arguments as `evaluate_volume`, so one dict of settings serves both:
  `evaluate_volume(..., **settings)` and `metric_settings(**settings)`.

  Returns:
    The metric names, units, surface and distance definitions, the HD95/ASSD variants (name and
    description), the surface Dice tolerance, the per-slice Dice axis and the empty-mask policy.
  """
  metrics = tuple(metrics)
  for m in metrics:
    checked_choice(m, METRIC_NAMES, "metrics")
  checked_choice(hd95_variant, HD95_VARIANTS, "hd95_variant")
  checked_choice(assd_variant, ASSD_VARIANTS, "assd_variant")
  return {
      "metrics": list(metrics),
      "units": "mm",
      "dice": _DICE_DEFINITION,
      "surface": _SURFACE_DEFINITION,
      "distance": _DISTANCE_DEFINITION,
      "hd95_variant": {"name": hd95_variant, "definition": HD95_VARIANTS[hd95_variant]},
      "assd_variant": {"name": assd_variant, "definition": ASSD_VARIANTS[assd_variant]},
      "surface_dice": {
          "tolerance_mm": checked_tolerance(surface_tolerance_mm, "surface_tolerance_mm"),
          "definition": _SURFACE_DICE_DEFINITION},
      "per_slice_dice": {"slice_axis": int(slice_axis), "definition": _PER_SLICE_DICE_DEFINITION},
      "std": "sample standard deviation over cases (ddof=1)",
      "empty_policy": copy.deepcopy(EMPTY_POLICY),
  }


def to_jsonable(obj: Any) -> Any:
  """Converts nested results into plain JSON types; NaN and +-inf become None (JSON null).

  Dicts (keys: str or integers, written as strings), lists, tuples, numpy arrays, Python and numpy
  scalars are converted recursively.
  """
  if obj is None or isinstance(obj, str):
    return obj
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    value = float(obj)
    return value if math.isfinite(value) else None
  if isinstance(obj, Mapping):
    out = {}
    for key, value in obj.items():
      if isinstance(key, str):
        out[key] = to_jsonable(value)
      elif isinstance(key, (int, np.integer)) and not isinstance(key, (bool, np.bool_)):
        out[str(int(key))] = to_jsonable(value)
      else:
        raise MetricInputError(f"to_jsonable: dict keys must be str or int, got {key!r}")
    return out
  if isinstance(obj, np.ndarray):
    return [to_jsonable(v) for v in obj.tolist()] if obj.ndim else to_jsonable(obj.item())
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  raise MetricInputError(f"to_jsonable: cannot convert {type(obj).__name__} {obj!r} to JSON")
