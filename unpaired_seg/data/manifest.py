"""The dataset manifest (`<root>/dataset.json`): its schema, validation, reading and writing.

The manifest says how each modality's own label values map onto the shared label set and how its
intensities are to be normalised (see `dataset` for the folder layout). Every error is a
`DatasetError` whose message names the manifest file or key at fault.
"""

import dataclasses
import json
import os
import pathlib
import re
import uuid
from typing import Any

import numpy as np

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


# ---------------------------------------------------------------------------------------------
# Parsing, reading and writing
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
# Lookups
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


def _temp_name(path: pathlib.Path) -> pathlib.Path:
  """A hidden sibling of `path` with the same ending (nibabel picks gzip from the ending)."""
  ending = next((e for e in FILE_ENDINGS if path.name.endswith(e)), path.suffix)
  return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp{ending}")
