"""Cases on the model grid: one normalised volume, its training view and its way back to the file.

Every volume is put on the model grid (canonical RAS, slices along the last axis; a dataset
written by `prepare` is already there) and normalised; the training view of a case is an in-plane
box of `image_size` around the body (`geometry.body_crop_box`), padded where the volume is
smaller. The case keeps its box, its whole volume on the model grid and the geometry records that
lead back to the stored file and, for a prepared dataset, to the source file, so predictions can be
scored and written in the original geometry.
"""

import dataclasses
import functools
import pathlib
from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np

from unpaired_seg.data import dataset as ds
from unpaired_seg.data import geometry
from unpaired_seg.data import prepare_records
from unpaired_seg.data.normalization import normalize_intensity

CROP_MODES = ("body", "centre")


def centre_box(shape: Sequence[int], size: Sequence[int]) -> tuple[slice, slice]:
  """The in-plane box of `size` centred in an array of `shape` (reaching outside where smaller)."""
  box = []
  for n, want in zip(shape[:2], size):
    start = (n - want) // 2 if n >= want else -((want - n) // 2)
    box.append(slice(start, start + want))
  return tuple(box)


@dataclasses.dataclass(frozen=True)
class SourceGeometry:
  """Where a case of a prepared dataset came from: its `prepare` record and source files.

  Attributes:
    record: source file -> stored (prepared) grid.
    image: the source image file.
    label: the source label file (raw label values of the modality).
    target_spacing: in-plane spacing `prepare` resampled to, or None (grid kept).
    label_spec: the modality's manifest entry, to map the source's raw labels.
  """
  record: geometry.GeometryRecord
  image: pathlib.Path
  label: pathlib.Path
  target_spacing: tuple[float, float] | None
  label_spec: ds.ModalitySpec

  @property
  def file_affine(self) -> np.ndarray:
    """The source file's own affine: the record's with `prepare`'s direction corrections undone
    (the modality's `source_axis_flips`), so that arrays on the source grid written with it
    overlay the source image file."""
    return geometry.reverse_axis_directions(self.record.source_affine, self.record.source_shape,
                                            self.label_spec.source_axis_flips)


@dataclasses.dataclass(eq=False)
class PreparedCase:
  """One normalised volume of one modality on the model grid, and its training view.

  Attributes:
    modality, case, subject: as in the manifest.
    image: float32 [h, w, Z], the training view: `grid_image` cut by `box` (padded with its
      minimum outside the volume).
    label: uint8 [h, w, Z] shared labels cut by `box`, or None.
    affine: [4, 4] of the model grid.
    spacing: voxel size of the model grid in mm.
    box: the in-plane box of the training view on the model grid (may reach outside it).
    grid_image: float32 [X, Y, Z], the whole normalised volume on the model grid.
    grid_label: uint8 [X, Y, Z] shared labels on the model grid, or None.
    record: stored file -> model grid (a reorientation; the identity for a prepared dataset).
    image_path: the stored image file, when known.
    source: for a prepared dataset, the way back to the source file.
  """
  modality: str
  case: str
  subject: str
  image: np.ndarray
  label: np.ndarray | None
  affine: np.ndarray
  spacing: tuple[float, float, float]
  box: tuple[slice, slice]
  grid_image: np.ndarray
  grid_label: np.ndarray | None
  record: geometry.GeometryRecord
  image_path: pathlib.Path | None = None
  source: SourceGeometry | None = None

  @property
  def num_slices(self) -> int:
    return self.image.shape[-1]

  @property
  def label_slices(self) -> dict[int, np.ndarray]:
    """{class > 0: the slices of the training view that contain it}; {} without a label."""
    return {} if self.label is None else classes_per_slice(self.label)

  def without_label(self) -> "PreparedCase":
    """The same case with its training label dropped (semi-supervised training)."""
    return dataclasses.replace(self, label=None)

  @functools.cached_property
  def source_label(self) -> np.ndarray:
    """uint8 shared labels on the source grid, read once from the source label file."""
    return read_source_label(self)


def classes_per_slice(label: np.ndarray) -> dict[int, np.ndarray]:
  """{class > 0: the slices (last axis) of [H, W, Z] `label` that contain it}."""
  flat = label.reshape(-1, label.shape[-1])
  return {int(k): np.flatnonzero((flat == k).any(axis=0)) for k in np.unique(flat) if k > 0}


def label_counts(case) -> tuple[np.ndarray, np.ndarray] | None:
  """Voxels per label value in the training view and on the whole grid; None without a label.

  A lazily read case keeps them from when it was prepared (`label_counts`), so that nothing is
  read to report them.
  """
  stored = getattr(case, "label_counts", None)
  if stored is not None:
    return stored
  if case.label is None or case.grid_label is None:
    return None
  return np.bincount(case.label.ravel()), np.bincount(case.grid_label.ravel())


def read_source_label(case) -> np.ndarray:
  """uint8 shared labels of `case` on its source grid, from its source label file."""
  if case.source is None:
    raise ValueError(f"{case.modality}/{case.case}: no geometry record, no source file")
  path = case.source.label
  if not path.is_file():
    raise FileNotFoundError(
        f"{path}: source label of {case.modality}/{case.case} not found (moved?); evaluate on "
        "the dataset grid with --config.eval.grid=dataset")
  raw = np.asarray(nib.load(str(path)).dataobj)
  if raw.shape != tuple(case.source.record.source_shape):
    raise ds.DatasetError(f"{path}: shape {raw.shape} differs from its geometry record's "
                          f"{list(case.source.record.source_shape)}")
  return ds.map_labels(raw, case.source.label_spec, path)


def locate(manifest: ds.Manifest | None, modality: str,
           case: str) -> tuple[pathlib.Path | None, SourceGeometry | None]:
  """The stored image file of a case and, for a prepared dataset, its way back to the source."""
  if manifest is None:
    return None, None
  image_path = manifest.root / modality / ds.IMAGES_DIR / f"{case}{manifest.file_ending}"
  if not prepare_records.geometry_path(manifest.root, modality, case).is_file():
    return image_path, None
  source_record, info = prepare_records.load_geometry(manifest.root, modality, case)
  target = info.get("target_spacing")
  return image_path, SourceGeometry(source_record, pathlib.Path(info["source_image"]),
                                    pathlib.Path(info["source_label"]),
                                    None if target is None else tuple(float(t) for t in target),
                                    manifest.modalities[modality])


def prepare_case(volume: ds.Volume, normalization: Mapping, image_size: Sequence[int], *,
                 crop: str = "body", manifest: ds.Manifest | None = None) -> PreparedCase:
  """Puts one volume on the model grid, normalises it and cuts its training view.

  Args:
    volume: as loaded by `dataset.load_volume`.
    normalization: the modality's normalisation block (statistics fitted, if any).
    image_size: (h, w) of the training view.
    crop: 'body' (box centred on the body, `geometry.body_crop_box`) or 'centre'.
    manifest: the dataset's manifest, to find the stored file and a `prepare` geometry record.
  """
  if crop not in CROP_MODES:
    raise ValueError(f"config key 'data.crop': {crop!r} is not one of {CROP_MODES}")
  size = tuple(int(s) for s in image_size)
  name = f"{volume.modality}/{volume.case}"
  image, label, affine, record = geometry.to_model_grid(volume.image, volume.label, volume.affine,
                                                        None)
  grid_image = normalize_intensity(image, normalization, name=name)
  # The box is found on the normalised volume, as inference does (evaluate.predict_volume).
  box = (geometry.body_crop_box(grid_image, size) if crop == "body"
         else centre_box(grid_image.shape, size))
  view = geometry.apply_box(grid_image, box, size, pad_value=float(grid_image.min()))
  view_label = None if label is None else geometry.apply_box(label, box, size, pad_value=0)
  image_path, source = locate(manifest, volume.modality, volume.case)
  return PreparedCase(volume.modality, volume.case, volume.subject, view, view_label, affine,
                      geometry.spacing_of(affine), box, grid_image, label, record, image_path,
                      source)


def prepare_cases(volumes: Sequence[ds.Volume], normalization: Mapping,
                  image_size: Sequence[int], *, crop: str = "body",
                  manifest: ds.Manifest | None = None) -> list[PreparedCase]:
  """`prepare_case` for every volume of one modality."""
  return [prepare_case(v, normalization, image_size, crop=crop, manifest=manifest)
          for v in volumes]


def view_coverage(cases: Sequence[PreparedCase], class_names: Sequence[str]) -> dict[str, float]:
  """Per foreground class, the fraction of its labelled voxels that the training views keep.

  Training sees only each case's view (`image_size` cut around the body); inference sees the
  whole slice. A class far below 1 is clipped by the view size: its examples are cut off at the
  view's edge or missing, and the model may never learn it. Classes absent from every labelled
  case, and unlabelled cases, are left out.
  """
  n = len(class_names)
  kept, total = np.zeros(n, np.int64), np.zeros(n, np.int64)
  for c in cases:
    counts = label_counts(c)
    if counts is None:
      continue
    kept += np.pad(counts[0], (0, max(0, n - len(counts[0]))))[:n]
    total += np.pad(counts[1], (0, max(0, n - len(counts[1]))))[:n]
  return {name: float(kept[i] / total[i]) for i, name in enumerate(class_names)
          if i > 0 and total[i] > 0}


def target_spacing_of(cases: Sequence[PreparedCase]) -> tuple[float, float] | None:
  """The in-plane spacing `prepare` resampled every case to; None for a dataset not prepared."""
  spacings = {c.source.target_spacing for c in cases if c.source is not None}
  if any(c.source is None for c in cases):
    spacings.add(None)
  if len(spacings) > 1:
    raise ds.DatasetError(f"cases were prepared at different in-plane spacings "
                          f"{sorted(map(str, spacings))}: prepare the whole dataset in one run")
  return spacings.pop() if spacings else None


def model_info(*, method: str, class_names: Sequence[str], modalities: Sequence[str],
               image_size: Sequence[int], context_slices: int, crop: str,
               target_spacing: Sequence[float] | None, normalization: Mapping[str, Mapping],
               dataset: str,
               source_axis_flips: Mapping[str, Sequence[int]] | None = None) -> dict:
  """What `predict` needs to turn a raw volume into the model's input, without the dataset.

  `source_axis_flips`: per modality, the voxel axes whose affine direction `prepare` reversed in
  the source files (the manifest's `source_axis_flips`); a modality not given has none.
  """
  flips = {} if source_axis_flips is None else source_axis_flips
  return {
      "method": method,
      "dataset": dataset,
      "class_names": list(class_names),
      "modalities": list(modalities),
      "image_size": [int(s) for s in image_size],
      "context_slices": int(context_slices),
      "crop": crop,
      "orientation": "RAS (slices along the last axis)",
      "target_spacing": None if target_spacing is None else [float(s) for s in target_spacing],
      "normalization": {m: dict(normalization[m]) for m in modalities},
      "source_axis_flips": {m: sorted(int(a) for a in flips.get(m, ())) for m in modalities},
  }
