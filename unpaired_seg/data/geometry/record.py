"""The geometry record of a case, its error type, and the checks of arrays and affines.

A `GeometryRecord` holds everything needed to undo the way from a case's source grid to the model
grid (see the package docstring, `unpaired_seg.data.geometry`); every function of the package
raises `GeometryError` on an input that does not fit.
"""

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np


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
          source_affine=affine_tuple(obj["source_affine"]),
          orientation=tuple((int(a), int(f)) for a, f in obj["orientation"]),
          canonical_shape=_shape3(obj["canonical_shape"]),
          canonical_affine=affine_tuple(obj["canonical_affine"]),
          zoom=tuple(float(z) for z in obj["zoom"]),
          resampled_shape=_shape3(obj["resampled_shape"]),
          resampled_affine=affine_tuple(obj["resampled_affine"]),
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


def affine_tuple(value) -> tuple[tuple[float, ...], ...]:
  """A finite 4x4 affine as nested tuples of floats, the form a `GeometryRecord` holds."""
  affine = np.asarray(value, dtype=np.float64)
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
    raise ValueError(f"an affine must be a finite 4x4 matrix, got {value!r}")
  return tuple(tuple(float(v) for v in row) for row in affine)


def check_affine(affine, name: str) -> np.ndarray:
  """`affine` as float64 [4, 4]; GeometryError naming `name` unless finite and invertible."""
  affine = np.asarray(affine, dtype=np.float64)
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) \
      or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise GeometryError(f"argument '{name}' must be a finite, invertible 4x4 affine, got "
                        f"{affine.tolist()}")
  return affine


def check_volume(array, name: str) -> np.ndarray:
  """`array` as an array; GeometryError naming `name` unless it is at least 3D [X, Y, Z, ...]."""
  array = np.asarray(array)
  if array.ndim < 3:
    raise GeometryError(f"argument '{name}' must be at least 3D [X, Y, Z, ...], got shape "
                        f"{array.shape}")
  return array


def spacing_of(affine) -> tuple[float, float, float]:
  """Voxel size in mm along the three array axes: the norms of the affine's columns."""
  affine = check_affine(affine, "affine")
  return tuple(float(n) for n in np.linalg.norm(affine[:3, :3], axis=0))
