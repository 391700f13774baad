"""Prepared cases read lazily: training views and whole volumes as memory-mapped arrays.

  store = arrays.VolumeStore(manifest, cache_dir)
  cases = lazy_cases.prepare_cases(store, store.modality('ct'), normalization, (64, 64))
  cases[0].image                # [h, w, Z] float32, read from disk as it is indexed

`cases.prepare_case` runs once per case and configuration (the normalisation with its fitted
statistics, the view size, the crop), one case at a time; its arrays go to
`<cache entry>/views/<hash of the configuration>/<modality>/<case>.*`:

  image.npy, label.npy             the training view [Z, h, w], slice-major: a slice is one read
  grid_image.npy, grid_label.npy   the whole volume on the model grid [X, Y, Z]
  json                             box, affine, geometry record, per-slice class index, and the
                                   digest of the volume it was made from (written last)

A `LazyCase` has the attributes of a `cases.PreparedCase`; its arrays are opened on access
through one small cache of open memmaps, bounded in bytes (`OPEN_BYTES`), so host memory holds
the pages of that many arrays whatever the number of cases. The arrays are the in-memory path's,
bit for bit: the same function computes them, and storage only moves the slice axis.
"""

import collections
import dataclasses
import hashlib
import json
import pathlib
import threading
from collections.abc import Mapping, Sequence

import numpy as np

from unpaired_seg.data import arrays
from unpaired_seg.data import cases as cases_lib
from unpaired_seg.data import dataset as ds
from unpaired_seg.data import geometry
from unpaired_seg.data.jsonio import write_json_atomic

# Bumped when the files' meaning changes: older ones are then rebuilt, never misread.
VIEW_FORMAT = 1
VIEWS_DIR = "views"
# Open memmaps kept for reuse: enough for a batch's cases on a small dataset; what is evicted
# is unmapped once no array handed out still uses it.
OPEN_BYTES = 16 << 20


class OpenArrays:
  """A least-recently-used set of open memmaps, bounded by their total size in bytes."""

  def __init__(self, max_bytes: int = OPEN_BYTES):
    self.max_bytes = max_bytes
    self._open: collections.OrderedDict = collections.OrderedDict()
    self._bytes = 0
    self._lock = threading.Lock()   # the trainer may build batches in a helper thread

  def get(self, path: pathlib.Path, token: str, slice_major: bool) -> np.ndarray:
    """The array at `path` (as [h, w, Z] when stored slice-major); `token` names its content."""
    key = (str(path), token)
    with self._lock:
      if key in self._open:
        self._open.move_to_end(key)
        return self._open[key]
    array = arrays.open_array(path)
    # A plain read-only ndarray view: it keeps the mapping alive for as long as it is used.
    array = (array.transpose(1, 2, 0) if slice_major else array).view(np.ndarray)
    with self._lock:
      if key not in self._open:
        self._open[key] = array
        self._bytes += array.nbytes
      while self._bytes > self.max_bytes and len(self._open) > 1:
        _, old = self._open.popitem(last=False)
        self._bytes -= old.nbytes
    return array

  def __len__(self) -> int:
    return len(self._open)

  def clear(self) -> None:
    with self._lock:
      self._open.clear()
      self._bytes = 0


OPEN = OpenArrays()


@dataclasses.dataclass(frozen=True, eq=False)
class LazyCase:
  """A prepared case whose arrays stay on disk until indexed (see `cases.PreparedCase`).

  Attributes:
    modality, case, subject, affine, spacing, box, record, image_path, source: as PreparedCase.
    num_slices: slices of the training view.
    label_slices: {class > 0: the view's slices that contain it}; {} without a label.
    counts: voxels per label value in the view and on the grid (`cases.label_counts`), or None.
    folder: the views folder holding `<modality>/<case>.*`.
    digest: the digest of the volume the arrays were made from.
    has_label: whether the arrays include labels.
    label_dropped: the training label is dropped (`without_label`); the grid label stays.
  """
  modality: str
  case: str
  subject: str
  affine: np.ndarray
  spacing: tuple[float, float, float]
  box: tuple[slice, slice]
  record: geometry.GeometryRecord
  num_slices: int
  label_slices: dict
  counts: tuple[np.ndarray, np.ndarray] | None
  folder: pathlib.Path
  digest: str
  has_label: bool
  image_path: pathlib.Path | None = None
  source: cases_lib.SourceGeometry | None = None
  label_dropped: bool = False

  def _array(self, name: str, slice_major: bool) -> np.ndarray:
    path = arrays.array_path(self.folder, self.modality, self.case, f"{name}.npy")
    return OPEN.get(path, self.digest, slice_major)

  @property
  def image(self) -> np.ndarray:
    return self._array("image", True)

  @property
  def label(self) -> np.ndarray | None:
    return self._array("label", True) if self.has_label and not self.label_dropped else None

  @property
  def grid_image(self) -> np.ndarray:
    return self._array("grid_image", False)

  @property
  def grid_label(self) -> np.ndarray | None:
    return self._array("grid_label", False) if self.has_label else None

  @property
  def label_counts(self) -> tuple[np.ndarray, np.ndarray] | None:
    return None if self.label_dropped else self.counts

  @property
  def source_label(self) -> np.ndarray:
    """uint8 shared labels on the source grid, read from the source label file (not kept)."""
    return cases_lib.read_source_label(self)

  def without_label(self) -> "LazyCase":
    return dataclasses.replace(self, label_dropped=True, label_slices={})


def view_key(normalization: Mapping, image_size: Sequence[int], crop: str) -> str:
  """The hash of everything besides the volume that the prepared arrays depend on."""
  spec = {"format": VIEW_FORMAT, "normalization": normalization,
          "image_size": [int(s) for s in image_size], "crop": crop}
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def _write(folder: pathlib.Path, case: cases_lib.PreparedCase, digest: str) -> dict:
  """Writes a prepared case's arrays and, last, its JSON; returns that JSON."""
  def path(name):
    return arrays.array_path(folder, case.modality, case.case, name)
  arrays.save_array(path("image.npy"), case.image.transpose(2, 0, 1))
  arrays.save_array(path("grid_image.npy"), case.grid_image)
  if case.label is not None:
    arrays.save_array(path("label.npy"), case.label.transpose(2, 0, 1))
    arrays.save_array(path("grid_label.npy"), case.grid_label)
  meta = {"format": VIEW_FORMAT, "digest": digest, "num_slices": int(case.num_slices),
          "affine": np.asarray(case.affine, np.float64).tolist(),
          "spacing": [float(s) for s in case.spacing],
          "box": [[int(b.start), int(b.stop)] for b in case.box],
          "record": case.record.to_dict(), "has_label": case.label is not None,
          "label_slices": {str(k): v.tolist() for k, v in case.label_slices.items()},
          "label_counts": (None if case.label is None else
                           [c.tolist() for c in cases_lib.label_counts(case)])}
  write_json_atomic(path("json"), meta)
  return meta


def _read(path: pathlib.Path, digest: str) -> dict | None:
  try:
    meta = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  ok = isinstance(meta, dict) and meta.get("format") == VIEW_FORMAT and meta.get("digest") == digest
  return meta if ok else None


def prepare_case(folder: pathlib.Path, volume: arrays.LazyVolume, normalization: Mapping,
                 image_size: Sequence[int], *, crop: str = "body",
                 manifest: ds.Manifest | None = None) -> LazyCase:
  """`cases.prepare_case` of one volume, computed once into `folder`, returned lazily."""
  meta = _read(arrays.array_path(folder, volume.modality, volume.case, "json"), volume.digest)
  if meta is None:
    meta = _write(folder, cases_lib.prepare_case(volume, normalization, image_size, crop=crop,
                                                 manifest=manifest), volume.digest)
  image_path, source = cases_lib.locate(manifest, volume.modality, volume.case)
  return LazyCase(
      modality=volume.modality, case=volume.case, subject=volume.subject,
      affine=np.asarray(meta["affine"], np.float64), spacing=tuple(meta["spacing"]),
      box=tuple(slice(a, b) for a, b in meta["box"]),
      record=geometry.GeometryRecord.from_dict(meta["record"]), num_slices=meta["num_slices"],
      label_slices={int(k): np.asarray(v, np.int64) for k, v in meta["label_slices"].items()},
      counts=(None if meta["label_counts"] is None
              else tuple(np.asarray(c, np.int64) for c in meta["label_counts"])),
      folder=folder, digest=volume.digest, has_label=meta["has_label"], image_path=image_path,
      source=source)


def prepare_cases(store: arrays.VolumeStore, volumes: Sequence[arrays.LazyVolume],
                  normalization: Mapping, image_size: Sequence[int], *, crop: str = "body",
                  manifest: ds.Manifest | None = None) -> list[LazyCase]:
  """`prepare_case` for every volume of one modality, into the store's views folder."""
  if crop not in cases_lib.CROP_MODES:
    raise ValueError(f"config key 'data.crop': {crop!r} is not one of {cases_lib.CROP_MODES}")
  folder = store.entry / VIEWS_DIR / view_key(normalization, image_size, crop)
  return [prepare_case(folder, v, normalization, image_size, crop=crop, manifest=manifest)
          for v in volumes]
