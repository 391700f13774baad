"""What `prepare` keeps per case besides the NIfTI files: its geometry record and stored types.

`<dataset>/geometry/<modality>/<case>.json` holds a prepared case's `GeometryRecord`, its source
files, target spacing and `source_axis_flips` (see `prepare`); readers of a prepared dataset
(`pipeline.prepare_case`, `prepare.check_dataset`) find it here without the importer's code.
"""

import json
import pathlib

import numpy as np

from unpaired_seg.data import dataset as ds
from unpaired_seg.data import geometry

GEOMETRY_DIR = "geometry"


class PrepareError(ds.DatasetError):
  """Preparation refused or failed; the message lists every problem with its file."""


def _stored_image(image: np.ndarray, source_dtype: np.dtype) -> np.ndarray:
  """Resampled float32 intensities in the source's integer type (rounded), else float32.

  Linear interpolation stays within the source's range, so nothing is clipped in practice; the
  rounding error (<= 0.5 of an integer step) is far below the image noise, and integer volumes
  are much smaller on disk.
  """
  if np.issubdtype(source_dtype, np.integer):
    info = np.iinfo(source_dtype)
    return np.clip(np.rint(image), info.min, info.max).astype(source_dtype)
  return image.astype(np.float32)


def _stored_label(label: np.ndarray) -> np.ndarray:
  """Raw label values as the smallest integer type that holds them (uint8 for most data)."""
  if label.dtype == np.bool_:
    return label.astype(np.uint8)
  if np.issubdtype(label.dtype, np.floating):
    label = np.rint(label).astype(np.int64)
  lo, hi = (int(label.min()), int(label.max())) if label.size else (0, 0)
  for dtype in (np.uint8, np.int16, np.int32):
    info = np.iinfo(dtype)
    if info.min <= lo and hi <= info.max:
      return label.astype(dtype, copy=False)
  return label.astype(np.int64)


def geometry_path(root, modality: str, case: str) -> pathlib.Path:
  """Where a prepared case's geometry record lives."""
  return pathlib.Path(root) / GEOMETRY_DIR / modality / f"{case}.json"


def load_geometry(root, modality: str, case: str) -> tuple[geometry.GeometryRecord, dict]:
  """The GeometryRecord of a prepared case and the whole JSON (source files, target spacing).

  Raises:
    PrepareError: naming the JSON file when it is missing or malformed.
  """
  path = geometry_path(root, modality, case)
  try:
    obj = json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise PrepareError(f"{path}: geometry record of case {case!r} not found") from None
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise PrepareError(f"{path}: cannot read the geometry record: {e}") from e
  if not isinstance(obj, dict) or "geometry" not in obj:
    raise PrepareError(f"{path}: no 'geometry' key")
  try:
    record = geometry.GeometryRecord.from_dict(obj["geometry"], where=str(path))
  except geometry.GeometryError as e:
    raise PrepareError(str(e)) from e
  return record, obj
