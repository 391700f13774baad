"""The metrics' errors and input checks: masks, spacings, settings.

Every check raises `MetricInputError` naming the argument, so that a wrong call fails before any
distance transform is computed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


class MetricInputError(ValueError):
  """Raised on masks, spacings, labels or settings that the metrics cannot use."""


class EmptyMaskError(MetricInputError):
  """Raised by `surface_distances` when a mask is empty: a distance to no surface is undefined."""


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


def checked_masks(pred: Any, ref: Any) -> tuple[np.ndarray, np.ndarray]:
  """Both masks as boolean arrays of one shape with at least one dimension."""
  pred_mask = _as_mask(pred, "pred")
  ref_mask = _as_mask(ref, "ref")
  if pred_mask.shape != ref_mask.shape:
    raise MetricInputError(f"pred and ref shapes differ: {pred_mask.shape} vs {ref_mask.shape}")
  if pred_mask.ndim == 0:
    raise MetricInputError("pred and ref: expected arrays with at least one dimension, got scalars")
  return pred_mask, ref_mask


def checked_spacing(spacing: Any, ndim: int) -> np.ndarray:
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


def checked_choice(value: str, allowed: Mapping[str, str] | Sequence[str], name: str) -> str:
  """`value` itself when it is one of `allowed` (a sequence or the keys of a mapping)."""
  if value not in allowed:
    raise MetricInputError(f"{name}: unknown value {value!r}; expected one of {sorted(allowed)}")
  return value


def checked_tolerance(tolerance_mm: Any, name: str) -> float:
  """A surface tolerance as a finite float >= 0 mm."""
  try:
    tol = float(tolerance_mm)
  except (TypeError, ValueError) as e:
    raise MetricInputError(f"{name}: expected a number of mm, got {tolerance_mm!r}") from e
  if not math.isfinite(tol) or tol < 0:
    raise MetricInputError(f"{name}: must be finite and >= 0 mm, got {tolerance_mm!r}")
  return tol
