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
import os
import pathlib

import nibabel as nib
import numpy as np
from absl import logging

# The manifest layer, re-exported: callers know one module, `dataset`.
from unpaired_seg.data.manifest import (  # noqa: F401
    FILE_ENDINGS, IMAGES_DIR, LABELS_DIR, MANIFEST_NAME, NORMALIZATION_SCHEMES, UNMAPPED_POLICIES,
    DatasetError, Manifest, ModalitySpec, _images_dir, _is_int, _modality_spec, _parse_manifest,
    _temp_name, load_manifest, write_manifest)

# Affines of an image and its label may differ by rounding in the writer, not by geometry.
_AFFINE_ATOL = 1e-4


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
# Cases and volumes
# ---------------------------------------------------------------------------------------------


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
