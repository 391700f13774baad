"""What `prepare` imports: the source layouts, their cases and the command-line specs.

Two layouts: the abdominal CHAOS-MR / BTCV-CT folder (`_abdomen_plan`) and nnU-Net-style
folders, one per modality (`_folder_plan`); each lists its cases and every problem found while listing,
without reading a volume. See `prepare` for the command.
"""

import dataclasses
import math
import pathlib
import re
from collections.abc import Mapping, Sequence

from unpaired_seg.data import dataset as ds
from unpaired_seg.data.prepare_records import PrepareError

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

OUTPUT_ENDING = ".nii.gz"
# nnU-Net's channel suffix: <case>_0000.nii.gz is channel 0 of <case>.
_CHANNEL = re.compile(r"(.+)_([0-9]{4})")


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
