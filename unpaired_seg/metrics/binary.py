"""Metrics of one pair of binary masks: Dice, per-slice Dice and the surface-distance metrics.

Distances are in mm, from the surfaces and distance transforms described in the package docstring
(`unpaired_seg.metrics`); empty masks follow `EMPTY_POLICY` (kept with the settings record in
`volume`). `metrics_of_masks` computes several of them for one pair of masks from a single pair of
distance transforms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from unpaired_seg.metrics.checks import (EmptyMaskError, MetricInputError, checked_choice,
                                         checked_masks, checked_spacing, checked_tolerance)

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

# The metrics that need the surface distances.
_DISTANCE_METRICS = ("hausdorff", "hd95", "assd", "surface_dice")


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
  return _dice_of_masks(*checked_masks(pred, ref))


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
  pred_mask, ref_mask = checked_masks(pred, ref)
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
  pred_mask, ref_mask = checked_masks(pred, ref)
  spacing_mm = checked_spacing(spacing, pred_mask.ndim)
  for name, mask in (("pred", pred_mask), ("ref", ref_mask)):
    if not mask.any():
      raise EmptyMaskError(
          f"{name}: the mask is empty, so surface distances are undefined "
          "(hausdorff, hd95 and assd return nan for it, see EMPTY_POLICY)")
  return _directed_distances(pred_mask, ref_mask, spacing_mm)


def _distances_or_none(pred: Any, ref: Any, spacing: Any):
  """Checked inputs and directed distances, or None when a mask is empty (-> NaN by policy)."""
  pred_mask, ref_mask = checked_masks(pred, ref)
  spacing_mm = checked_spacing(spacing, pred_mask.ndim)
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
  checked_choice(variant, HD95_VARIANTS, "variant")
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
  checked_choice(variant, ASSD_VARIANTS, "variant")
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
  tol = checked_tolerance(tolerance_mm, "tolerance_mm")
  pred_mask, ref_mask = checked_masks(pred, ref)
  spacing_mm = checked_spacing(spacing, pred_mask.ndim)
  pred_any, ref_any = bool(pred_mask.any()), bool(ref_mask.any())
  if not pred_any and not ref_any:
    return math.nan
  if not pred_any or not ref_any:
    return 0.0
  return _surface_dice_from(_directed_distances(pred_mask, ref_mask, spacing_mm), tol)


# ------------------------------------------------------------------------------------------------
# Several metrics of one pair at once.
# ------------------------------------------------------------------------------------------------


def metrics_of_masks(pred: np.ndarray, ref: np.ndarray, spacing_mm: np.ndarray,
                     metrics: Sequence[str], *, tolerance_mm: float, hd95_variant: str,
                     assd_variant: str, slice_axis: int) -> dict[str, float]:
  """{metric: value} of one pair of boolean masks whose inputs the caller has checked.

  The arguments are those of `unpaired_seg.metrics.evaluate_volume` after its checks: masks of one
  shape, a float64 spacing per axis, names from METRIC_NAMES and known variants. One pair of
  distance transforms serves every distance metric; empty masks follow EMPTY_POLICY.
  """
  d = None
  if any(m in metrics for m in _DISTANCE_METRICS) and bool(pred.any()) and bool(ref.any()):
    d = _directed_distances(pred, ref, spacing_mm)
  values: dict[str, float] = {}
  for m in metrics:
    if m == "dice":
      values[m] = _dice_of_masks(pred, ref)
    elif m == "per_slice_dice":
      values[m] = per_slice_dice(pred, ref, axis=slice_axis)
    elif m == "surface_dice":
      if d is not None:
        values[m] = _surface_dice_from(d, tolerance_mm)
      else:  # Same policy as Dice.
        values[m] = 0.0 if (pred.any() or ref.any()) else math.nan
    elif d is None:
      values[m] = math.nan
    elif m == "hausdorff":
      values[m] = _hausdorff_from(d)
    elif m == "hd95":
      values[m] = _hd95_from(d, hd95_variant)
    else:  # assd
      values[m] = _assd_from(d, assd_variant)
  return values
