"""Volumes as memory-mapped arrays: decoded from NIfTI once, then read page by page.

  store = arrays.VolumeStore(manifest, cache_dir)
  volume = store.volume('ct', 'case_000')      # a LazyVolume; .image / .label open .npy memmaps

The arrays of a case are exactly what `dataset.load_volume` returns (float32 raw intensities,
uint8 shared labels, in the stored orientation), so anything computed from them is what the
in-memory path computes:

  <folder>/<modality>/<case>.image.npy   float32 [X, Y, Z]
  <folder>/<modality>/<case>.label.npy   uint8 [X, Y, Z] (absent for a case without a label)
  <folder>/<modality>/<case>.json        written last: the NIfTI files' size and mtime it was
                                         decoded from, the affine, a digest of the arrays

A dataset written by `prepare` or the phantom generator carries them in `<root>/arrays/` (written
while that output is being created). For any other dataset, or a case whose NIfTI files changed
since, they are built on first use in the user cache, `<cache>/datasets/<hash of the root>/`,
never in the dataset folder; every file is written to a temporary name and renamed into place.
"""

import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import uuid

import numpy as np
from absl import logging

from unpaired_seg.data import dataset as ds
from unpaired_seg.data.jsonio import write_json_atomic

ARRAYS_DIR = "arrays"
# Bumped when the files' meaning changes: older ones are then rebuilt, never misread.
FORMAT = 1
SOURCE_FILE = "source.json"


def array_path(folder: pathlib.Path, modality: str, case: str, name: str) -> pathlib.Path:
  """`<folder>/<modality>/<case>.<name>` (name 'image.npy', 'label.npy', 'json', ...)."""
  return pathlib.Path(folder) / modality / f"{case}.{name}"


def save_array(path: pathlib.Path, array: np.ndarray) -> None:
  """np.save to a hidden temporary file beside `path`, then a rename: never half an array."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
  try:
    with open(tmp, "wb") as f:
      np.save(f, np.ascontiguousarray(array), allow_pickle=False)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def open_array(path: pathlib.Path) -> np.memmap:
  """A read-only memmap of an .npy file; a missing file is an error naming it."""
  try:
    return np.load(path, mmap_mode="r", allow_pickle=False)
  except FileNotFoundError:
    raise ds.DatasetError(f"{path}: array not found (was the array cache removed while in "
                          "use?)") from None


def digest(image: np.ndarray, label: np.ndarray | None, affine: np.ndarray) -> str:
  """A content hash of a volume: what cached views of it are checked against."""
  h = hashlib.sha256()
  for a in (image, affine) if label is None else (image, label, affine):
    a = np.ascontiguousarray(a)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.data)
  return h.hexdigest()


def nifti_signature(manifest: ds.Manifest, modality: str, case: str) -> dict:
  """Size and modification time of a case's image and label files (label None when absent)."""
  out = {}
  for key, folder in (("image", ds.IMAGES_DIR), ("label", ds.LABELS_DIR)):
    path = manifest.root / modality / folder / f"{case}{manifest.file_ending}"
    try:
      st = path.stat()
      out[key] = [st.st_size, st.st_mtime_ns]
    except FileNotFoundError:
      out[key] = None
  return out


def write_volume(folder: pathlib.Path, volume: ds.Volume, signature: dict) -> dict:
  """Writes a loaded volume's arrays and, last, its JSON; returns that JSON."""
  save_array(array_path(folder, volume.modality, volume.case, "image.npy"), volume.image)
  if volume.label is not None:
    save_array(array_path(folder, volume.modality, volume.case, "label.npy"), volume.label)
  meta = {"format": FORMAT, "signature": signature,
          "affine": np.asarray(volume.affine, np.float64).tolist(),
          "shape": list(volume.image.shape), "labelled": volume.label is not None,
          "background_only": volume.label is not None and not volume.label.any(),
          "digest": digest(volume.image, volume.label, volume.affine)}
  write_json_atomic(array_path(folder, volume.modality, volume.case, "json"), meta)
  return meta


def dataset_arrays(manifest: ds.Manifest) -> pathlib.Path | None:
  """The dataset's own arrays folder; None where a modality of that name would own the folder."""
  return None if ARRAYS_DIR in manifest.modalities else manifest.root / ARRAYS_DIR


def write_dataset_arrays(root: os.PathLike) -> None:
  """Decodes every case of the dataset being created at `root` into `<root>/arrays`.

  Only for a writer's own new output (`prepare`, the phantom generator), before it is renamed
  into place: the arrays then match the files exactly, and no reader ever has to decode them.
  """
  manifest = ds.load_manifest(root)
  folder = dataset_arrays(manifest)
  if folder is None:
    return
  for modality in manifest.modalities:
    for case in ds.list_cases(manifest, modality):
      write_volume(folder, ds.load_volume(manifest, modality, case, require_label=False),
                   nifti_signature(manifest, modality, case))


@dataclasses.dataclass(frozen=True)
class LazyVolume:
  """A `dataset.Volume` whose image and label are memmaps, opened on each access.

  Attributes:
    modality, case, subject, affine: as `dataset.Volume`.
    folder: the arrays folder holding `<modality>/<case>.*`.
    labelled: whether the case has a label.
    digest: the content hash of its arrays (see `digest`).
  """
  modality: str
  case: str
  subject: str
  affine: np.ndarray
  folder: pathlib.Path
  labelled: bool
  digest: str

  @property
  def image(self) -> np.ndarray:
    return open_array(array_path(self.folder, self.modality, self.case, "image.npy"))

  @property
  def label(self) -> np.ndarray | None:
    if not self.labelled:
      return None
    return open_array(array_path(self.folder, self.modality, self.case, "label.npy"))

  @property
  def spacing(self) -> tuple[float, float, float]:
    return tuple(float(n) for n in np.linalg.norm(self.affine[:3, :3], axis=0))


def cache_entry(cache_dir: os.PathLike, root: pathlib.Path) -> pathlib.Path:
  """The user-cache folder of the dataset at `root` (its arrays and prepared views)."""
  key = hashlib.sha256(str(pathlib.Path(root).resolve()).encode()).hexdigest()[:16]
  return pathlib.Path(cache_dir) / "datasets" / key


def prune_cache(cache_dir: os.PathLike) -> None:
  """Removes the cache folders of datasets that no longer exist (a test's temporary dataset)."""
  for entry in sorted((pathlib.Path(cache_dir) / "datasets").glob(f"*/{SOURCE_FILE}")):
    try:
      root = pathlib.Path(json.loads(entry.read_text())["root"])
    except (OSError, ValueError, KeyError, TypeError):
      continue
    if not (root / ds.MANIFEST_NAME).is_file():
      shutil.rmtree(entry.parent, ignore_errors=True)


class VolumeStore:
  """Every case of one dataset as a LazyVolume, decoding a case only where no valid arrays exist.

  Args:
    manifest: the dataset.
    cache_dir: the user cache (see `loader.default_cache_dir`); written, the dataset never.
  """

  def __init__(self, manifest: ds.Manifest, cache_dir: os.PathLike):
    self.manifest = manifest
    self.own = dataset_arrays(manifest)
    self.entry = cache_entry(cache_dir, manifest.root)
    self.cache = self.entry / ARRAYS_DIR
    try:
      prune_cache(cache_dir)
      self.entry.mkdir(parents=True, exist_ok=True)
      source = self.entry / SOURCE_FILE
      if not source.is_file():
        write_json_atomic(source, {"root": str(manifest.root.resolve())})
    except OSError as e:
      raise ds.DatasetError(f"{self.entry}: cannot write the array cache ({e}); set "
                            "UNPAIRED_SEG_CACHE to a writable folder") from e

  def _valid(self, folder: pathlib.Path | None, modality: str, case: str,
             signature: dict) -> dict | None:
    if folder is None:
      return None
    try:
      meta = json.loads(array_path(folder, modality, case, "json").read_text())
    except (OSError, ValueError):
      return None
    ok = (isinstance(meta, dict) and meta.get("format") == FORMAT
          and meta.get("signature") == signature)
    return meta if ok else None

  def volume(self, modality: str, case: str, require_label: bool = True) -> LazyVolume:
    """One case, as `dataset.load_volume` (the same errors and warnings) but lazily read."""
    signature = nifti_signature(self.manifest, modality, case)
    folder, meta = self.own, self._valid(self.own, modality, case, signature)
    if meta is None:
      folder, meta = self.cache, self._valid(self.cache, modality, case, signature)
    if meta is None or (require_label and not meta["labelled"]):
      # Decoding checks the files and raises what the in-memory path raises; what it decodes
      # goes to the cache, never into the dataset.
      folder = self.cache
      meta = write_volume(folder, ds.load_volume(self.manifest, modality, case, require_label),
                          signature)
    elif meta["background_only"]:
      logging.warning("%s: the label of case %r holds background only",
                      self.manifest.root / modality / ds.LABELS_DIR /
                      f"{case}{self.manifest.file_ending}", case)
    return LazyVolume(modality, case, self.manifest.subject_of(modality, case),
                      np.asarray(meta["affine"], np.float64), folder, meta["labelled"],
                      meta["digest"])

  def modality(self, modality: str, require_label: bool = True) -> list[LazyVolume]:
    """Every case of a modality, in `dataset.list_cases` order (as `dataset.load_modality`)."""
    return [self.volume(modality, case, require_label)
            for case in ds.list_cases(self.manifest, modality)]
