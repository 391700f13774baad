r"""Segmentation metrics in millimetres: Dice, Hausdorff, HD95, ASSD, surface Dice, per-slice Dice.

Pure numpy/scipy, no JAX and no Flax: evaluation runs on the host on whole 3D volumes in their
original geometry, after the slice-wise predictions have been re-stacked.

Conventions, recorded by `metric_settings()` and written into `summary.json`:

* Surfaces: a surface voxel is a mask voxel with at least one face neighbour outside the mask, i.e.
  the mask minus its `scipy.ndimage.binary_erosion` with the face-connectivity structure
  `generate_binary_structure(ndim, 1)` (MedPy's `connectivity=1`). Voxels on the array border count
  as surface (the outside of the array is background).
* Distances: Euclidean, in mm, between voxel centres, from `distance_transform_edt(~surface,
  sampling=spacing)`.
* HD95: by default the larger of the two directed 95th percentiles (`"max_directed"`); MedPy 0.5's
  percentile of both directions pooled is available as `"pooled"`. Percentiles interpolate linearly
  (`np.percentile`'s default).
* ASSD: by default the mean of the two directed mean distances (`"mean_of_directed_means"`); the
  mean over both directions pooled (MedPy 0.5's `assd`) is available as `"pooled"`.
* Surface Dice: surface voxels are counted, not weighted by surfel area.
* Empty masks: see `EMPTY_POLICY`.

Example (prints 5.0: a cube shifted by two voxels of 2.5 mm):
  python -c "import numpy as np; from unpaired_seg import metrics as m; \
    a = np.zeros((9, 9, 9), bool); a[2:6, 2:6, 2:6] = True; \
    print(m.hd95(a, np.roll(a, 2, axis=2), spacing=(1.0, 1.0, 2.5)))"
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import ndimage


class MetricInputError(ValueError):
  """Raised on masks, spacings, labels or settings that the metrics cannot use."""


class EmptyMaskError(MetricInputError):
  """Raised by `surface_distances` when a mask is empty: a distance to no surface is undefined."""


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

METRIC_NAMES = ("dice", "per_slice_dice", "hausdorff", "hd95", "assd", "surface_dice")

HD95_VARIANTS = {
    "max_directed": ("max of the two directed 95th percentiles of surface distances (linear "
                     "interpolation)"),
    "pooled": ("95th percentile of the surface distances of both directions pooled (linear "
               "interpolation), as MedPy 0.5 medpy.metric.binary.hd95"),
}

ASSD_VARIANTS = {
    "mean_of_directed_means": "mean of the two directed mean surface distances",
    "pooled": ("mean of the surface distances of both directions pooled, as MedPy 0.5 "
               "medpy.metric.binary.assd"),
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


# ------------------------------------------------------------------------------------------------
# Input checks.
# ------------------------------------------------------------------------------------------------


def _as_mask(x: Any, name: str) -> np.ndarray:
  """Returns `x` as a boolean array; only booleans or 0/1 values are accepted."""
  arr = np.asarray(x)
  if arr.dtype == bool:
    return arr
  if arr.dtype.kind not in "iuf":
    raise MetricInputError(f"{name}: expected a boolean mask, got dtype {arr.dtype}")
  # A label volume passed by mistake would otherwise be merged into one foreground silently.
  if not np.all((arr == 0) | (arr == 1)):
    raise MetricInputError(
        f"{name}: expected a boolean (or 0/1) mask, got values {np.unique(arr)[:8].tolist()}; "
        "use evaluate_volume for label volumes")
  return arr.astype(bool)


def _masks(pred: Any, ref: Any) -> tuple[np.ndarray, np.ndarray]:
  pred_mask = _as_mask(pred, "pred")
  ref_mask = _as_mask(ref, "ref")
  if pred_mask.shape != ref_mask.shape:
    raise MetricInputError(f"pred and ref shapes differ: {pred_mask.shape} vs {ref_mask.shape}")
  if pred_mask.ndim == 0:
    raise MetricInputError("pred and ref: expected arrays with at least one dimension, got scalars")
  return pred_mask, ref_mask


def _spacing(spacing: Any, ndim: int) -> np.ndarray:
  """Returns the voxel spacing in mm as a float64 vector of length `ndim`."""
  try:
    values = np.asarray(spacing, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise MetricInputError(f"spacing: expected {ndim} numbers in mm, got {spacing!r}") from e
  if values.shape != (ndim,):
    raise MetricInputError(
        f"spacing: expected {ndim} values (one per mask axis) in mm, got {spacing!r}")
  if not np.all(np.isfinite(values)) or np.any(values <= 0):
    raise MetricInputError(f"spacing: values must be finite and > 0 mm, got {spacing!r}")
  return values


def _choice(value: str, allowed: Mapping[str, str] | Sequence[str], name: str) -> str:
  if value not in allowed:
    raise MetricInputError(f"{name}: unknown value {value!r}; expected one of {sorted(allowed)}")
  return value


def _tolerance(tolerance_mm: Any, name: str) -> float:
  try:
    tol = float(tolerance_mm)
  except (TypeError, ValueError) as e:
    raise MetricInputError(f"{name}: expected a number of mm, got {tolerance_mm!r}") from e
  if not math.isfinite(tol) or tol < 0:
    raise MetricInputError(f"{name}: must be finite and >= 0 mm, got {tolerance_mm!r}")
  return tol


# ------------------------------------------------------------------------------------------------
# Overlap metrics.
# ------------------------------------------------------------------------------------------------


def _dice_of_masks(pred: np.ndarray, ref: np.ndarray) -> float:
  total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
  if total == 0:
    return math.nan  # Both empty: excluded from means (EMPTY_POLICY).
  return 2.0 * int(np.count_nonzero(pred & ref)) / total


def dice(pred: Any, ref: Any) -> float:
  """Dice overlap of two boolean masks of any dimensionality.

  Args:
    pred: predicted mask, boolean or 0/1.
    ref: reference mask of the same shape.

  Returns:
    2 |pred & ref| / (|pred| + |ref|); NaN when both are empty, 0 when exactly one is.
  """
  return _dice_of_masks(*_masks(pred, ref))


def per_slice_dice(pred: Any, ref: Any, axis: int = -1) -> float:
  """The MMSDNet authors' Dice: per 2D slice along `axis`, averaged over the slices of the volume.

  A slice where both masks are empty counts 1 and one where exactly one is empty counts 0, so the
  result is never NaN. This is a second, named mode next to the 3D `dice`, not a replacement.

  Args:
    pred: predicted mask, e.g. [H, W, D], boolean or 0/1.
    ref: reference mask of the same shape.
    axis: the slice axis.

  Returns:
    The mean of the per-slice Dice values.
  """
  pred_mask, ref_mask = _masks(pred, ref)
  if pred_mask.ndim < 2:
    raise MetricInputError(
        f"pred: per_slice_dice needs at least 2 dimensions, got {pred_mask.ndim}")
  if not -pred_mask.ndim <= axis < pred_mask.ndim:
    raise MetricInputError(
        f"axis: {axis} is out of range for masks with {pred_mask.ndim} dimensions")
  n_slices = pred_mask.shape[axis]
  if n_slices == 0:
    raise MetricInputError(f"pred: no slices along axis {axis} (shape {pred_mask.shape})")
  # [S, N]: one row per slice.
  pred_rows = np.moveaxis(pred_mask, axis, 0).reshape(n_slices, -1)
  ref_rows = np.moveaxis(ref_mask, axis, 0).reshape(n_slices, -1)
  overlap = np.count_nonzero(pred_rows & ref_rows, axis=1)
  total = np.count_nonzero(pred_rows, axis=1) + np.count_nonzero(ref_rows, axis=1)
  per_slice = np.where(total == 0, 1.0, 2.0 * overlap / np.maximum(total, 1))
  return float(np.mean(per_slice))


# ------------------------------------------------------------------------------------------------
# Surface distances.
# ------------------------------------------------------------------------------------------------


def _surface(mask: np.ndarray) -> np.ndarray:
  """Mask voxels with a face neighbour outside the mask (array border counts as outside)."""
  structure = ndimage.generate_binary_structure(mask.ndim, 1)
  return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _crop_to_union(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Crops both masks to the bounding box of their union.

  Exact, not an approximation: a mask voxel on a face of the box has its neighbour across that
  face outside both masks (or outside the array), so the erosion marks the same surface voxels, and
  every surface voxel, hence every nearest one, lies inside the box. It only makes the distance
  transforms cheaper on large volumes with small organs.
  """
  coords = np.nonzero(pred | ref)
  box = tuple(slice(int(c.min()), int(c.max()) + 1) for c in coords)
  return pred[box], ref[box]


def _directed_distances(pred: np.ndarray, ref: np.ndarray,
                        spacing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Directed surface distances in mm for two non-empty boolean masks of the same shape."""
  pred, ref = _crop_to_union(pred, ref)
  pred_surface = _surface(pred)
  ref_surface = _surface(ref)
  # The EDT of ~surface is, at every voxel, the distance to the nearest surface voxel.
  to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=spacing)
  to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
  return to_ref[pred_surface], to_pred[ref_surface]


def surface_distances(pred: Any, ref: Any, spacing: Any) -> tuple[np.ndarray, np.ndarray]:
  """Directed surface distances in mm, both ways.

  Args:
    pred: predicted mask, boolean or 0/1, e.g. [H, W, D].
    ref: reference mask of the same shape.
    spacing: voxel size in mm along each mask axis.

  Returns:
    (pred_to_ref, ref_to_pred): for each surface voxel of `pred` (in C order) the distance to the
    nearest surface voxel of `ref`, and the same from `ref` to `pred`.

  Raises:
    EmptyMaskError: when either mask is empty (the scalar metrics return NaN instead).
  """
  pred_mask, ref_mask = _masks(pred, ref)
  spacing_mm = _spacing(spacing, pred_mask.ndim)
  for name, mask in (("pred", pred_mask), ("ref", ref_mask)):
    if not mask.any():
      raise EmptyMaskError(
          f"{name}: the mask is empty, so surface distances are undefined "
          "(hausdorff, hd95 and assd return nan for it, see EMPTY_POLICY)")
  return _directed_distances(pred_mask, ref_mask, spacing_mm)


def _distances_or_none(pred: Any, ref: Any, spacing: Any):
  """Checked inputs and directed distances, or None when a mask is empty (-> NaN by policy)."""
  pred_mask, ref_mask = _masks(pred, ref)
  spacing_mm = _spacing(spacing, pred_mask.ndim)
  if not pred_mask.any() or not ref_mask.any():
    return None
  return _directed_distances(pred_mask, ref_mask, spacing_mm)


def _hausdorff_from(d: tuple[np.ndarray, np.ndarray]) -> float:
  return float(max(d[0].max(), d[1].max()))


def _hd95_from(d: tuple[np.ndarray, np.ndarray], variant: str) -> float:
  if variant == "pooled":
    return float(np.percentile(np.concatenate(d), 95))
  return float(max(np.percentile(d[0], 95), np.percentile(d[1], 95)))


def _assd_from(d: tuple[np.ndarray, np.ndarray], variant: str) -> float:
  if variant == "pooled":
    return float(np.concatenate(d).mean())
  return float((d[0].mean() + d[1].mean()) / 2.0)


def _surface_dice_from(d: tuple[np.ndarray, np.ndarray], tolerance_mm: float) -> float:
  within = int(np.count_nonzero(d[0] <= tolerance_mm)) + int(np.count_nonzero(d[1] <= tolerance_mm))
  return within / (d[0].size + d[1].size)


def hausdorff(pred: Any, ref: Any, spacing: Any) -> float:
  """Hausdorff distance in mm: the larger of the two directed maxima; NaN if a mask is empty."""
  d = _distances_or_none(pred, ref, spacing)
  return math.nan if d is None else _hausdorff_from(d)


def hd95(pred: Any, ref: Any, spacing: Any, *, variant: str = "max_directed") -> float:
  """95th-percentile Hausdorff distance in mm; NaN if a mask is empty.

  Args:
    pred: predicted mask, boolean or 0/1.
    ref: reference mask of the same shape.
    spacing: voxel size in mm along each mask axis.
    variant: "max_directed" (default): the larger of the two directed 95th percentiles;
      "pooled": the 95th percentile of both directions' distances together (MedPy 0.5).

  Returns:
    The distance in mm.
  """
  _choice(variant, HD95_VARIANTS, "variant")
  d = _distances_or_none(pred, ref, spacing)
  return math.nan if d is None else _hd95_from(d, variant)


def assd(pred: Any, ref: Any, spacing: Any, *, variant: str = "mean_of_directed_means") -> float:
  """Average symmetric surface distance in mm; NaN if a mask is empty.

  Args:
    pred: predicted mask, boolean or 0/1.
    ref: reference mask of the same shape.
    spacing: voxel size in mm along each mask axis.
    variant: "mean_of_directed_means" (default): the mean of the two directed average surface
      distances; "pooled": the mean of both directions' distances together (MedPy 0.5).

  Returns:
    The distance in mm.
  """
  _choice(variant, ASSD_VARIANTS, "variant")
  d = _distances_or_none(pred, ref, spacing)
  return math.nan if d is None else _assd_from(d, variant)


def surface_dice(pred: Any, ref: Any, spacing: Any, tolerance_mm: float) -> float:
  """Normalised surface Dice at a tolerance in mm.

  The fraction of both surfaces (counted in surface voxels) that lies within `tolerance_mm` of the
  other surface. Empty masks follow the Dice policy: NaN when both are empty, 0 when one is.

  Args:
    pred: predicted mask, boolean or 0/1.
    ref: reference mask of the same shape.
    spacing: voxel size in mm along each mask axis.
    tolerance_mm: the accepted deviation in mm (a distance equal to it counts as within).

  Returns:
    A value in [0, 1].
  """
  tol = _tolerance(tolerance_mm, "tolerance_mm")
  pred_mask, ref_mask = _masks(pred, ref)
  spacing_mm = _spacing(spacing, pred_mask.ndim)
  pred_any, ref_any = bool(pred_mask.any()), bool(ref_mask.any())
  if not pred_any and not ref_any:
    return math.nan
  if not pred_any or not ref_any:
    return 0.0
  return _surface_dice_from(_directed_distances(pred_mask, ref_mask, spacing_mm), tol)


# ------------------------------------------------------------------------------------------------
# Label volumes, aggregation, settings and JSON.
# ------------------------------------------------------------------------------------------------


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
    _choice(m, METRIC_NAMES, "metrics")
  _choice(hd95_variant, HD95_VARIANTS, "hd95_variant")
  _choice(assd_variant, ASSD_VARIANTS, "assd_variant")
  tol = _tolerance(surface_tolerance_mm, "surface_tolerance_mm")
  classes = _foreground_classes(class_names)
  allowed = {0, *classes}
  pred_arr = _label_volume(pred_labels, "pred_labels", allowed)
  ref_arr = _label_volume(ref_labels, "ref_labels", allowed)
  if pred_arr.shape != ref_arr.shape:
    raise MetricInputError(
        f"pred_labels and ref_labels shapes differ: {pred_arr.shape} vs {ref_arr.shape}")
  spacing_mm = _spacing(spacing, ref_arr.ndim)
  if "per_slice_dice" in metrics and not -ref_arr.ndim <= slice_axis < ref_arr.ndim:
    raise MetricInputError(
        f"slice_axis: {slice_axis} is out of range for {ref_arr.ndim} dimensions")

  needs_distances = any(m in metrics for m in ("hausdorff", "hd95", "assd", "surface_dice"))
  results: dict[str, dict[str, float]] = {}
  for label, name in classes.items():
    pred_mask = pred_arr == label
    ref_mask = ref_arr == label
    both_present = bool(pred_mask.any()) and bool(ref_mask.any())
    # One pair of distance transforms per class serves every distance metric.
    d = (_directed_distances(pred_mask, ref_mask, spacing_mm)
         if needs_distances and both_present else None)
    values: dict[str, float] = {}
    for m in metrics:
      if m == "dice":
        values[m] = _dice_of_masks(pred_mask, ref_mask)
      elif m == "per_slice_dice":
        values[m] = per_slice_dice(pred_mask, ref_mask, axis=slice_axis)
      elif m == "surface_dice":
        if d is not None:
          values[m] = _surface_dice_from(d, tol)
        else:  # Same policy as Dice.
          values[m] = 0.0 if (pred_mask.any() or ref_mask.any()) else math.nan
      elif d is None:
        values[m] = math.nan
      elif m == "hausdorff":
        values[m] = _hausdorff_from(d)
      elif m == "hd95":
        values[m] = _hd95_from(d, hd95_variant)
      else:  # assd
        values[m] = _assd_from(d, assd_variant)
    results[name] = values
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
    _choice(m, METRIC_NAMES, "metrics")
  _choice(hd95_variant, HD95_VARIANTS, "hd95_variant")
  _choice(assd_variant, ASSD_VARIANTS, "assd_variant")
  return {
      "metrics": list(metrics),
      "units": "mm",
      "dice": _DICE_DEFINITION,
      "surface": _SURFACE_DEFINITION,
      "distance": _DISTANCE_DEFINITION,
      "hd95_variant": {"name": hd95_variant, "definition": HD95_VARIANTS[hd95_variant]},
      "assd_variant": {"name": assd_variant, "definition": ASSD_VARIANTS[assd_variant]},
      "surface_dice": {"tolerance_mm": _tolerance(surface_tolerance_mm, "surface_tolerance_mm"),
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
