"""In-plane resampling to a target spacing, and the whole way to the model grid and back.

`to_model_grid` reorients a case to canonical RAS and resamples its two in-plane axes;
`to_source_grid` brings a label map back onto the source file's voxel grid with the record that
`to_model_grid` returned. The grid has exactly the target spacing and the old grid's centre (see
the package docstring, `unpaired_seg.data.geometry`).
"""

import math
from collections.abc import Sequence

import numpy as np
import scipy.ndimage as ndi

from unpaired_seg.data.geometry.orientation import from_canonical, to_canonical
from unpaired_seg.data.geometry.record import (GeometryError, GeometryRecord, affine_tuple,
                                               check_affine, check_volume, spacing_of)

# Two in-plane spacings closer than this (relative) are the same: no resampling, no rounding
# noise, so a model grid at the source spacing is the source grid bit for bit.
_SAME_SPACING_RTOL = 1e-6


def _inplane_zoom(spacing: Sequence[float], target_spacing) -> tuple[float, float, float]:
  """Zoom factors (source / target spacing) of axes 0 and 1, 1.0 for the slice axis."""
  spacing = tuple(float(s) for s in spacing)
  if len(spacing) < 2 or not all(math.isfinite(s) and s > 0 for s in spacing):
    raise GeometryError(f"argument 'spacing' must hold finite positive mm values, got {spacing}")
  if target_spacing is None:
    return (1.0, 1.0, 1.0)
  target = tuple(float(t) for t in target_spacing)
  if len(target) != 2 or not all(math.isfinite(t) and t > 0 for t in target):
    raise GeometryError("argument 'target_spacing' must be two finite positive in-plane spacings "
                        f"in mm (or None to keep the grid), got {target_spacing!r}")
  zoom = []
  for s, t in zip(spacing[:2], target):
    zoom.append(1.0 if abs(s / t - 1.0) < _SAME_SPACING_RTOL else s / t)
  return (zoom[0], zoom[1], 1.0)


def _zoomed_shape(shape: Sequence[int], zoom: Sequence[float]) -> tuple[int, ...]:
  """round(n * zoom), halves up (Python's round() would send 2.5 to 2 but 3.5 to 4)."""
  return tuple(n if z == 1.0 else max(1, int(math.floor(n * z + 0.5)))
               for n, z in zip(shape, zoom))


def _grid_map(n_in: int, n_out: int, zoom: float) -> tuple[float, float]:
  """(scale, offset) with input index = scale * output index + offset, centres aligned.

  Output voxel j sits at input coordinate c_in + (j - c_out) / zoom, where c = (n - 1) / 2 is the
  centre of a grid of n voxels: exactly the target spacing, the same centre.
  """
  if zoom == 1.0 and n_in == n_out:
    return 1.0, 0.0
  return 1.0 / zoom, (n_in - 1) / 2.0 - (n_out - 1) / 2.0 / zoom


def _resample(array: np.ndarray, out_shape: Sequence[int], zoom: Sequence[float],
              order: int) -> np.ndarray:
  """Resamples axes 0 and 1 of [X, Y, Z] from `array.shape` to `out_shape` (zoom = out / in)."""
  maps = [_grid_map(n_in, n_out, z) for n_in, n_out, z in zip(array.shape[:2], out_shape[:2],
                                                               zoom[:2])]
  if all(scale == 1.0 and offset == 0.0 for scale, offset in maps):
    return array.copy()
  scale = [maps[0][0], maps[1][0], 1.0]
  offset = [maps[0][1], maps[1][1], 0.0]
  # A 1-D matrix is scipy's fast diagonal path; the slice axis maps onto itself (scale 1, offset 0).
  return ndi.affine_transform(array, scale, offset=offset,
                              output_shape=(int(out_shape[0]), int(out_shape[1]), array.shape[2]),
                              order=order, mode="nearest", prefilter=False)


def _resampled_affine(affine: np.ndarray, in_shape, out_shape, zoom) -> np.ndarray:
  step = np.eye(4)
  for axis in range(2):
    scale, offset = _grid_map(in_shape[axis], out_shape[axis], zoom[axis])
    step[axis, axis] = scale
    step[axis, 3] = offset
  return affine @ step


def resample_inplane(array, spacing, target_spacing, *, is_label: bool) -> np.ndarray:
  """Resamples the two in-plane axes of a canonical [X, Y, Z] volume to a target spacing.

  The slice axis (the last one after `to_canonical`) is never touched. See the package docstring
  for the grid (exact target spacing, centres aligned).

  Args:
    array: [X, Y, Z] volume.
    spacing: its voxel size in mm, (sx, sy[, sz]).
    target_spacing: (tx, ty) in mm, or None to keep the grid.
    is_label: nearest neighbour (order 0, dtype kept) for labels; linear interpolation (order 1)
      for images, returned as float32.

  Returns:
    The resampled [X', Y', Z] array.
  """
  array = check_volume(array, "array")
  if array.ndim != 3:
    raise GeometryError(f"argument 'array' must be 3D [X, Y, Z], got shape {array.shape}")
  zoom = _inplane_zoom(spacing, target_spacing)
  if not is_label:
    array = array.astype(np.float32, copy=False)
  return _resample(array, _zoomed_shape(array.shape, zoom), zoom, order=0 if is_label else 1)


def to_model_grid(image, label, affine, target_spacing):
  """Source grid -> model grid: canonical RAS, then in-plane resampling to `target_spacing`.

  Args:
    image: [X, Y, Z] image as stored (any numeric dtype).
    label: [X, Y, Z] integer labels on the same grid, or None.
    affine: [4, 4] voxel -> world of both.
    target_spacing: (tx, ty) in mm, or None to only reorient.

  Returns:
    (image float32 [X', Y', Z'], label [X', Y', Z'] with `label`'s dtype or None,
     affine [4, 4] of both, GeometryRecord).
  """
  image = check_volume(image, "image")
  if image.ndim != 3:
    raise GeometryError(f"argument 'image' must be 3D [X, Y, Z], got shape {image.shape}")
  if label is not None:
    label = np.asarray(label)
    if label.shape != image.shape:
      raise GeometryError(f"argument 'label' has shape {label.shape}, 'image' has {image.shape}")
  affine = check_affine(affine, "affine")

  canonical_image, canonical_affine, ornt = to_canonical(image, affine)
  zoom = _inplane_zoom(spacing_of(canonical_affine), target_spacing)
  out_shape = _zoomed_shape(canonical_image.shape, zoom)
  model_image = _resample(canonical_image.astype(np.float32), out_shape, zoom, order=1)
  model_label = None
  if label is not None:
    canonical_label, _, _ = to_canonical(label, affine)
    model_label = _resample(canonical_label, out_shape, zoom, order=0)
  model_affine = _resampled_affine(canonical_affine, canonical_image.shape, out_shape, zoom)

  record = GeometryRecord(
      source_shape=tuple(int(n) for n in image.shape),
      source_affine=affine_tuple(affine),
      orientation=tuple((int(a), int(f)) for a, f in ornt),
      canonical_shape=tuple(int(n) for n in canonical_image.shape),
      canonical_affine=affine_tuple(canonical_affine),
      zoom=zoom,
      resampled_shape=tuple(int(n) for n in out_shape),
      resampled_affine=affine_tuple(model_affine),
  )
  return model_image, model_label, model_affine, record


def to_source_grid(label_on_model_grid, record: GeometryRecord) -> np.ndarray:
  """Model grid -> source grid for a label map (nearest neighbour), ready to write with the
  source affine.

  Args:
    label_on_model_grid: [X', Y', Z'] labels, shape `record.resampled_shape`.
    record: the case's geometry record.

  Returns:
    [X, Y, Z] labels with `record.source_shape` and the input's dtype.
  """
  label = check_volume(label_on_model_grid, "label_on_model_grid")
  if label.shape != tuple(record.resampled_shape):
    raise GeometryError(f"argument 'label_on_model_grid' has shape {label.shape}, expected the "
                        f"record's resampled shape {list(record.resampled_shape)}")
  canonical_shape = tuple(record.canonical_shape)
  # The forward map (model index j -> canonical coordinate scale * j + offset) solved for j.
  maps = [_grid_map(n_can, n_model, z)
          for n_can, n_model, z in zip(canonical_shape[:2], label.shape[:2], record.zoom[:2])]
  if all(m == (1.0, 0.0) for m in maps):
    canonical = label.copy()
  else:
    scale = [1.0 / maps[0][0], 1.0 / maps[1][0], 1.0]
    offset = [-maps[0][1] / maps[0][0], -maps[1][1] / maps[1][0], 0.0]
    canonical = ndi.affine_transform(label, scale, offset=offset, output_shape=canonical_shape,
                                     order=0, mode="nearest", prefilter=False)
  return from_canonical(canonical, record)
