"""Real data into the project's dataset layout: check, reorient, resample in-plane, write.

Every case is reoriented to canonical RAS (slices along the last axis) and resampled in-plane to
`--spacing` (the slice axis is kept; images linearly, labels by nearest neighbour, see
`geometry`). Label files keep their RAW values; the manifest's label_map maps them onto the
shared labels at load time. Beside each case, `<out>/geometry/<modality>/<case>.json` holds its
`GeometryRecord`, source files and `source_axis_flips`, so that predictions go back onto the
source grid (`geometry.to_source_grid`, then write with the source file's header; the record's
`source_affine` is that file's affine after any direction correction).

The abdominal CT/MR set (CHAOS T2-SPIR MR + BTCV CT, see the data folder's README). The BTCV CT
affines reverse the front-to-back direction: in every case they put the stomach, pancreas and
gallbladder behind the kidneys (and in most the kidneys in front of the body's centre), while
left-right and head-feet agree with the anatomy. Their voxel axis 1 is therefore read with its direction
reversed (`geometry.reverse_axis_directions`; the voxels are not touched, so the way back still
lands on the source file's grid); the manifest's `source_axis_flips` of `ct` and each case's
geometry JSON say so, and `predict` applies the same correction to new CT files of a run.

  python -m unpaired_seg.data.prepare --source=abdomen_ctmr \
      --input=/work/shared/data/abdomen_ctmr --output=/tmp/abdomen_ctmr_1.5 --spacing=1.5,1.5

An nnU-Net-style folder per modality (`imagesTr/<case>_0000.nii.gz` or `imagesTr/<case>.nii.gz`,
`labelsTr/<case>.nii.gz`); `--modality` repeats, and the i-th `--label_map` (and the i-th
`--normalization`, or a single one for all) belongs to the i-th `--modality`:

  python -m unpaired_seg.data.prepare --source=folder --input=/data/raw --output=/data/liver \
      --labels=background,liver,spleen \
      --modality=ct --label_map=0:0,6:1,1:2,*:0 --normalization=clip_zscore:-200:300 \
      --modality=mr=/data/chaos_t2 --label_map=0:0,1:1,4:2 --normalization=zscore

  --modality=NAME reads <input>/NAME; --modality=NAME=DIR reads DIR (relative to --input).
  --label_map=RAW:SHARED,...: every raw label value of that modality and its shared value (an
    index into --labels); a final `*:0` sends every other raw value to background (manifest
    "unmapped": "background"); without it an unlisted value is an error.
  --normalization=zscore | minmax | none | clip_zscore:LO:HI (default zscore).
  --paired: the modalities show the same subjects, matched by case id. Without it, a case id that
    occurs in more than one modality gets the subject id `<modality>_<case>` in the manifest, so
    that the split code never mistakes two people for one.

Checking only (reads everything, writes nothing, exit status 1 when a problem is found):

  python -m unpaired_seg.data.prepare --source=abdomen_ctmr --input=... --check
  python -m unpaired_seg.data.prepare --source=dataset --input=/tmp/abdomen_ctmr_1.5 --check

The check covers shapes and affines (image vs label), spacings (finite, slices along the last
canonical axis), label values against the label map, NaN/inf in images, missing or orphan files;
every problem names its file, and all problems are reported together. Preparing runs the same
check: on any problem nothing is left on disk (the dataset is built in a hidden folder beside
`--output` and renamed at the end). `--output` must not be, or lie inside, an input folder, and
must be absent or an empty folder. `--limit=N` takes the first N cases of each modality.
"""

import dataclasses
import json
import math
import os
import pathlib
import re
import shutil
import time
import uuid
from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np
from absl import app
from absl import flags
from absl import logging

from unpaired_seg.data import dataset as ds
from unpaired_seg.data import geometry

ABDOMEN_LABELS = ("background", "liver", "right_kidney", "left_kidney", "spleen")
# CHAOS MR labels are already the shared values; BTCV CT numbers 13 organs: 6 liver, 2 right
# kidney, 3 left kidney, 1 spleen; the others (stomach, aorta, ...) are background here.
ABDOMEN_MR_LABEL_MAP = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4}
ABDOMEN_CT_LABEL_MAP = {0: 0, 6: 1, 2: 2, 3: 3, 1: 4}
# Case ids carry the source data set: CHAOS and BTCV subject numbers overlap but are other people.
# The last entry: voxel axes whose affine direction contradicts the anatomy (module docstring);
# for BTCV CT axis 1, the anterior-posterior one.
_ABDOMEN_SOURCES = (("mr", "chaos", ABDOMEN_MR_LABEL_MAP, "error", ()),
                    ("ct", "btcv", ABDOMEN_CT_LABEL_MAP, "background", (1,)))
_ABDOMEN_FILE = re.compile(r"(image|label)_([0-9]+)\.nii(\.gz)?")

GEOMETRY_DIR = "geometry"
OUTPUT_ENDING = ".nii.gz"
# nnU-Net's channel suffix: <case>_0000.nii.gz is channel 0 of <case>.
_CHANNEL = re.compile(r"(.+)_([0-9]{4})")
# A slice axis must be the thickest: an in-plane spacing this much larger than the through-plane
# one means the volume is not axial (or not canonical) and slicing along Z would be wrong.
_SLICE_AXIS_RATIO = 1.5
# Affines of an image and its label may differ by rounding in a writer, not by geometry.
_AFFINE_ATOL = 1e-4
# Prepared in-plane spacings equal the target up to float32 storage in the NIfTI header.
_SPACING_RTOL = 1e-5


class PrepareError(ds.DatasetError):
  """Preparation refused or failed; the message lists every problem with its file."""


@dataclasses.dataclass(frozen=True)
class SourceCase:
  """One case to import: where its files are and the case id it gets in the output.

  `axis_flips`: voxel axes whose affine direction is reversed before reorientation
  (`geometry.reverse_axis_directions`), the modality's manifest `source_axis_flips`.
  """
  modality: str
  case: str
  image: pathlib.Path
  label: pathlib.Path
  axis_flips: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class FolderModality:
  """One modality of the generic importer.

  Attributes:
    name: modality name (the output folder name).
    folder: nnU-Net-style folder with imagesTr/ and labelsTr/.
    label_map: raw label value -> shared label value.
    unmapped: 'error' or 'background' for raw values not in `label_map`.
    normalization: the manifest's normalisation block, e.g. {"scheme": "zscore"}.
  """
  name: str
  folder: pathlib.Path
  label_map: Mapping[int, int]
  unmapped: str = "error"
  normalization: Mapping = dataclasses.field(default_factory=lambda: {"scheme": "zscore"})


@dataclasses.dataclass
class _Plan:
  """What an import would write: the manifest, the cases, the problems found while listing."""
  inputs: list[pathlib.Path]
  manifest: dict
  cases: list[SourceCase]
  problems: list[str]


# ---------------------------------------------------------------------------------------------
# Parsing command-line specs.
# ---------------------------------------------------------------------------------------------


def parse_spacing(text: str | None) -> tuple[float, float] | None:
  """'1.5,1.5' -> (1.5, 1.5); '' or None -> None (keep the grid); one value means both axes."""
  if text is None or not str(text).strip():
    return None
  try:
    values = tuple(float(v) for v in str(text).split(","))
  except ValueError:
    values = ()
  if len(values) == 1:
    values = values * 2
  if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
    raise PrepareError(f"--spacing={text!r}: expected two positive in-plane spacings in mm, "
                       "e.g. 1.5,1.5 (or empty to keep the source grid)")
  return values


def _check_spacing(spacing) -> tuple[float, float] | None:
  if spacing is None:
    return None
  if isinstance(spacing, str):
    return parse_spacing(spacing)
  try:
    values = tuple(float(v) for v in spacing)
  except (TypeError, ValueError):
    values = ()
  if len(values) != 2 or not all(math.isfinite(v) and v > 0 for v in values):
    raise PrepareError(f"argument 'spacing' must be two positive in-plane spacings in mm or "
                       f"None, got {spacing!r}")
  return values


def parse_label_map(text: str) -> tuple[dict[int, int], str]:
  """'0:0,6:1,2:2,*:0' -> ({0: 0, 6: 1, 2: 2}, 'background'); without '*:0' unmapped is 'error'."""
  label_map, unmapped = {}, "error"
  for item in str(text).split(","):
    item = item.strip()
    raw, sep, shared = item.partition(":")
    if raw.strip() == "*" and shared.strip() == "0":
      unmapped = "background"
      continue
    if not sep or not re.fullmatch(r"-?[0-9]+", raw.strip()) \
        or not re.fullmatch(r"[0-9]+", shared.strip()):
      raise PrepareError(f"--label_map={text!r}: item {item!r} is not RAW:SHARED with integers "
                         "(or '*:0' for 'everything else is background')")
    if int(raw) in label_map:
      raise PrepareError(f"--label_map={text!r}: raw value {int(raw)} is listed twice")
    label_map[int(raw)] = int(shared)
  if not label_map:
    raise PrepareError(f"--label_map={text!r}: no RAW:SHARED pair")
  return label_map, unmapped


def parse_normalization(text: str) -> dict:
  """'zscore' | 'minmax' | 'none' | 'clip_zscore:LO:HI' -> the manifest's normalisation block."""
  parts = str(text).strip().split(":")
  scheme = parts[0]
  if scheme in ("zscore", "minmax", "none") and len(parts) == 1:
    return {"scheme": scheme}
  if scheme == "clip_zscore" and len(parts) == 3:
    try:
      lo, hi = float(parts[1]), float(parts[2])
    except ValueError:
      lo, hi = math.nan, math.nan
    if math.isfinite(lo) and math.isfinite(hi) and lo < hi:
      return {"scheme": "clip_zscore", "window": [lo, hi]}
  raise PrepareError(f"--normalization={text!r}: expected zscore, minmax, none or "
                     "clip_zscore:LO:HI with numbers LO < HI")


# ---------------------------------------------------------------------------------------------
# Listing the sources.
# ---------------------------------------------------------------------------------------------


def _spacing_note(spacing) -> str:
  return "spacing kept" if spacing is None else f"resampled to {spacing[0]:g} x {spacing[1]:g} mm"


def _is_nifti(path: pathlib.Path) -> bool:
  return path.is_file() and not path.name.startswith(".") and path.name.endswith(ds.FILE_ENDINGS)


def _strip_ending(name: str) -> str:
  for ending in ds.FILE_ENDINGS:
    if name.endswith(ending):
      return name[:-len(ending)]
  return name


def _abdomen_plan(input_dir, limit: int | None, spacing) -> _Plan:
  root = pathlib.Path(input_dir)
  problems, cases, modalities = [], [], {}
  for modality, prefix, label_map, unmapped, flips in _ABDOMEN_SOURCES:
    modalities[modality] = {"label_map": {str(k): v for k, v in label_map.items()},
                            "normalization": {"scheme": "zscore"}, "unmapped": unmapped,
                            "source_axis_flips": list(flips)}
    folder = root / modality
    if not folder.is_dir():
      problems.append(f"{folder}: folder of modality {modality!r} not found")
      continue
    images, labels = {}, {}
    for path in sorted(folder.iterdir()):
      match = _ABDOMEN_FILE.fullmatch(path.name)
      if match and path.is_file():
        (images if match.group(1) == "image" else labels)[int(match.group(2))] = path
    for subject in sorted(set(labels) - set(images)):
      problems.append(f"{labels[subject]}: label without an image (image_{subject}.nii.gz)")
    ids = sorted(images)
    if not ids:
      problems.append(f"{folder}: no image_<id>.nii.gz files")
    for subject in ids[:limit]:
      if subject not in labels:
        problems.append(f"{images[subject]}: image without a label (label_{subject}.nii.gz)")
        continue
      cases.append(SourceCase(modality, f"{prefix}_{subject:02d}", images[subject],
                              labels[subject], tuple(flips)))
  spacing_note = _spacing_note(spacing)
  manifest = {
      "name": "abdomen_ctmr",
      "description": (
          "Unpaired abdominal MR and CT of different people: CHAOS T2-SPIR MR (case ids chaos_*) "
          "and BTCV contrast CT (btcv_*). Reoriented to RAS, slices along the last axis, in-plane "
          f"{spacing_note}. MR: raw scanner intensities. CT: uint8 images already windowed to soft "
          "tissue (not Hounsfield units), so both modalities are z-scored per volume. CT labels "
          "keep BTCV's 13 organ values; those not shared with MR map to background. The BTCV "
          "affines contradict the anatomy front-to-back (stomach and pancreas behind the "
          "kidneys), so CT voxel axis 1 was read with its affine direction reversed "
          "(source_axis_flips [1]); the voxels are as stored in the source files."),
      "labels": list(ABDOMEN_LABELS),
      "paired": False,
      "file_ending": OUTPUT_ENDING,
      "modalities": modalities,
  }
  return _Plan([root], manifest, cases, problems)


def _folder_cases(spec: FolderModality, limit: int | None, problems: list[str]) -> list[SourceCase]:
  images_dir = pathlib.Path(spec.folder) / ds.IMAGES_DIR
  labels_dir = pathlib.Path(spec.folder) / ds.LABELS_DIR
  if not images_dir.is_dir():
    problems.append(f"{images_dir}: imagesTr folder of modality {spec.name!r} not found")
    return []
  images: dict[str, pathlib.Path] = {}
  for path in sorted(p for p in images_dir.iterdir() if _is_nifti(p)):
    stem = _strip_ending(path.name)
    match = _CHANNEL.fullmatch(stem)
    case = match.group(1) if match else stem
    if match and match.group(2) != "0000":
      problems.append(f"{path}: channel {match.group(2)}; one channel per modality is supported "
                      "(give each channel its own --modality folder)")
      continue
    if case in images:
      problems.append(f"{path}: case {case!r} already has the image {images[case]}")
      continue
    images[case] = path
  labels: dict[str, pathlib.Path] = {}
  if labels_dir.is_dir():
    for path in sorted(p for p in labels_dir.iterdir() if _is_nifti(p)):
      case = _strip_ending(path.name)
      if case in labels:
        problems.append(f"{path}: case {case!r} already has the label {labels[case]}")
        continue
      labels[case] = path
  for case in sorted(set(labels) - set(images)):
    problems.append(f"{labels[case]}: label without an image in {images_dir}")
  if not images:
    problems.append(f"{images_dir}: no NIfTI images for modality {spec.name!r}")
  cases = []
  for case in sorted(images)[:limit]:
    if case not in labels:
      problems.append(f"{images[case]}: image without a label {labels_dir / case}.nii.gz")
      continue
    cases.append(SourceCase(spec.name, case, images[case], labels[case]))
  return cases


def _folder_plan(modalities: Sequence[FolderModality], labels: Sequence[str], *, name: str,
                 paired: bool, limit: int | None, spacing) -> _Plan:
  if not modalities:
    raise PrepareError("argument 'modalities' (--modality): at least one modality is needed")
  names = [m.name for m in modalities]
  if len(set(names)) != len(names):
    raise PrepareError(f"argument 'modalities' (--modality): a modality is named twice: {names}")
  problems, cases = [], []
  per_modality = {}
  for spec in modalities:
    per_modality[spec.name] = _folder_cases(spec, limit, problems)
    cases.extend(per_modality[spec.name])
  description = (f"Imported from {', '.join(str(m.folder) for m in modalities)}. Reoriented to "
                 "RAS, slices along the last axis, in-plane " +
                 (_spacing_note(spacing)) + ". Label files keep each modality's raw values.")
  manifest = {"name": name, "description": description, "labels": list(labels), "paired": paired,
              "file_ending": OUTPUT_ENDING, "modalities": {}}
  for spec in modalities:
    entry = {"label_map": {str(k): int(v) for k, v in spec.label_map.items()},
             "normalization": dict(spec.normalization), "unmapped": spec.unmapped}
    if not paired:
      others = {c.case for m, cs in per_modality.items() if m != spec.name for c in cs}
      clashes = {c.case: f"{spec.name}_{c.case}" for c in per_modality[spec.name]
                 if c.case in others}
      if clashes:
        entry["subjects"] = clashes
    manifest["modalities"][spec.name] = entry
  sources = [pathlib.Path(m.folder) for m in modalities]
  return _Plan(sources, manifest, cases, problems)


# ---------------------------------------------------------------------------------------------
# Checking one case.
# ---------------------------------------------------------------------------------------------


def _spacing_problem(path, affine) -> str | None:
  """A problem when the canonical slice axis (the last) is not the thickest one."""
  _, canonical_affine, _ = geometry.to_canonical(np.zeros((1, 1, 1), np.uint8), affine)
  sx, sy, sz = geometry.spacing_of(canonical_affine)
  if max(sx, sy) > _SLICE_AXIS_RATIO * sz:
    return (f"{path}: spacing {sx:.3g} x {sy:.3g} x {sz:.3g} mm after reorientation to RAS: an "
            "in-plane axis is thicker than the slice axis (not an axial volume?); slices are "
            "taken along the last (superior-inferior) axis")
  return None


def _check_case(image_path: pathlib.Path, label_path: pathlib.Path | None,
                spec: ds.ModalitySpec, problems: list[str]):
  """Reads and checks one image/label pair, appending its problems.

  Returns:
    (image, label, affine) as stored when the pair has no problem, else None.
  """
  count = len(problems)
  try:
    image, affine = ds._read_nifti(image_path)  # noqa: SLF001  (the dataset layer's reader)
  except ds.DatasetError as e:
    problems.append(str(e))
    image, affine = None, None
  if image is not None:
    if image.dtype != np.bool_ and np.issubdtype(image.dtype, np.floating):
      bad = int(np.count_nonzero(~np.isfinite(image)))
      if bad:
        problems.append(f"{image_path}: image holds {bad} NaN or inf voxel(s)")
    spacing_problem = _spacing_problem(image_path, affine)
    if spacing_problem:
      problems.append(spacing_problem)
  if label_path is None:
    return None
  try:
    label, label_affine = ds._read_nifti(label_path)  # noqa: SLF001
  except ds.DatasetError as e:
    problems.append(str(e))
    return None
  try:
    ds.map_labels(label, spec, label_path)
  except ds.DatasetError as e:
    problems.append(str(e))
  if np.issubdtype(label.dtype, np.signedinteger) and label.size and label.min() < 0:
    problems.append(f"{label_path}: negative label value {int(label.min())}")
  if image is None:
    return None
  if label.shape != image.shape:
    problems.append(f"{label_path}: label shape {label.shape} differs from image shape "
                    f"{image.shape} of {image_path}")
  elif not np.allclose(label_affine, affine, atol=_AFFINE_ATOL):
    worst = float(np.max(np.abs(label_affine - affine)))
    problems.append(f"{label_path}: label affine differs from the affine of {image_path} (by up "
                    f"to {worst:.4g}; label {np.round(label_affine, 4).tolist()})")
  if len(problems) > count:
    return None
  return image, label, affine


def _modality_spec(manifest: dict, modality: str) -> ds.ModalitySpec:
  entry = manifest["modalities"][modality]
  return ds.ModalitySpec(name=modality,
                         label_map={int(k): int(v) for k, v in entry["label_map"].items()},
                         normalization=dict(entry["normalization"]), subjects={},
                         unmapped=entry.get("unmapped", "error"))


# ---------------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------------


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


def _write_case(tmp_root: pathlib.Path, source: SourceCase, image, label, affine,
                spacing) -> None:
  # The record's source_affine is the corrected one: it and the model grid agree in world space.
  affine = geometry.reverse_axis_directions(affine, image.shape, source.axis_flips)
  model_image, model_label, model_affine, record = geometry.to_model_grid(image, label, affine,
                                                                          spacing)
  folder = tmp_root / source.modality
  ds.save_nifti(folder / ds.IMAGES_DIR / f"{source.case}{OUTPUT_ENDING}",
                _stored_image(model_image, image.dtype), model_affine)
  ds.save_nifti(folder / ds.LABELS_DIR / f"{source.case}{OUTPUT_ENDING}",
                _stored_label(model_label), model_affine)
  info = {
      "modality": source.modality,
      "case": source.case,
      "source_image": str(source.image.resolve()),
      "source_label": str(source.label.resolve()),
      "target_spacing": None if spacing is None else list(spacing),
      "source_axis_flips": list(source.axis_flips),
      "geometry": record.to_dict(),
  }
  path = geometry_path(tmp_root, source.modality, source.case)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(info, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _check_output(output, inputs: Sequence[pathlib.Path]) -> pathlib.Path:
  """Refuses an output that is an input, lies inside one, or already holds something."""
  if output is None or not str(output).strip():
    raise PrepareError("argument 'output' (--output): a new dataset folder is required")
  out = pathlib.Path(output).expanduser().resolve()
  for source in inputs:
    src = pathlib.Path(source).expanduser().resolve()
    if out == src or out.is_relative_to(src):
      raise PrepareError(f"{out}: --output must not be or lie inside the input folder {src}; "
                         "nothing is ever written into the source data")
    if src.is_relative_to(out):
      raise PrepareError(f"{out}: --output must not contain the input folder {src}")
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise PrepareError(f"{out}: --output exists and is not an empty folder; refusing to "
                       "overwrite it")
  return out


def _run(plan: _Plan, output: pathlib.Path | None, spacing) -> list[str]:
  """Checks every case and, when `output` is given and nothing is wrong, writes the dataset.

  The dataset is built in a hidden folder beside `output` and renamed at the end, so `output`
  appears complete or not at all. Returns the problems found (nothing written when any).
  """
  problems = list(plan.problems)
  if not plan.cases and not problems:
    problems.append(f"{', '.join(str(p) for p in plan.inputs)}: no cases found")
  try:
    # Validate the manifest before reading any volume: a bad label map fails in a second.
    ds._parse_manifest(pathlib.Path("."), "manifest to be written", plan.manifest)  # noqa: SLF001
  except ds.DatasetError as e:
    return problems + [str(e)]
  specs = {m: _modality_spec(plan.manifest, m) for m in plan.manifest["modalities"]}

  tmp, created = None, []
  if output is not None:
    created = [p for p in reversed(output.parents) if not p.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
  try:
    start = time.monotonic()
    for i, source in enumerate(plan.cases):
      arrays = _check_case(source.image, source.label, specs[source.modality], problems)
      # After the first problem only checking goes on: all problems are reported at once.
      if tmp is not None and arrays is not None and not problems:
        _write_case(tmp, source, *arrays, spacing)
      logging.info("%s %d/%d %s/%s (%.1f s)", "prepared" if tmp is not None and not problems
                   else "checked", i + 1, len(plan.cases), source.modality, source.case,
                   time.monotonic() - start)
    if tmp is not None and not problems:
      for modality in plan.manifest["modalities"]:
        (tmp / modality / ds.IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        (tmp / modality / ds.LABELS_DIR).mkdir(parents=True, exist_ok=True)
      ds.write_manifest(tmp, plan.manifest)
      if output.exists():
        output.rmdir()  # checked empty by _check_output
      os.rename(tmp, output)
      tmp = None
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
      for parent in reversed(created):
        try:
          parent.rmdir()
        except OSError:
          pass
  return problems


def _prepare(plan: _Plan, output_dir, spacing) -> ds.Manifest:
  output = _check_output(output_dir, plan.inputs)
  problems = _run(plan, output, spacing)
  if problems:
    where = ", ".join(str(p) for p in plan.inputs)
    raise PrepareError(f"{len(problems)} problem(s) in {where}; nothing was written to "
                       f"{output}:\n  " + "\n  ".join(problems))
  return ds.load_manifest(output)


# ---------------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------------


def _check_limit(limit) -> int | None:
  if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
    raise PrepareError(f"argument 'limit' (--limit) must be a positive integer or None, got "
                       f"{limit!r}")
  return limit


def prepare_abdomen_ctmr(input_dir, output_dir, spacing=(1.5, 1.5), *,
                         limit: int | None = None) -> ds.Manifest:
  """Imports the abdominal CHAOS-MR / BTCV-CT set into a new dataset folder.

  Args:
    input_dir: folder with mr/ and ct/, each holding image_<id>.nii.gz and label_<id>.nii.gz.
    output_dir: the new dataset folder (absent or empty, not inside `input_dir`).
    spacing: target in-plane spacing (mm) or None to keep each volume's own.
    limit: import only the first `limit` subjects of each modality (by id).

  Returns:
    The written dataset's manifest.

  Raises:
    PrepareError: listing every problem with its file; nothing is written then.
  """
  spacing = _check_spacing(spacing)
  return _prepare(_abdomen_plan(input_dir, _check_limit(limit), spacing), output_dir, spacing)


def check_abdomen_ctmr(input_dir, *, limit: int | None = None) -> list[str]:
  """Every problem of the abdominal source folder, each naming its file; [] when it is sound."""
  return _run(_abdomen_plan(input_dir, _check_limit(limit), None), None, None)


def import_folder(modalities: Sequence[FolderModality], output_dir, labels: Sequence[str],
                  spacing=(1.5, 1.5), *, name: str | None = None, paired: bool = False,
                  limit: int | None = None, input_dir=None) -> ds.Manifest:
  """Imports nnU-Net-style folders, one per modality, into a new dataset folder.

  Args:
    modalities: the modalities, each with its folder, label map and normalisation.
    output_dir: the new dataset folder (absent or empty, not inside any input folder).
    labels: shared label names, index 0 background.
    spacing: target in-plane spacing (mm) or None to keep each volume's own.
    name: the dataset name in the manifest (default: the output folder's name).
    paired: whether the modalities show the same subjects (matched by case id).
    limit: import only the first `limit` cases (sorted by id) of each modality.
    input_dir: the source root (--input) when there is one; `output_dir` may not lie in it
      either.

  Returns:
    The written dataset's manifest.

  Raises:
    PrepareError: listing every problem with its file; nothing is written then.
  """
  spacing = _check_spacing(spacing)
  name = name or pathlib.Path(output_dir).name or "imported"
  plan = _folder_plan(modalities, labels, name=name, paired=paired, limit=_check_limit(limit),
                      spacing=spacing)
  if input_dir is not None:
    plan.inputs.append(pathlib.Path(input_dir))
  return _prepare(plan, output_dir, spacing)


def check_folder(modalities: Sequence[FolderModality], labels: Sequence[str], *,
                 paired: bool = False, limit: int | None = None) -> list[str]:
  """Every problem of the generic importer's sources, each naming its file; [] when sound."""
  plan = _folder_plan(modalities, labels, name="check", paired=paired, limit=_check_limit(limit),
                      spacing=None)
  return _run(plan, None, None)


def check_dataset(root) -> list[str]:
  """Every problem of a dataset in the project layout, each naming its file; [] when sound.

  Checks the manifest, every case's image and label (readable, same shape and affine, no NaN/inf,
  label values in the modality's label_map, slices along the last canonical axis) and, for a
  case written by this module, that it matches its geometry record (shape, affine, RAS
  orientation, target in-plane spacing, and the manifest's `source_axis_flips`).
  """
  root = pathlib.Path(root)
  try:
    manifest = ds.load_manifest(root)
  except ds.DatasetError as e:
    return [str(e)]
  problems = []
  for modality, spec in manifest.modalities.items():
    try:
      cases = ds.list_cases(manifest, modality)
    except ds.DatasetError as e:
      problems.append(str(e))
      continue
    labels_dir = root / modality / ds.LABELS_DIR
    if labels_dir.is_dir():
      for path in sorted(labels_dir.iterdir()):
        if path.name.endswith(manifest.file_ending) and not path.name.startswith(".") \
            and path.name[:-len(manifest.file_ending)] not in cases:
          problems.append(f"{path}: label without an image in {root / modality / ds.IMAGES_DIR}")
    for case in cases:
      image_path = root / modality / ds.IMAGES_DIR / f"{case}{manifest.file_ending}"
      label_path = labels_dir / f"{case}{manifest.file_ending}"
      if not label_path.is_file():
        problems.append(f"{label_path}: label file of case {case!r} not found")
        label_path = None
      before = len(problems)
      _check_case(image_path, label_path, spec, problems)
      record_path = geometry_path(root, modality, case)
      image_failed = any(p.startswith(f"{image_path}:") for p in problems[before:])
      if image_failed or not record_path.is_file():
        continue
      try:
        record, info = load_geometry(root, modality, case)
      except PrepareError as e:
        problems.append(str(e))
        continue
      header = nib.load(str(image_path))  # _check_case read it without a problem
      shape, affine = tuple(header.shape), np.asarray(header.affine, dtype=np.float64)
      if shape != tuple(record.resampled_shape) or not np.allclose(
          affine, np.asarray(record.resampled_affine), atol=_AFFINE_ATOL):
        problems.append(f"{image_path}: shape {list(shape)} or affine differ from its "
                        f"geometry record {record_path}")
      if nib.aff2axcodes(affine) != ("R", "A", "S"):
        problems.append(f"{image_path}: orientation {''.join(nib.aff2axcodes(affine))}, "
                        "expected RAS")
      try:
        flips = geometry.check_axes(info.get("source_axis_flips", []), "source_axis_flips")
      except geometry.GeometryError as e:
        flips = f"unreadable ({e})"
      if flips != spec.source_axis_flips:
        problems.append(f"{record_path}: source_axis_flips {flips} differ from manifest key "
                        f"'modalities.{modality}.source_axis_flips' "
                        f"{list(spec.source_axis_flips)} of {root / ds.MANIFEST_NAME}")
      target = info.get("target_spacing")
      spacing = geometry.spacing_of(affine)[:2]
      if target is not None and not np.allclose(spacing, target, rtol=_SPACING_RTOL):
        problems.append(f"{image_path}: in-plane spacing {list(spacing)} mm, its geometry record "
                        f"{record_path} says {target}")
  return problems


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def _define_flags() -> None:
  flags.DEFINE_enum("source", None, ["abdomen_ctmr", "folder", "dataset"],
                    "Source layout; 'dataset' (a prepared dataset) only with --check.")
  flags.DEFINE_string("input", None, "Source root folder.")
  flags.DEFINE_string("output", None, "New dataset folder (absent or empty).")
  flags.DEFINE_string("spacing", "1.5,1.5", "Target in-plane spacing in mm; empty keeps the grid.")
  flags.DEFINE_bool("check", False, "Only check the source; write nothing.")
  flags.DEFINE_bool("plan", True, "Then write plan.json (data/plan.py): view size, normalisation, "
                    "network width and steps for --budget_minutes, timed on this machine.")
  flags.DEFINE_float("budget_minutes", 30.0, "With --plan: training and evaluation wall time.")
  flags.DEFINE_integer("limit", None, "Take only the first N cases of each modality.",
                       lower_bound=1)
  flags.DEFINE_multi_string("modality", [], "folder source: NAME or NAME=DIR, repeatable.")
  flags.DEFINE_multi_string("label_map", [], "folder source: RAW:SHARED,...[,*:0], one per "
                            "--modality.")
  flags.DEFINE_string("labels", None, "folder source: shared label names, comma-separated, "
                      "background first.")
  flags.DEFINE_multi_string("normalization", [], "folder source: zscore | minmax | none | "
                            "clip_zscore:LO:HI; one for all or one per --modality.")
  flags.DEFINE_bool("paired", False, "folder source: the modalities show the same subjects.")
  flags.DEFINE_string("name", None, "folder source: dataset name (default: output folder name).")


def _folder_modalities(input_dir) -> list[FolderModality]:
  f = flags.FLAGS
  if not f.modality:
    raise PrepareError("--source=folder needs at least one --modality=NAME[=DIR]")
  if len(f.label_map) != len(f.modality):
    raise PrepareError(f"--label_map is given {len(f.label_map)} time(s) for "
                       f"{len(f.modality)} --modality; give one per modality, in the same order")
  norms = list(f.normalization) or ["zscore"]
  if len(norms) == 1:
    norms = norms * len(f.modality)
  if len(norms) != len(f.modality):
    raise PrepareError(f"--normalization is given {len(f.normalization)} times for "
                       f"{len(f.modality)} --modality; give one for all or one per modality")
  out = []
  for text, label_map_text, norm_text in zip(f.modality, f.label_map, norms):
    name, _, folder = text.partition("=")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
      raise PrepareError(f"--modality={text!r}: NAME must be a plain folder name")
    label_map, unmapped = parse_label_map(label_map_text)
    out.append(FolderModality(name=name, folder=pathlib.Path(input_dir) / (folder or name),
                              label_map=label_map, unmapped=unmapped,
                              normalization=parse_normalization(norm_text)))
  return out


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if not f.source or not f.input:
    raise app.UsageError("--source and --input are required")
  folder_only = ("modality", "label_map", "labels", "normalization", "paired", "name")
  try:
    if f.source != "folder":
      given = [name for name in folder_only if f[name].present]
      if given:
        raise PrepareError(f"--{', --'.join(given)}: only for --source=folder")
    if f.source == "dataset":
      if not f.check:
        raise PrepareError("--source=dataset only checks an already prepared dataset; add --check")
      problems = check_dataset(f.input)
    elif f.source == "abdomen_ctmr":
      if f.check:
        problems = check_abdomen_ctmr(f.input, limit=f.limit)
      else:
        manifest = prepare_abdomen_ctmr(f.input, f.output, parse_spacing(f.spacing),
                                        limit=f.limit)
    else:
      if not f.labels:
        raise PrepareError("--source=folder needs --labels=background,NAME,...")
      modalities = _folder_modalities(f.input)
      labels = [s.strip() for s in f.labels.split(",")]
      if f.check:
        problems = check_folder(modalities, labels, paired=f.paired, limit=f.limit)
      else:
        manifest = import_folder(modalities, f.output, labels, parse_spacing(f.spacing),
                                 name=f.name, paired=f.paired, limit=f.limit, input_dir=f.input)
  except PrepareError as e:
    logging.error("%s", e)
    return 1
  if f.check:
    for problem in problems:
      logging.error("%s", problem)
    logging.info("%s: %d problem(s)", f.input, len(problems))
    return 1 if problems else 0
  counts = {m: len(ds.list_cases(manifest, m)) for m in manifest.modalities}
  logging.info("wrote %s: %s", manifest.root, counts)
  if f.plan:
    from unpaired_seg.data import plan as plan_lib  # times the network: JAX only when asked
    path = plan_lib.plan_dataset(manifest.root, f.budget_minutes)
    logging.info("wrote %s (a %s-minute budget; python -m unpaired_seg.plan plans again)", path,
                 f.budget_minutes)
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)
