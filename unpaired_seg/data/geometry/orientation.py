"""Canonical RAS orientation: a permutation and flip of the voxels, undone exactly.

Also `reverse_axis_directions`, which corrects an affine that contradicts the anatomy along some
voxel axes before the reorientation, and `check_axes`, which validates such axes.
"""

from collections.abc import Sequence

import nibabel as nib
import numpy as np

from unpaired_seg.data.geometry.record import (GeometryError, GeometryRecord, check_affine,
                                               check_volume)


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
  affine = check_affine(affine, "affine")
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
  array = check_volume(array, "array")
  affine = check_affine(affine, "affine")
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
  array = check_volume(array, "array")
  if tuple(array.shape[:3]) != tuple(record.canonical_shape):
    raise GeometryError(f"argument 'array' has shape {array.shape}, expected the record's "
                        f"canonical shape {list(record.canonical_shape)}")
  return nib.orientations.apply_orientation(array, _inverse_ornt(record.orientation))
