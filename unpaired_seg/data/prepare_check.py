"""`prepare`'s checks: one source case (read, shapes, affines, labels) and a prepared dataset.

Every problem is a line naming its file; problems are collected, not raised, so that all of them
are reported together.
"""

import pathlib

import nibabel as nib
import numpy as np

from unpaired_seg.data import dataset as ds
from unpaired_seg.data import geometry
from unpaired_seg.data.prepare_records import PrepareError, geometry_path, load_geometry

# A slice axis must be the thickest: an in-plane spacing this much larger than the through-plane
# one means the volume is not axial (or not canonical) and slicing along Z would be wrong.
_SLICE_AXIS_RATIO = 1.5
# Affines of an image and its label may differ by rounding in a writer, not by geometry.
_AFFINE_ATOL = 1e-4
# Prepared in-plane spacings equal the target up to float32 storage in the NIfTI header.
_SPACING_RTOL = 1e-5


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
