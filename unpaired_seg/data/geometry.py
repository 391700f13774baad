"""Volume geometry: canonical orientation, in-plane resampling, body crop, and the way back.

A case goes from its source grid to the grid the model sees in two steps, and the
`GeometryRecord` written beside it holds everything needed to undo both exactly:

  1. Reorientation to canonical RAS (array axes point to +Right, +Anterior, +Superior): a pure
     permutation and flip of the voxels, no interpolation, so it is undone exactly. After it the
     slice axis of an axial acquisition is the LAST axis ([X, Y, Z], Z inferior -> superior).
  2. In-plane resampling of axes 0 and 1 to a target spacing; the slice axis is kept. The new grid
     has EXACTLY the target spacing, `round(n * spacing / target)` voxels, and the same centre as
     the old one (so the field of view changes by less than one voxel). Images are interpolated
     linearly (order 1: fast, no overshoot), labels by nearest neighbour (order 0); outside the
     source grid the nearest edge voxel is repeated.

Going back (`to_source_grid`) resamples a label map from the model grid onto the canonical grid
by nearest neighbour, then undoes the reorientation: the result has the source's exact shape and
is written with the source's affine.

A source whose affine contradicts the anatomy along a voxel axis (the BTCV CT files put the back
of the body in front) is corrected before step 1 by `reverse_axis_directions`: only the affine
changes, never the voxels, so the way back still lands on the source file's own voxel grid.

  python -c "import numpy as np; from unpaired_seg.data import geometry as g; \
lab = np.zeros((40, 30, 5), np.uint8); lab[10:30, 5:25] = 1; \
aff = np.diag([-1.25, -1.25, 7.7, 1]); \
im, lb, af, rec = g.to_model_grid(lab.astype(float), lab, aff, (2.0, 2.0)); \
print(lb.shape, np.diag(af), (g.to_source_grid(lb, rec) == lab).mean())"

Nothing here imports JAX or Flax: numpy, scipy and nibabel only.
"""

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import nibabel as nib
import numpy as np
import scipy.ndimage as ndi

# Two in-plane spacings closer than this (relative) are the same: no resampling, no rounding
# noise, so a model grid at the source spacing is the source grid bit for bit.
_SAME_SPACING_RTOL = 1e-6


class GeometryError(ValueError):
  """An array, affine, spacing or geometry record does not fit the requested operation."""


@dataclasses.dataclass(frozen=True)
class GeometryRecord:
  """How one case went from its source grid to the model grid; JSON via to_dict / from_dict.

  Affines map voxel indices to world millimetres (nibabel's RAS+ convention).

  Attributes:
    source_shape: [X, Y, Z] shape of the array as stored in the source file.
    source_affine: 4x4 affine of the source grid: the source file's, after
      `reverse_axis_directions` where its importer corrected it (`prepare` keeps the reversed
      axes in the case's geometry JSON; reversing them again gives the file's affine back).
    orientation: nibabel orientation transform source -> canonical RAS, one (axis, flip) row per
      source axis: source axis i becomes canonical axis `orientation[i][0]`, reversed when
      `orientation[i][1] == -1`.
    canonical_shape: shape after reorientation.
    canonical_affine: affine after reorientation (same world positions as the source).
    zoom: factors applied to the canonical axes: source spacing / target spacing in-plane,
      1.0 for the slice axis; exactly 1.0 on an axis left as it was.
    resampled_shape: shape of the array the model sees.
    resampled_affine: affine of that array.
  """
  source_shape: tuple[int, int, int]
  source_affine: tuple[tuple[float, ...], ...]
  orientation: tuple[tuple[int, int], ...]
  canonical_shape: tuple[int, int, int]
  canonical_affine: tuple[tuple[float, ...], ...]
  zoom: tuple[float, float, float]
  resampled_shape: tuple[int, int, int]
  resampled_affine: tuple[tuple[float, ...], ...]

  def to_dict(self) -> dict[str, Any]:
    """Plain JSON types (lists, ints, floats); floats survive json.dumps/loads exactly."""
    return {
        "source_shape": list(self.source_shape),
        "source_affine": [list(row) for row in self.source_affine],
        "orientation": [list(row) for row in self.orientation],
        "canonical_shape": list(self.canonical_shape),
        "canonical_affine": [list(row) for row in self.canonical_affine],
        "zoom": list(self.zoom),
        "resampled_shape": list(self.resampled_shape),
        "resampled_affine": [list(row) for row in self.resampled_affine],
    }

  @classmethod
  def from_dict(cls, obj: Mapping[str, Any], where: str = "geometry record") -> "GeometryRecord":
    """Validates and builds a record; `where` (e.g. the JSON file) is named in every error."""
    if not isinstance(obj, Mapping):
      raise GeometryError(f"{where}: a geometry record must be a JSON object, got "
                          f"{type(obj).__name__}")
    fields = [f.name for f in dataclasses.fields(cls)]
    missing = [f for f in fields if f not in obj]
    unknown = [k for k in obj if k not in fields]
    if missing or unknown:
      raise GeometryError(f"{where}: geometry record keys missing {missing}, unknown {unknown}")
    try:
      record = cls(
          source_shape=_shape3(obj["source_shape"]),
          source_affine=_affine_tuple(obj["source_affine"]),
          orientation=tuple((int(a), int(f)) for a, f in obj["orientation"]),
          canonical_shape=_shape3(obj["canonical_shape"]),
          canonical_affine=_affine_tuple(obj["canonical_affine"]),
          zoom=tuple(float(z) for z in obj["zoom"]),
          resampled_shape=_shape3(obj["resampled_shape"]),
          resampled_affine=_affine_tuple(obj["resampled_affine"]),
      )
    except (TypeError, ValueError) as e:
      raise GeometryError(f"{where}: malformed geometry record: {e}") from e
    if len(record.orientation) != 3 or sorted(a for a, _ in record.orientation) != [0, 1, 2] \
        or any(f not in (1, -1) for _, f in record.orientation):
      raise GeometryError(f"{where}: 'orientation' must be 3 rows (axis, +-1) over axes 0, 1, 2, "
                          f"got {obj['orientation']}")
    if len(record.zoom) != 3 or not all(math.isfinite(z) and z > 0 for z in record.zoom):
      raise GeometryError(f"{where}: 'zoom' must be 3 finite positive factors, got {obj['zoom']}")
    permuted = [0, 0, 0]
    for axis, (target, _) in enumerate(record.orientation):
      permuted[target] = record.source_shape[axis]
    if tuple(permuted) != record.canonical_shape:
      raise GeometryError(f"{where}: 'canonical_shape' {list(record.canonical_shape)} is not "
                          f"'source_shape' {list(record.source_shape)} permuted by 'orientation'")
    return record


def _shape3(value) -> tuple[int, int, int]:
  shape = tuple(int(v) for v in value)
  if len(shape) != 3 or min(shape) < 1 or any(int(v) != v for v in value):
    raise ValueError(f"a shape must be 3 positive integers, got {value!r}")
  return shape


def _affine_tuple(value) -> tuple[tuple[float, ...], ...]:
  affine = np.asarray(value, dtype=np.float64)
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
    raise ValueError(f"an affine must be a finite 4x4 matrix, got {value!r}")
  return tuple(tuple(float(v) for v in row) for row in affine)


def _check_affine(affine, name: str) -> np.ndarray:
  affine = np.asarray(affine, dtype=np.float64)
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) \
      or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise GeometryError(f"argument '{name}' must be a finite, invertible 4x4 affine, got "
                        f"{affine.tolist()}")
  return affine


def _check_volume(array, name: str) -> np.ndarray:
  array = np.asarray(array)
  if array.ndim < 3:
    raise GeometryError(f"argument '{name}' must be at least 3D [X, Y, Z, ...], got shape "
                        f"{array.shape}")
  return array


def spacing_of(affine) -> tuple[float, float, float]:
  """Voxel size in mm along the three array axes: the norms of the affine's columns."""
  affine = _check_affine(affine, "affine")
  return tuple(float(n) for n in np.linalg.norm(affine[:3, :3], axis=0))


# ---------------------------------------------------------------------------------------------
# Orientation.
# ---------------------------------------------------------------------------------------------


def check_axes(axes, name: str = "axes") -> tuple[int, ...]:
  """Validates voxel axes: distinct integers in 0..2; returns them sorted.

  Args:
    axes: an iterable of voxel axes (e.g. [1]); empty for none.
    name: the argument or key named in the error.

  Raises:
    GeometryError: naming `name` when an entry is not an integer in 0..2 or repeats.
  """
  try:
    values = list(axes)
  except TypeError:
    values = None
  if (values is None or isinstance(axes, (str, bytes))
      or not all(isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_))
                 and 0 <= a <= 2 for a in values)
      or len(set(int(a) for a in values)) != len(values)):
    raise GeometryError(f"argument '{name}' must be a list of distinct voxel axes in 0..2, got "
                        f"{axes!r}")
  return tuple(sorted(int(a) for a in values))


def reverse_axis_directions(affine, shape: Sequence[int], axes: Sequence[int]) -> np.ndarray:
  """Corrects an affine whose direction along some voxel axes is reversed; voxels untouched.

  For each voxel axis a in `axes` the affine's column a is negated and the origin moves to where
  the last voxel along a was (new origin = old origin + old column a * (n_a - 1)): voxel i then
  lies where voxel n_a - 1 - i lay. The same volume read with the new affine is its mirror image
  along that axis in world space, on the same set of voxel centres. Applying it twice with the
  same axes gives the original affine back.

  Args:
    affine: [4, 4] voxel -> world (mm).
    shape: the volume's shape [X, Y, Z, ...] (only the first three entries are used).
    axes: voxel axes (distinct, 0..2) whose direction is reversed; empty returns a copy.

  Returns:
    float64 [4, 4] corrected affine.
  """
  affine = _check_affine(affine, "affine")
  shape = tuple(shape)
  if len(shape) < 3 or not all(isinstance(n, (int, np.integer)) and n >= 1 for n in shape[:3]):
    raise GeometryError(f"argument 'shape' must start with three positive integers [X, Y, Z], "
                        f"got {shape!r}")
  out = affine.copy()
  for axis in check_axes(axes):
    out[:3, 3] = out[:3, 3] + affine[:3, axis] * (int(shape[axis]) - 1)
    out[:3, axis] = -affine[:3, axis]
  return out


def to_canonical(array, affine) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Reorients a volume to the RAS axis order and directions closest to its affine.

  Only permutes and flips voxels (as nibabel's `as_closest_canonical`): values are unchanged and
  every voxel keeps its world position. An oblique affine stays oblique.

  Args:
    array: [X, Y, Z, ...] volume; axes after the third are carried along untouched.
    affine: [4, 4] voxel -> world (mm) of `array`.

  Returns:
    (canonical array, canonical affine [4, 4], orientation transform [3, 2] source -> canonical).
  """
  array = _check_volume(array, "array")
  affine = _check_affine(affine, "affine")
  ornt = nib.orientations.ornt_transform(nib.orientations.io_orientation(affine),
                                         nib.orientations.axcodes2ornt("RAS"))
  canonical = nib.orientations.apply_orientation(array, ornt)
  canonical_affine = affine @ nib.orientations.inv_ornt_aff(ornt, array.shape[:3])
  return canonical, canonical_affine, ornt.astype(np.int64)


def _inverse_ornt(ornt) -> np.ndarray:
  """The orientation transform that undoes `ornt` (canonical -> source)."""
  ornt = np.asarray(ornt, dtype=np.int64)
  inverse = np.zeros_like(ornt)
  for axis, (target, flip) in enumerate(ornt):
    # Canonical axis `target` came from source axis `axis`; reversing twice is the identity.
    inverse[target] = (axis, flip)
  return inverse


def from_canonical(array, record: GeometryRecord) -> np.ndarray:
  """Undoes `to_canonical`: canonical [X, Y, Z, ...] -> the source's axis order and directions.

  Args:
    array: array on the canonical grid, shape `record.canonical_shape` (+ trailing axes).
    record: the case's geometry record.

  Returns:
    The array on the source grid, shape `record.source_shape` (+ the same trailing axes).
  """
  array = _check_volume(array, "array")
  if tuple(array.shape[:3]) != tuple(record.canonical_shape):
    raise GeometryError(f"argument 'array' has shape {array.shape}, expected the record's "
                        f"canonical shape {list(record.canonical_shape)}")
  return nib.orientations.apply_orientation(array, _inverse_ornt(record.orientation))


# ---------------------------------------------------------------------------------------------
# In-plane resampling.
# ---------------------------------------------------------------------------------------------


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

  The slice axis (the last one after `to_canonical`) is never touched. See the module docstring
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
  array = _check_volume(array, "array")
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
  image = _check_volume(image, "image")
  if image.ndim != 3:
    raise GeometryError(f"argument 'image' must be 3D [X, Y, Z], got shape {image.shape}")
  if label is not None:
    label = np.asarray(label)
    if label.shape != image.shape:
      raise GeometryError(f"argument 'label' has shape {label.shape}, 'image' has {image.shape}")
  affine = _check_affine(affine, "affine")

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
      source_affine=_affine_tuple(affine),
      orientation=tuple((int(a), int(f)) for a, f in ornt),
      canonical_shape=tuple(int(n) for n in canonical_image.shape),
      canonical_affine=_affine_tuple(canonical_affine),
      zoom=zoom,
      resampled_shape=tuple(int(n) for n in out_shape),
      resampled_affine=_affine_tuple(model_affine),
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
  label = _check_volume(label_on_model_grid, "label_on_model_grid")
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


# ---------------------------------------------------------------------------------------------
# Body crop.
# ---------------------------------------------------------------------------------------------


def otsu_threshold(values, bins: int = 256) -> float:
  """Otsu's threshold: the histogram cut that maximises the between-class variance.

  Args:
    values: intensities, any shape; NaN/inf are ignored.
    bins: histogram bins over [min, max].

  Returns:
    A threshold t; foreground is `values > t`. For a constant input, that constant.
  """
  values = np.asarray(values, dtype=np.float64).ravel()
  values = values[np.isfinite(values)]
  if values.size == 0:
    raise GeometryError("argument 'values' holds no finite intensity")
  lo, hi = float(values.min()), float(values.max())
  if hi <= lo:
    return lo
  counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
  centres = 0.5 * (edges[:-1] + edges[1:])
  weight_low = np.cumsum(counts)[:-1].astype(np.float64)          # classes: bins [0, k] vs (k, ...]
  weight_high = counts.sum() - weight_low
  sum_low = np.cumsum(counts * centres)[:-1]
  mean_low = sum_low / np.maximum(weight_low, 1)
  mean_high = (np.sum(counts * centres) - sum_low) / np.maximum(weight_high, 1)
  between = weight_low * weight_high * (mean_low - mean_high) ** 2
  return float(edges[int(np.argmax(between)) + 1])


def body_crop_box(image, size: Sequence[int], *, threshold: float | None = None
                  ) -> tuple[slice, slice]:
  """An in-plane box of `size` centred on the body.

  The body is the set of in-plane pixels whose mean over slices is above `threshold` (default:
  Otsu's threshold of that mean image; averaging over slices removes most background noise). Its
  extent along each axis runs from the 0.5th to the 99.5th percentile of those pixels'
  coordinates, so that a few stray bright pixels do not stretch it; the box is centred there
  (on the image centre when no pixel is above the threshold).

  Clipping: along an axis where the image is at least `size` long the box is shifted to lie
  inside the image (no padding, the body as centred as the borders allow). Where the image is
  shorter than `size` the box covers the whole axis and reaches outside it (negative start or
  stop past the end); `apply_box` pads there.

  Args:
    image: [H, W] or [H, W, Z].
    size: (h, w) of the box.
    threshold: intensity above which a pixel counts as body.

  Returns:
    (slice over axis 0, slice over axis 1), each with step None and length `size`.
  """
  image = np.asarray(image)
  if image.ndim not in (2, 3):
    raise GeometryError(f"argument 'image' must be [H, W] or [H, W, Z], got shape {image.shape}")
  size = _box_size(size)
  mean = image.astype(np.float64).reshape(image.shape[0], image.shape[1], -1).mean(axis=-1)
  if threshold is None:
    threshold = otsu_threshold(mean)
  rows, cols = np.nonzero(mean > threshold)
  box = []
  for axis, coords in enumerate((rows, cols)):
    n, want = image.shape[axis], size[axis]
    if coords.size:
      first, last = np.percentile(coords, [0.5, 99.5])
      centre = 0.5 * (first + last)
    else:
      centre = 0.5 * (n - 1)
    # The box [start, start + want) has its centre at start + (want - 1) / 2; round half up.
    start = int(math.floor(centre - (want - 1) / 2.0 + 0.5))
    start = min(max(start, 0), n - want) if want <= n else min(max(start, n - want), 0)
    box.append(slice(start, start + want))
  return tuple(box)


def _box_size(size) -> tuple[int, int]:
  size = tuple(size)
  if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s > 0 for s in size):
    raise GeometryError(f"argument 'size' must be two positive integers (h, w), got {size!r}")
  return int(size[0]), int(size[1])


def _check_box(box, size=None) -> tuple[slice, slice]:
  if len(box) != 2 or not all(isinstance(b, slice) and b.step in (None, 1)
                              and b.start is not None and b.stop is not None for b in box):
    raise GeometryError(f"argument 'box' must be two slices with start and stop, got {box!r}")
  if size is not None and tuple(b.stop - b.start for b in box) != tuple(size):
    raise GeometryError(f"argument 'box' {box} does not have argument 'size' {tuple(size)}")
  return tuple(box)


def _overlap(box, shape):
  """Per axis: (source slice in the full array, destination slice in the box array)."""
  parts = []
  for b, n in zip(box, shape):
    lo, hi = max(b.start, 0), min(b.stop, n)
    if hi <= lo:
      return None
    parts.append((slice(lo, hi), slice(lo - b.start, hi - b.start)))
  return parts


def apply_box(array, box: tuple[slice, slice], size: Sequence[int],
              pad_value: float = 0.0) -> np.ndarray:
  """Cuts `box` out of the first two axes of [H, W, ...], padding with `pad_value` outside.

  Args:
    array: [H, W, ...].
    box: from `body_crop_box` (may reach outside the array).
    size: (h, w), the box's size (checked against `box`).
    pad_value: value of box pixels outside the array.

  Returns:
    [h, w, ...] with `array`'s dtype.
  """
  array = np.asarray(array)
  size = _box_size(size)
  box = _check_box(box, size)
  out = np.full(size + array.shape[2:], pad_value, dtype=array.dtype)
  parts = _overlap(box, array.shape[:2])
  if parts is not None:
    (src0, dst0), (src1, dst1) = parts
    out[dst0, dst1] = array[src0, src1]
  return out


def invert_box(array_in_box, box: tuple[slice, slice], full_shape: Sequence[int],
               fill_value: float = 0) -> np.ndarray:
  """Puts a box cut by `apply_box` back into an array of `full_shape` (first two axes).

  Args:
    array_in_box: [h, w, ...].
    box: the box it was cut with.
    full_shape: (H, W) or the full shape; trailing axes come from `array_in_box`.
    fill_value: value outside the box (0 = background for labels).

  Returns:
    [H, W, ...] with `array_in_box`'s dtype; the box's padded part is dropped.
  """
  array_in_box = np.asarray(array_in_box)
  box = _check_box(box, array_in_box.shape[:2])
  full = tuple(int(n) for n in full_shape[:2])
  out = np.full(full + array_in_box.shape[2:], fill_value, dtype=array_in_box.dtype)
  parts = _overlap(box, full)
  if parts is not None:
    (dst0, src0), (dst1, src1) = parts
    out[dst0, dst1] = array_in_box[src0, src1]
  return out
