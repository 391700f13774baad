"""From volumes on disk to batches of 2D slices: normalise, cut around the body, split, sample.

  manifest = dataset.load_manifest(root)
  splits = load_or_create_splits(workdir / 'splits.json', manifest, ('mr', 'ct'),
                                 {'train': 0.6, 'val': 0.2, 'test': 0.2}, seed=0)
  volumes = dataset.load_modality(manifest, 'ct')
  norm = load_or_fit_normalization(workdir / 'normalization.json',
                                   {'ct': {'scheme': 'dataset_zscore'}},
                                   {'ct': cases_in(volumes, splits, 'train')})
  cases = prepare_cases(volumes, norm['ct'], (64, 64), manifest=manifest)
  sampler = SliceSampler(cases_in(cases, splits, 'train'), batch_size=16, foreground_fraction=0.5,
                         context_slices=0, seed=0, stream=0)
  batch = sampler.batch(step)   # {'image': [B, H, W, C], 'label': [B, H, W], ...}, pure in step

Every volume is put on the model grid (canonical RAS, slices along the last axis; a dataset
written by `prepare` is already there) and normalised; the training view of a case is an in-plane
box of `image_size` around the body (`geometry.body_crop_box`), padded where the volume is
smaller. The case keeps its box, its whole volume on the model grid and the geometry records that
lead back to the stored file and, for a prepared dataset, to the source file, so predictions can be
scored and written in the original geometry.

Intensity schemes (the manifest's, or `data.normalization` of the config): `zscore` per volume,
`minmax` per volume to [-1, 1], `clip_zscore` (window, then z-score per volume), `none`, and
`dataset_zscore` (optionally with a window): one mean and standard deviation over every voxel of
the TRAINING split's volumes of that modality, kept in the workdir's normalization.json so that
evaluation and `predict` use the same numbers.

The sampler is a pure function of (seed, stream, step), so a resumed run draws exactly the batches
an uninterrupted one would, with no sampler state to checkpoint.
"""

import dataclasses
import functools
import json
import math
import os
import pathlib
import tempfile
import zlib
from collections.abc import Mapping, Sequence

import nibabel as nib
import numpy as np

from unpaired_seg.data import dataset as ds
from unpaired_seg.data import geometry
from unpaired_seg.data import patches
from unpaired_seg.data import prepare

NORMALIZATION_SCHEMES = ("zscore", "minmax", "clip_zscore", "none", "dataset_zscore")
CROP_MODES = ("body", "centre")


class NormalizationError(ds.DatasetError):
  """A normalisation scheme, its settings or its saved statistics do not fit the data."""


# ---------------------------------------------------------------------------------------------
# Intensity.
# ---------------------------------------------------------------------------------------------

# Schemes whose statistics are fitted on the training split (`fit_normalization`).
FITTED_SCHEMES = ("dataset_zscore", "foreground_zscore")
FOREGROUND_PERCENTILES = (0.5, 99.5)


def normalize_intensity(image: np.ndarray, spec: Mapping, *, name: str = "image") -> np.ndarray:
  """Normalises one volume by its modality's scheme.

  Args:
    image: raw intensities, any shape.
    spec: the normalisation block: scheme `zscore`, `minmax` (to [-1, 1]), `clip_zscore` (with
      `window: [lo, hi]`), `none`, or `dataset_zscore` (with the training split's `mean` and
      `std` from `fit_normalization`, and an optional `window` applied first), or
      `foreground_zscore` (nnU-Net's CT scheme: clipped to the 0.5th and 99.5th percentiles of
      the training split's labelled voxels, then z-scored with their mean and std).
    name: used in error messages (the case's file).

  Returns:
    float32 array of the same shape.
  """
  x = image.astype(np.float32)
  scheme = spec.get("scheme")
  if scheme == "none":
    return x
  if scheme in FITTED_SCHEMES:
    if "mean" not in spec or "std" not in spec:
      raise NormalizationError(f"{name}: scheme {scheme!r} needs the training split's "
                               "'mean' and 'std' (fit_normalization); none were given")
    if spec.get("window") is not None:
      x = np.clip(x, *spec["window"])
    return (x - float(spec["mean"])) / float(spec["std"])
  if scheme == "clip_zscore":
    lo, hi = spec["window"]
    x = np.clip(x, lo, hi)
    scheme = "zscore"
  if scheme == "zscore":
    std = float(x.std())
    return (x - float(x.mean())) / (std if std > 1e-8 else 1.0)
  if scheme == "minmax":
    lo, hi = float(x.min()), float(x.max())
    return 2.0 * (x - lo) / max(hi - lo, 1e-8) - 1.0
  raise ds.DatasetError(f"{name}: unknown normalization scheme {scheme!r}")


def parse_scheme(text: str, *, where: str) -> dict:
  """A scheme as text: zscore, minmax, none, dataset_zscore, clip_zscore:LO:HI, dataset_zscore:LO:HI."""
  parts = str(text).strip().split(":")
  scheme = parts[0]
  if scheme in ("zscore", "minmax", "none", "dataset_zscore", "foreground_zscore") \
      and len(parts) == 1:
    return {"scheme": scheme}
  if scheme in ("clip_zscore", "dataset_zscore") and len(parts) == 3:
    try:
      lo, hi = float(parts[1]), float(parts[2])
    except ValueError:
      lo, hi = math.nan, math.nan
    if math.isfinite(lo) and math.isfinite(hi) and lo < hi:
      return {"scheme": scheme, "window": [lo, hi]}
  raise NormalizationError(f"{where}: {text!r} is not one of zscore, minmax, none, dataset_zscore, "
                           "foreground_zscore, clip_zscore:LO:HI, dataset_zscore:LO:HI (numbers "
                           "LO < HI)")


def resolve_normalization(manifest: ds.Manifest, modalities: Sequence[str],
                          overrides: str = "") -> dict[str, dict]:
  """Each modality's normalisation: the manifest's, or the override for that modality.

  Args:
    manifest: the dataset's manifest.
    modalities: the modalities in use.
    overrides: 'ct=dataset_zscore,mr=zscore' (config key `data.normalization`); '' keeps the
      manifest's schemes.

  Returns:
    {modality: normalisation block} (statistics not fitted yet).
  """
  where = "config key 'data.normalization'"
  result = {m: dict(manifest.modalities[m].normalization) for m in modalities}
  for item in filter(None, (s.strip() for s in str(overrides or "").split(","))):
    modality, sep, scheme = item.partition("=")
    if not sep:
      raise NormalizationError(f"{where}: {item!r} is not MODALITY=SCHEME")
    if modality not in result:
      raise NormalizationError(f"{where}: modality {modality!r} is not one of {list(modalities)}")
    result[modality] = parse_scheme(scheme, where=f"{where} ({modality})")
  return result


def fit_normalization(spec: Mapping, volumes: Sequence[ds.Volume]) -> dict:
  """The normalisation block with its statistics, fitted on `volumes` (the training split).

  Only `dataset_zscore` has statistics: the mean and (population) standard deviation over every
  voxel of every volume, after the optional window, accumulated in float64. Other schemes are
  returned as they are.
  """
  spec = dict(spec)
  if spec.get("scheme") not in FITTED_SCHEMES:
    return spec
  if not volumes:
    raise NormalizationError(f"scheme {spec['scheme']!r}: the training split has no volume to "
                             "fit the statistics on")
  if spec["scheme"] == "foreground_zscore":
    return _fit_foreground(spec, volumes)
  window = spec.get("window")

  def values(v):
    x = v.image.astype(np.float64)
    return np.clip(x, *window) if window is not None else x

  count = sum(int(v.image.size) for v in volumes)
  mean = sum(float(values(v).sum()) for v in volumes) / count
  # Two passes: the sum of squared deviations does not cancel as E[x^2] - E[x]^2 can.
  var = sum(float(np.square(values(v) - mean).sum()) for v in volumes) / count
  std = math.sqrt(var)
  spec.update(mean=mean, std=std if std > 1e-8 else 1.0, voxels=count,
              fitted_on=sorted(v.case for v in volumes))
  return spec


def _fit_foreground(spec: dict, volumes: Sequence[ds.Volume]) -> dict:
  """nnU-Net's CT statistics over the labelled voxels of the training volumes."""
  values = [v.image[v.label > 0].astype(np.float64) for v in volumes if v.label is not None]
  values = np.concatenate(values) if values else np.zeros(0)
  if not values.size:
    raise NormalizationError("scheme 'foreground_zscore': the training split has no labelled "
                             "voxel to fit the statistics on")
  lo, hi = np.percentile(values, FOREGROUND_PERCENTILES)
  clipped = np.clip(values, lo, hi)
  std = float(clipped.std())
  spec.update(window=[float(lo), float(hi)], mean=float(clipped.mean()),
              std=std if std > 1e-8 else 1.0, voxels=int(values.size),
              fitted_on=sorted(v.case for v in volumes))
  return spec


def load_or_fit_normalization(path: os.PathLike, specs: Mapping[str, Mapping],
                              train_volumes: Mapping[str, Sequence[ds.Volume]]) -> dict[str, dict]:
  """Each modality's normalisation with statistics: reused from `path`, else fitted and written.

  A saved block is reused only if it has the same scheme and window and, for `dataset_zscore`,
  was fitted on exactly the current training cases; anything else fails naming `path` (a model
  trained with other numbers would silently get other inputs).
  """
  path = pathlib.Path(path)
  saved = {}
  if path.exists():
    try:
      saved = json.loads(path.read_text())["modalities"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise NormalizationError(f"{path}: not a normalisation file ({e})") from e
  result, changed = {}, not path.exists()
  for modality, spec in specs.items():
    train_cases = sorted(v.case for v in train_volumes.get(modality, ()))
    if modality in saved:
      old = saved[modality]
      # foreground_zscore's window is fitted, not configured: only its scheme is compared.
      window_differs = (spec.get("scheme") != "foreground_zscore"
                        and old.get("window") != spec.get("window"))
      if old.get("scheme") != spec.get("scheme") or window_differs:
        raise NormalizationError(
            f"{path}: modality {modality!r} was normalised with {_describe(old)}, the config and "
            f"manifest now ask for {_describe(spec)}; use a new workdir")
      if spec.get("scheme") in FITTED_SCHEMES and old.get("fitted_on") != train_cases:
        raise NormalizationError(
            f"{path}: the statistics of {modality!r} were fitted on other training cases than the "
            f"current split's {train_cases}")
      result[modality] = dict(old)
    else:
      result[modality] = fit_normalization(spec, train_volumes.get(modality, ()))
      changed = True
  if changed:
    write_json_atomic(path, {"modalities": {**saved, **result}})
  return result


def _describe(spec: Mapping) -> str:
  window = spec.get("window")
  return repr(spec.get("scheme")) + (f" with window {list(window)}" if window is not None else "")


# ---------------------------------------------------------------------------------------------
# Cases on the model grid.
# ---------------------------------------------------------------------------------------------

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

  @functools.cached_property
  def source_label(self) -> np.ndarray:
    """uint8 shared labels on the source grid, read once from the source label file."""
    if self.source is None:
      raise ValueError(f"{self.modality}/{self.case}: no geometry record, no source file")
    path = self.source.label
    if not path.is_file():
      raise FileNotFoundError(
          f"{path}: source label of {self.modality}/{self.case} not found (moved?); evaluate on "
          "the dataset grid with --config.eval.grid=dataset")
    raw = np.asarray(nib.load(str(path)).dataobj)
    if raw.shape != tuple(self.source.record.source_shape):
      raise ds.DatasetError(f"{path}: shape {raw.shape} differs from its geometry record's "
                            f"{list(self.source.record.source_shape)}")
    return ds.map_labels(raw, self.source.label_spec, path)


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
  image_path, source = None, None
  if manifest is not None:
    image_path = (manifest.root / volume.modality / ds.IMAGES_DIR /
                  f"{volume.case}{manifest.file_ending}")
    if prepare.geometry_path(manifest.root, volume.modality, volume.case).is_file():
      source_record, info = prepare.load_geometry(manifest.root, volume.modality, volume.case)
      target = info.get("target_spacing")
      source = SourceGeometry(source_record, pathlib.Path(info["source_image"]),
                              pathlib.Path(info["source_label"]),
                              None if target is None else tuple(float(t) for t in target),
                              manifest.modalities[volume.modality])
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
    if c.label is None or c.grid_label is None:
      continue
    kept += np.bincount(c.label.ravel(), minlength=n)[:n]
    total += np.bincount(c.grid_label.ravel(), minlength=n)[:n]
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


# ---------------------------------------------------------------------------------------------
# Splits by subject.
# ---------------------------------------------------------------------------------------------

class SplitError(ValueError):
  """A splits file is inconsistent with the dataset, or a test subject leaks into training."""


def _fold_settings(split: Mapping) -> tuple[int, int]:
  folds, fold = int(split.get("folds", 0)), int(split.get("fold", 0))
  if folds == 1 or folds < 0:
    raise SplitError(f"split 'folds' must be 0 (fractions) or >= 2, got {folds}")
  if folds and not 0 <= fold < folds:
    raise SplitError(f"split 'fold' must be in 0..{folds - 1}, got {fold}")
  return folds, fold


def _split_subjects(subjects: Sequence[str], split: Mapping[str, float],
                    rng: np.random.Generator) -> dict[str, list[str]]:
  order = list(rng.permutation(sorted(subjects)))
  n = len(order)
  folds, fold = _fold_settings(split)
  if folds:
    # k-fold: the permuted subjects in k near-equal groups; test = group `fold`, validation the
    # first `val` share (of all subjects) of the others, the rest trains.
    if n < folds:
      raise SplitError(f"{n} subjects are too few for {folds} folds")
    groups = np.array_split(np.arange(n), folds)
    test = [order[i] for i in groups[fold]]
    rest = [s for s in order if s not in test]
    n_val = int(round(split["val"] * n))
    n_val = max(n_val, 1) if split["val"] > 0 else 0
    if len(rest) - n_val < 1:
      raise SplitError(f"{n} subjects are too few for {folds} folds and validation share "
                       f"{split['val']}")
    return {"test": sorted(test), "val": sorted(rest[:n_val]), "train": sorted(rest[n_val:])}
  n_test = int(round(split["test"] * n))
  n_val = int(round(split["val"] * n))
  if n >= 3:  # every non-zero share gets at least one subject
    n_test = max(n_test, 1) if split["test"] > 0 else 0
    n_val = max(n_val, 1) if split["val"] > 0 else 0
  if n - n_test - n_val < 1:
    raise SplitError(f"{n} subjects are too few for split fractions {dict(split)}")
  return {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
          "train": sorted(order[n_test + n_val:])}


def subjects_of(manifest: ds.Manifest, modality: str) -> list[str]:
  return sorted({manifest.subject_of(modality, c) for c in ds.list_cases(manifest, modality)})


def make_splits(manifest: ds.Manifest, modalities: Sequence[str], split: Mapping[str, float],
                seed: int) -> dict:
  """Seeded per-subject split. A paired dataset splits its common subjects once for all modalities.

  Args:
    manifest: the dataset.
    modalities: the modalities to split.
    split: fractions `train`, `val`, `test` (summing to 1); with `folds` >= 2, k-fold
      cross-validation instead: test = fold `fold` of `folds`, validation a `val` share of all
      subjects taken from the other folds.
    seed: the permutation's seed (per modality for unpaired data).
  """
  folds, fold = _fold_settings(split)
  result = {"seed": seed, "fractions": {k: split[k] for k in ("train", "val", "test")},
            "folds": folds, "fold": fold, "paired": manifest.paired, "modalities": {}}
  if manifest.paired:
    common = set.intersection(*(set(subjects_of(manifest, m)) for m in modalities))
    shared = _split_subjects(sorted(common), split, np.random.default_rng(seed))
    for m in modalities:
      result["modalities"][m] = {k: list(v) for k, v in shared.items()}
  else:
    for m in modalities:
      rng = np.random.default_rng([seed, zlib.crc32(m.encode())])
      result["modalities"][m] = _split_subjects(subjects_of(manifest, m), split, rng)
  check_no_leakage(result)
  return result


def check_split_sizes(splits: Mapping, *, require_val: bool) -> None:
  """A SplitError naming `data.split` when a modality has no test subject (the summary would
  score no volume) or, with `require_val`, no validation subject (the best checkpoint would be
  picked on nothing)."""
  for m, parts in splits["modalities"].items():
    counts = f"{len(parts['train'])} train, {len(parts['val'])} val, {len(parts['test'])} test"
    if not parts["test"]:
      raise SplitError(f"config key 'data.split': {m!r} gets no test subject ({counts}); raise "
                       f"data.split.test or add subjects")
    if require_val and not parts["val"]:
      raise SplitError(f"config key 'data.split': {m!r} gets no validation subject ({counts}) to "
                       f"pick the best checkpoint by; raise data.split.val or set "
                       f"eval.checkpoint='latest'")


def check_no_leakage(splits: Mapping, *, where: str = "splits") -> None:
  """Fails loudly if any subject of any val/test list is a training subject of any modality."""
  mods = splits["modalities"]
  train = {s for m in mods.values() for s in m["train"]}
  for name, m in mods.items():
    for part in ("val", "test"):
      leaked = sorted(train & set(m[part]))
      if leaked:
        raise SplitError(f"{where}: {part} subjects of {name!r} are also training subjects: {leaked}")
  for name, m in mods.items():
    overlap = sorted(set(m["val"]) & set(m["test"]))
    if overlap:
      raise SplitError(f"{where}: subjects of {name!r} are in both val and test: {overlap}")


def load_or_create_splits(path: os.PathLike, manifest: ds.Manifest, modalities: Sequence[str],
                          split: Mapping[str, float], seed: int, *,
                          require_val: bool = False) -> dict:
  """Reuses `path` if it exists (checked against the dataset and the fold), else creates it.

  A new split must give every modality a test subject (and, with `require_val`, a validation
  subject): see `check_split_sizes`.
  """
  path = pathlib.Path(path)
  folds, fold = _fold_settings(split)
  if path.exists():
    try:
      splits = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise SplitError(f"{path}: not valid JSON ({e})") from e
    saved = (int(splits.get("folds", 0)), int(splits.get("fold", 0)) if splits.get("folds") else 0)
    if saved != (folds, fold if folds else 0):
      raise SplitError(f"{path}: made for folds={saved[0]}, fold={saved[1]}; the config asks for "
                       f"folds={folds}, fold={fold}: give each fold its own workdir")
    for m in modalities:
      if m not in splits.get("modalities", {}):
        raise SplitError(f"{path}: has no split for modality {m!r}")
      known = set(subjects_of(manifest, m))
      listed = {s for part in ("train", "val", "test") for s in splits["modalities"][m][part]}
      missing = sorted(listed - known)
      if missing:
        raise SplitError(f"{path}: subjects {missing} of {m!r} are not in the dataset {manifest.root}")
    check_no_leakage(splits, where=str(path))
    return splits
  splits = make_splits(manifest, modalities, split, seed)
  check_split_sizes(splits, require_val=require_val)   # before a useless split is written
  write_json_atomic(path, splits)
  return splits


def cases_in(cases: Sequence, splits: Mapping, part: str) -> list:
  """The cases (PreparedCase or dataset.Volume) whose subject is in split `part` of their
  modality."""
  return [c for c in cases if c.subject in set(splits["modalities"][c.modality][part])]


def write_text_atomic(path: os.PathLike, text: str) -> None:
  """Writes `text` to a temporary file beside `path`, then renames it: never half a file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
    os.chmod(tmp, 0o644)   # mkstemp makes 0600; results are for others to read too
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def write_json_atomic(path: os.PathLike, obj) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


# ---------------------------------------------------------------------------------------------
# Slices and the sampler.
# ---------------------------------------------------------------------------------------------

def _classes_per_slice(label: np.ndarray) -> dict[int, np.ndarray]:
  """{class > 0: the slices (last axis) of [H, W, Z] `label` that contain it}."""
  flat = label.reshape(-1, label.shape[-1])
  return {int(k): np.flatnonzero((flat == k).any(axis=0)) for k in np.unique(flat) if k > 0}


def slice_stack(volume: np.ndarray, slices: np.ndarray, context: int) -> np.ndarray:
  """[H, W, Z] volume -> [N, H, W, 2*context+1] slices, neighbours clamped at the ends."""
  z = volume.shape[-1]
  offsets = np.arange(-context, context + 1)
  idx = np.clip(np.asarray(slices)[:, None] + offsets[None, :], 0, z - 1)       # [N, 2c+1]
  return np.moveaxis(volume[:, :, idx], (2, 3), (0, 3))


class SliceSampler:
  """Draws (case, slice) pairs, oversampling slices that contain a labelled structure.

  Args:
    cases: prepared, labelled cases of ONE modality.
    batch_size: slices per batch.
    foreground_fraction: probability that a sample is drawn from the foreground slices.
    context_slices: neighbours on each side stacked as channels (0 = 2D).
    seed: run seed.
    stream: distinguishes the modalities' streams.
    oversample: 'foreground' draws an oversampled slice among those with any labelled structure
      (a large organ then fills most of them); 'class' first draws a class uniformly among the
      classes present in the training cases, then a slice that contains it (nnU-Net's
      class-balanced sampling), so a small organ is seen as often as a large one.
  """

  def __init__(self, cases: Sequence[PreparedCase], batch_size: int, foreground_fraction: float,
               context_slices: int, seed: int, stream: int, oversample: str = "foreground"):
    if not cases:
      raise ValueError("the sampler needs at least one case")
    self.oversample = patches.check_oversample(oversample)
    self.cases = list(cases)
    self.batch_size = batch_size
    self.foreground_fraction = foreground_fraction
    self.context = context_slices
    self.seed = seed
    self.stream = stream
    pairs, fg = [], []
    per_class: dict[int, list] = {}
    for ci, c in enumerate(self.cases):
      present = _classes_per_slice(c.label) if c.label is not None else {}
      for z in range(c.num_slices):
        pairs.append((ci, z))
        if c.label is not None and c.label[:, :, z].any():
          fg.append((ci, z))
      for k, zs in present.items():
        per_class.setdefault(k, []).extend((ci, int(z)) for z in zs)
    self.all_slices = np.asarray(pairs, dtype=np.int64)
    self.fg_slices = np.asarray(fg, dtype=np.int64) if fg else self.all_slices
    # Slice locations per foreground class, computed once (nnU-Net's class locations).
    self.class_slices = {k: np.asarray(v, np.int64) for k, v in sorted(per_class.items())}

  def indices(self, step: int) -> np.ndarray:
    """[B, 2] (case index, slice) for `step`: a pure function of (seed, stream, step)."""
    rng = np.random.default_rng([self.seed, self.stream, step])
    from_fg = rng.random(self.batch_size) < self.foreground_fraction
    fg = self.fg_slices[rng.integers(0, len(self.fg_slices), self.batch_size)]
    anywhere = self.all_slices[rng.integers(0, len(self.all_slices), self.batch_size)]
    if self.oversample == "class" and self.class_slices:
      # Drawn after the 'foreground' draws, so that both modes share their uniform samples.
      lists = list(self.class_slices.values())
      chosen = rng.integers(0, len(lists), self.batch_size)
      fg = np.stack([lists[k][rng.integers(0, len(lists[k]))] for k in chosen])
    return np.where(from_fg[:, None], fg, anywhere)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    idx = self.indices(step)
    images, labels = [], []
    for ci, z in idx:
      c = self.cases[ci]
      images.append(slice_stack(c.image, np.array([z]), self.context)[0])
      # An unlabelled case (semi-supervised training) contributes an all-background map; the
      # batch's `labelled` flag, not this map, tells the loss to ignore it.
      labels.append(c.label[:, :, z] if c.label is not None else np.zeros(c.image.shape[:2], np.uint8))
    return {"image": np.stack(images).astype(np.float32),
            "label": np.stack(labels).astype(np.int32),
            "labelled": np.array([self.cases[ci].label is not None for ci in idx[:, 0]], np.float32),
            "case_index": idx[:, 0].astype(np.int32),
            "slice_index": idx[:, 1].astype(np.int32)}
