"""Datasets on disk: the manifest, NIfTI reading and writing, raw -> shared label mapping.

One folder per modality, nnU-Net style, plus a manifest that says how each modality's own label
values map onto the shared label set and how its intensities are to be normalised:

  <root>/dataset.json
  <root>/<modality>/imagesTr/<case>.nii.gz    3D image, any numeric dtype
  <root>/<modality>/labelsTr/<case>.nii.gz    3D integer labels, RAW values of that modality

A modality's optional `source_axis_flips` (e.g. [1]) records the voxel axes of its SOURCE files
whose affine direction the importer reversed (see `ModalitySpec`); the files in the dataset need
no correction.

Loading only reads: nothing is ever written into a dataset folder by this module's readers.
Every error is a `DatasetError` whose message names the offending file or manifest key.

Example (on the embedded phantom):

  python -c "from unpaired_seg.data import dataset, phantom; \
m = phantom.ensure('/tmp/phantom'); v = dataset.load_modality(m, 'ct')[0]; \
print(v.case, v.subject, v.image.shape, v.spacing, sorted(set(v.label.ravel())))"
"""

import dataclasses
import json
import os
import pathlib
import re
import uuid
from typing import Any

import nibabel as nib
import numpy as np
from absl import logging

from unpaired_seg.data import geometry

MANIFEST_NAME = "dataset.json"
IMAGES_DIR = "imagesTr"
LABELS_DIR = "labelsTr"

NORMALIZATION_SCHEMES = ("zscore", "minmax", "clip_zscore", "none")
UNMAPPED_POLICIES = ("error", "background")
FILE_ENDINGS = (".nii.gz", ".nii")

_TOP_KEYS_REQUIRED = ("name", "labels", "paired", "modalities")
_TOP_KEYS_OPTIONAL = ("description", "file_ending", "phantom")
_MODALITY_KEYS_REQUIRED = ("label_map", "normalization")
_MODALITY_KEYS_OPTIONAL = ("subjects", "unmapped", "source_axis_flips")
# Extra keys each normalisation scheme takes besides "scheme".
_SCHEME_KEYS = {"zscore": (), "minmax": (), "clip_zscore": ("window",), "none": ()}
_RAW_LABEL_KEY = re.compile(r"-?[0-9]+")
# Modality names become folder names: keep them to portable, non-hidden file names.
_MODALITY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
# Affines of an image and its label may differ by rounding in the writer, not by geometry.
_AFFINE_ATOL = 1e-4


class DatasetError(ValueError):
  """A dataset on disk or a manifest is not what the layout requires."""


@dataclasses.dataclass(frozen=True)
class ModalitySpec:
  """What the manifest says about one modality.

  Attributes:
    name: modality name, also its folder name under the dataset root.
    label_map: raw label value of this modality -> shared label value.
    normalization: {"scheme": ...} plus the scheme's settings ("window" for clip_zscore).
    subjects: case id -> subject id; cases not listed are their own subject.
    unmapped: what a raw label value outside `label_map` means: 'error' or 'background'.
    source_axis_flips: voxel axes (sorted, in 0..2) of this modality's SOURCE files whose affine
      direction `prepare` reversed (`geometry.reverse_axis_directions`) because it contradicted
      the anatomy; `predict` does the same to new files of the modality. The files in this
      dataset already have correct affines.
  """
  name: str
  label_map: dict[int, int]
  normalization: dict
  subjects: dict[str, str]
  unmapped: str
  source_axis_flips: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class Manifest:
  """A validated dataset.json.

  Attributes:
    root: the dataset folder.
    name: dataset name.
    description: free text.
    labels: shared label names; index = shared label value, index 0 is background.
    paired: whether the modalities show the same subjects.
    file_ending: ".nii.gz" or ".nii".
    modalities: modality name -> ModalitySpec, in manifest order.
    phantom: the generator settings of a dataset written by `phantom.generate`, else None.
  """
  root: pathlib.Path
  name: str
  description: str
  labels: tuple[str, ...]
  paired: bool
  file_ending: str
  modalities: dict[str, ModalitySpec]
  phantom: dict | None = None

  @property
  def num_classes(self) -> int:
    return len(self.labels)

  def subject_of(self, modality: str, case: str) -> str:
    """The subject id of a case; the case id itself when the manifest lists none."""
    return _modality_spec(self, modality).subjects.get(case, case)

  def to_dict(self) -> dict[str, Any]:
    """The manifest as the JSON object `write_manifest` writes and `load_manifest` reads."""
    out = {
        "name": self.name,
        "description": self.description,
        "labels": list(self.labels),
        "paired": self.paired,
        "file_ending": self.file_ending,
        "modalities": {
            name: {
                "label_map": {str(raw): shared for raw, shared in spec.label_map.items()},
                "normalization": json.loads(json.dumps(spec.normalization)),
                "subjects": dict(spec.subjects),
                "unmapped": spec.unmapped,
                # Written only when there are some: older manifests read back byte for byte.
                **({"source_axis_flips": list(spec.source_axis_flips)}
                   if spec.source_axis_flips else {}),
            } for name, spec in self.modalities.items()
        },
    }
    if self.phantom is not None:
      out["phantom"] = json.loads(json.dumps(self.phantom))
    return out


@dataclasses.dataclass
class Volume:
  """One case of one modality as loaded from disk.

  Attributes:
    modality: modality name.
    case: case id (file name without its ending).
    subject: subject id (see `Manifest.subject_of`).
    image: float32 [X, Y, Z] raw intensities, not normalised.
    label: uint8 [X, Y, Z] SHARED label values, or None when the label file is absent and allowed.
    affine: float64 [4, 4] voxel -> world (mm) of both image and label.
  """
  modality: str
  case: str
  subject: str
  image: np.ndarray
  label: np.ndarray | None
  affine: np.ndarray

  @property
  def spacing(self) -> tuple[float, float, float]:
    """Voxel size in mm along the three array axes (norms of the affine's columns)."""
    norms = np.linalg.norm(self.affine[:3, :3], axis=0)
    return tuple(float(n) for n in norms)


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


def _reject_duplicate_keys(where: pathlib.Path):
  """object_pairs_hook for json: a repeated key would otherwise silently keep the last value."""
  def hook(pairs):
    out = {}
    for key, value in pairs:
      if key in out:
        raise DatasetError(f"{where}: duplicate JSON key {key!r}")
      out[key] = value
    return out
  return hook


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _check_keys(where: str, obj, key: str, required, optional) -> None:
  """Checks that `obj` (manifest key `key`) is a JSON object with exactly the allowed keys."""
  if not isinstance(obj, dict):
    raise DatasetError(f"{where}: manifest key '{key}' must be a JSON object, got "
                       f"{type(obj).__name__}")
  prefix = f"{key}." if key else ""
  for name in required:
    if name not in obj:
      raise DatasetError(f"{where}: manifest key '{prefix}{name}' is missing")
  allowed = set(required) | set(optional)
  for name in obj:
    if name not in allowed:
      raise DatasetError(f"{where}: unknown manifest key '{prefix}{name}' (allowed: "
                         f"{', '.join(sorted(allowed))})")


def _parse_normalization(where: str, key: str, obj) -> dict:
  if not isinstance(obj, dict):
    raise DatasetError(f"{where}: manifest key '{key}' must be a JSON object like "
                       f"{{\"scheme\": \"zscore\"}}, got {type(obj).__name__}")
  if "scheme" not in obj:
    raise DatasetError(f"{where}: manifest key '{key}.scheme' is missing")
  scheme = obj["scheme"]
  if scheme not in NORMALIZATION_SCHEMES:
    raise DatasetError(f"{where}: manifest key '{key}.scheme' is {scheme!r}, expected one of "
                       f"{', '.join(NORMALIZATION_SCHEMES)}")
  _check_keys(where, obj, key, ("scheme",) + _SCHEME_KEYS[scheme], ())
  out = {"scheme": scheme}
  if scheme == "clip_zscore":
    window = obj["window"]
    if (not isinstance(window, (list, tuple)) or len(window) != 2
        or not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool)
                   for v in window)
        or not all(np.isfinite(v) for v in window) or not window[0] < window[1]):
      raise DatasetError(f"{where}: manifest key '{key}.window' must be [lo, hi] with finite "
                         f"numbers lo < hi, got {window!r}")
    out["window"] = [float(window[0]), float(window[1])]
  return out


def _parse_modality(where: str, name: str, obj, num_classes: int) -> ModalitySpec:
  key = f"modalities.{name}"
  if not isinstance(name, str) or not _MODALITY_NAME.fullmatch(name):
    raise DatasetError(f"{where}: manifest key '{key}': a modality name must be a plain folder "
                       "name (letters, digits, '_', '-', '.', not starting with '.')")
  _check_keys(where, obj, key, _MODALITY_KEYS_REQUIRED, _MODALITY_KEYS_OPTIONAL)

  raw_map = obj["label_map"]
  if not isinstance(raw_map, dict) or not raw_map:
    raise DatasetError(f"{where}: manifest key '{key}.label_map' must be a non-empty JSON object "
                       "raw value -> shared value")
  label_map = {}
  for raw, shared in raw_map.items():
    raw_str = str(raw)
    if not (_is_int(raw) or _RAW_LABEL_KEY.fullmatch(raw_str)):
      raise DatasetError(f"{where}: manifest key '{key}.label_map.{raw_str}': a raw label must be "
                         "an integer written as a string, e.g. \"6\"")
    raw_int = int(raw_str)
    if raw_int in label_map:
      raise DatasetError(f"{where}: manifest key '{key}.label_map.{raw_str}': raw label "
                         f"{raw_int} is listed twice")
    if not _is_int(shared) or not 0 <= shared < num_classes:
      raise DatasetError(f"{where}: manifest key '{key}.label_map.{raw_str}' maps to {shared!r}, "
                         f"which is not a shared label index 0..{num_classes - 1} of 'labels'")
    label_map[raw_int] = int(shared)

  normalization = _parse_normalization(where, f"{key}.normalization", obj["normalization"])

  subjects = obj.get("subjects", {})
  if not isinstance(subjects, dict) or not all(
      isinstance(c, str) and c and isinstance(s, str) and s for c, s in subjects.items()):
    raise DatasetError(f"{where}: manifest key '{key}.subjects' must map case ids to non-empty "
                       "subject id strings")

  unmapped = obj.get("unmapped", "error")
  if unmapped not in UNMAPPED_POLICIES:
    raise DatasetError(f"{where}: manifest key '{key}.unmapped' is {unmapped!r}, expected one of "
                       f"{', '.join(UNMAPPED_POLICIES)}")
  flips = obj.get("source_axis_flips", [])
  try:
    flips = geometry.check_axes(flips)
  except geometry.GeometryError:
    raise DatasetError(f"{where}: manifest key '{key}.source_axis_flips' must be a list of "
                       f"distinct voxel axes in 0..2 (e.g. [1]), got {flips!r}") from None
  return ModalitySpec(name=name, label_map=label_map, normalization=normalization,
                      subjects=dict(subjects), unmapped=unmapped, source_axis_flips=flips)


def _parse_manifest(root: pathlib.Path, where: str, obj) -> Manifest:
  """Validates a manifest object; `where` names its file in every error message."""
  _check_keys(where, obj, "", _TOP_KEYS_REQUIRED, _TOP_KEYS_OPTIONAL)

  name = obj["name"]
  if not isinstance(name, str) or not name:
    raise DatasetError(f"{where}: manifest key 'name' must be a non-empty string")
  description = obj.get("description", "")
  if not isinstance(description, str):
    raise DatasetError(f"{where}: manifest key 'description' must be a string")

  labels = obj["labels"]
  if (not isinstance(labels, (list, tuple)) or len(labels) < 2
      or not all(isinstance(n, str) and n for n in labels)):
    raise DatasetError(f"{where}: manifest key 'labels' must be a list of at least two label "
                       "names, index 0 being background")
  if len(set(labels)) != len(labels):
    raise DatasetError(f"{where}: manifest key 'labels' repeats a name: {list(labels)}")
  if len(labels) > 256:
    raise DatasetError(f"{where}: manifest key 'labels' has {len(labels)} names; shared labels "
                       "are stored as uint8 (at most 256)")

  paired = obj["paired"]
  if not isinstance(paired, bool):
    raise DatasetError(f"{where}: manifest key 'paired' must be true or false, got {paired!r}")

  file_ending = obj.get("file_ending", ".nii.gz")
  if file_ending not in FILE_ENDINGS:
    raise DatasetError(f"{where}: manifest key 'file_ending' is {file_ending!r}, expected one of "
                       f"{', '.join(FILE_ENDINGS)}")

  modalities_obj = obj["modalities"]
  if not isinstance(modalities_obj, dict) or not modalities_obj:
    raise DatasetError(f"{where}: manifest key 'modalities' must be a non-empty JSON object")
  modalities = {m: _parse_modality(where, m, spec, len(labels))
                for m, spec in modalities_obj.items()}

  phantom = obj.get("phantom")
  if phantom is not None and not isinstance(phantom, dict):
    raise DatasetError(f"{where}: manifest key 'phantom' must be a JSON object")

  return Manifest(root=root, name=name, description=description, labels=tuple(labels),
                  paired=paired, file_ending=file_ending, modalities=modalities,
                  phantom=None if phantom is None else dict(phantom))


def load_manifest(root) -> Manifest:
  """Reads and validates `<root>/dataset.json` and checks that each modality's imagesTr exists.

  Args:
    root: the dataset folder.

  Returns:
    The validated Manifest.

  Raises:
    DatasetError: naming the file or manifest key at fault.
  """
  root = pathlib.Path(root)
  path = root / MANIFEST_NAME
  if not root.is_dir():
    raise DatasetError(f"{root}: dataset folder not found")
  if not path.is_file():
    raise DatasetError(f"{path}: manifest not found (every dataset folder needs a "
                       f"{MANIFEST_NAME})")
  try:
    text = path.read_text(encoding="utf-8")
    obj = json.loads(text, object_pairs_hook=_reject_duplicate_keys(path))
  except json.JSONDecodeError as e:
    raise DatasetError(f"{path}: malformed JSON at line {e.lineno} column {e.colno}: "
                       f"{e.msg}") from e
  except (UnicodeDecodeError, OSError) as e:
    raise DatasetError(f"{path}: cannot read the manifest: {e}") from e
  manifest = _parse_manifest(root, str(path), obj)
  for modality in manifest.modalities:
    _images_dir(manifest, modality)
  return manifest


def _atomic_write_bytes(path: pathlib.Path, data: bytes) -> None:
  tmp = _temp_name(path)
  try:
    tmp.write_bytes(data)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def write_manifest(root, manifest_dict: dict) -> None:
  """Validates a manifest object and writes it atomically as `<root>/dataset.json`.

  What is written is the validated, canonical form (every optional key spelled out), so that
  `load_manifest` reads back exactly what was meant.

  Args:
    root: the dataset folder; created when missing.
    manifest_dict: the manifest as a JSON-ready dict (see the module docstring).

  Raises:
    DatasetError: naming the manifest key at fault; nothing is written then.
  """
  root = pathlib.Path(root)
  path = root / MANIFEST_NAME
  manifest = _parse_manifest(root, f"{path} (to be written)", manifest_dict)
  try:
    text = json.dumps(manifest.to_dict(), indent=2, allow_nan=False) + "\n"
  except (TypeError, ValueError) as e:
    raise DatasetError(f"{path} (to be written): manifest is not plain JSON: {e}") from e
  root.mkdir(parents=True, exist_ok=True)
  _atomic_write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Cases and volumes
# ---------------------------------------------------------------------------------------------


def _modality_spec(manifest: Manifest, modality: str) -> ModalitySpec:
  try:
    return manifest.modalities[modality]
  except (KeyError, TypeError):
    raise DatasetError(
        f"{manifest.root / MANIFEST_NAME}: no manifest key 'modalities.{modality}' (modalities: "
        f"{', '.join(manifest.modalities)})") from None


def _images_dir(manifest: Manifest, modality: str) -> pathlib.Path:
  _modality_spec(manifest, modality)
  folder = manifest.root / modality
  if not folder.is_dir():
    raise DatasetError(f"{folder}: modality folder of 'modalities.{modality}' not found")
  images = folder / IMAGES_DIR
  if not images.is_dir():
    raise DatasetError(f"{images}: {IMAGES_DIR} folder of modality {modality!r} not found")
  return images


def list_cases(manifest: Manifest, modality: str) -> list[str]:
  """Sorted case ids of a modality: the image file names in imagesTr without their ending.

  Hidden files (a leading '.', e.g. another writer's temporary file) are not cases.
  """
  images = _images_dir(manifest, modality)
  ending = manifest.file_ending
  cases = sorted(p.name[:-len(ending)] for p in images.iterdir()
                 if p.name.endswith(ending) and not p.name.startswith(".")
                 and len(p.name) > len(ending) and p.is_file())
  if not cases:
    raise DatasetError(f"{images}: no '*{ending}' images for modality {modality!r}")
  # A label without its image is a case whose image went missing: never drop it silently.
  labels, known = manifest.root / modality / LABELS_DIR, set(cases)
  if labels.is_dir():
    orphans = sorted(p.name for p in labels.iterdir()
                     if p.name.endswith(ending) and not p.name.startswith(".")
                     and p.name[:-len(ending)] not in known)
    if orphans:
      raise DatasetError(f"{images / orphans[0]}: image not found, but its label "
                         f"{labels / orphans[0]} is there ({len(orphans)} such case(s) of "
                         f"modality {modality!r})")
  return cases


def _read_nifti(path: pathlib.Path):
  """Returns (array as stored, affine float64 [4, 4]) of a 3D NIfTI file."""
  try:
    img = nib.load(str(path))
    data = np.asarray(img.dataobj)
    affine = np.asarray(img.affine, dtype=np.float64)
  except Exception as e:  # nibabel raises many types (ImageFileError, gzip/zlib, EOF, OSError).
    raise DatasetError(f"{path}: cannot read NIfTI: {type(e).__name__}: {e}") from e
  if data.ndim != 3:
    raise DatasetError(f"{path}: expected a 3D volume, got shape {data.shape}")
  if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.floating)
          or data.dtype == np.bool_):
    raise DatasetError(f"{path}: unsupported voxel type {data.dtype}")
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)) \
      or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
    raise DatasetError(f"{path}: the affine is not a finite, invertible 4x4 matrix:\n{affine}")
  return data, affine


def map_labels(raw: np.ndarray, spec: ModalitySpec, path) -> np.ndarray:
  """Maps a modality's raw label values onto the shared labels.

  Args:
    raw: integer (or integral float) label array of any shape, RAW values of `spec`'s modality.
    spec: the modality's manifest entry.
    path: the file the labels came from, named in errors.

  Returns:
    uint8 array of the same shape with shared label values.

  Raises:
    DatasetError: a value is not an integer, or is not in the label_map while
      `spec.unmapped == 'error'`.
  """
  raw = np.asarray(raw)
  if raw.dtype == np.bool_:
    raw = raw.astype(np.uint8)
  if np.issubdtype(raw.dtype, np.floating):
    if not np.all(np.isfinite(raw)) or not np.all(raw == np.round(raw)):
      raise DatasetError(f"{path}: label values must be integers (got non-integral "
                         f"{raw.dtype} values)")
    raw = raw.astype(np.int64)
  elif not np.issubdtype(raw.dtype, np.integer):
    raise DatasetError(f"{path}: label values must be integers, got dtype {raw.dtype}")
  if raw.size == 0:
    return np.zeros(raw.shape, np.uint8)

  lo, hi = int(raw.min()), int(raw.max())
  fill = 0 if spec.unmapped == "background" else -1
  if lo >= 0 and hi < 1 << 16:
    # Lookup table: one pass over the voxels, no sort (CT volumes have ~10^7 of them).
    lut = np.full(hi + 1, fill, np.int16)
    for value, shared in spec.label_map.items():
      if 0 <= value <= hi:
        lut[value] = shared
    shared = lut[raw]
  else:
    values, inverse = np.unique(raw, return_inverse=True)
    targets = np.array([spec.label_map.get(int(v), fill) for v in values], np.int16)
    shared = targets[inverse].reshape(raw.shape)
  if fill < 0:
    bad = shared < 0
    if bad.any():
      unknown = np.unique(raw[bad])
      shown = ", ".join(str(int(v)) for v in unknown[:10]) + (" ..." if unknown.size > 10 else "")
      raise DatasetError(
          f"{path}: label value(s) {shown} of modality {spec.name!r} are not keys of manifest key "
          f"'modalities.{spec.name}.label_map' (set \"unmapped\": \"background\" there to treat "
          "them as background)")
  return shared.astype(np.uint8)


def load_volume(manifest: Manifest, modality: str, case: str,
                require_label: bool = True) -> Volume:
  """Loads one case: image (raw intensities), shared labels and affine.

  Args:
    manifest: the dataset's manifest.
    modality: a modality of the manifest.
    case: a case id of that modality (see `list_cases`).
    require_label: if False a missing label file gives `label=None` instead of an error.

  Returns:
    The Volume.

  Raises:
    DatasetError: naming the file at fault (missing, unreadable, not 3D, NaN/inf in the image,
      label shape or affine different from the image's, label value not in the manifest).
  """
  spec = _modality_spec(manifest, modality)
  images = _images_dir(manifest, modality)
  image_path = images / f"{case}{manifest.file_ending}"
  if not image_path.is_file():
    raise DatasetError(f"{image_path}: image of case {case!r} not found")
  image, affine = _read_nifti(image_path)
  image = image.astype(np.float32)
  if not np.all(np.isfinite(image)):
    raise DatasetError(f"{image_path}: image holds {int(np.sum(~np.isfinite(image)))} NaN or "
                       "inf voxel(s)")

  label = None
  label_path = manifest.root / modality / LABELS_DIR / f"{case}{manifest.file_ending}"
  if label_path.is_file():
    raw, label_affine = _read_nifti(label_path)
    if raw.shape != image.shape:
      raise DatasetError(f"{label_path}: label shape {raw.shape} differs from image shape "
                         f"{image.shape} of {image_path}")
    if not np.allclose(label_affine, affine, atol=_AFFINE_ATOL):
      raise DatasetError(f"{label_path}: label affine differs from the affine of {image_path}:\n"
                         f"{label_affine}\nvs\n{affine}")
    label = map_labels(raw, spec, label_path)
    if not label.any():   # legal (a subject without the organs), but usually a broken export
      logging.warning("%s: the label of case %r holds background only", label_path, case)
  elif require_label:
    raise DatasetError(f"{label_path}: label file of case {case!r} not found")

  return Volume(modality=modality, case=case, subject=manifest.subject_of(modality, case),
                image=image, label=label, affine=affine)


def load_modality(manifest: Manifest, modality: str, require_label: bool = True) -> list[Volume]:
  """Loads every case of a modality, in `list_cases` order."""
  return [load_volume(manifest, modality, case, require_label=require_label)
          for case in list_cases(manifest, modality)]


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _temp_name(path: pathlib.Path) -> pathlib.Path:
  """A hidden sibling of `path` with the same ending (nibabel picks gzip from the ending)."""
  ending = next((e for e in FILE_ENDINGS if path.name.endswith(e)), path.suffix)
  return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp{ending}")


def save_nifti(path, array: np.ndarray, affine: np.ndarray) -> None:
  """Writes an array as NIfTI atomically (temporary file in the same folder, then os.replace).

  A reader never sees a half-written file, even if the writer is interrupted; there is no fsync
  (it cost more than all the phantom's arithmetic), so a power cut may still lose the file.

  The voxel type on disk is the array's dtype (bool is written as uint8); no intensity scaling.

  Args:
    path: destination ending in .nii.gz or .nii; missing parent folders are created.
    array: numeric array, typically [X, Y, Z].
    affine: [4, 4] voxel -> world (mm).

  Raises:
    DatasetError: naming `path` for a bad ending, dtype or affine.
  """
  path = pathlib.Path(path)
  if not path.name.endswith(FILE_ENDINGS):
    raise DatasetError(f"{path}: a NIfTI file name must end with one of "
                       f"{', '.join(FILE_ENDINGS)}")
  array = np.asarray(array)
  if array.dtype == np.bool_:
    array = array.astype(np.uint8)
  if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
    raise DatasetError(f"{path}: cannot write voxels of dtype {array.dtype}")
  if array.ndim < 3:
    raise DatasetError(f"{path}: expected at least a 3D array, got shape {array.shape}")
  affine = np.asarray(affine, dtype=np.float64)
  if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
    raise DatasetError(f"{path}: argument 'affine' must be a finite [4, 4] matrix, got shape "
                       f"{affine.shape}")

  img = nib.Nifti1Image(array, affine, dtype=array.dtype)
  img.header.set_xyzt_units("mm")
  # Scanner-anatomical codes: the affine is the real geometry, not an alignment to a template.
  img.set_qform(affine, code=1)
  img.set_sform(affine, code=1)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = _temp_name(path)
  try:
    nib.save(img, str(tmp))
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
