"""From volumes on disk to batches of 2D slices: normalise, crop/pad, split by subject, sample.

  manifest = dataset.load_manifest(root)
  splits = load_or_create_splits(workdir / 'splits.json', manifest, ('mr', 'ct'), fractions, seed=0)
  cases = prepare_cases(dataset.load_modality(manifest, 'mr'), manifest.modalities['mr'], (64, 64))
  sampler = SliceSampler(train_cases, batch_size=16, foreground_fraction=0.5, seed=0, stream=0)
  batch = sampler.batch(step)   # {'image': [B, H, W, C], 'label': [B, H, W], ...}, same for same step

The sampler is a pure function of (seed, stream, step), so a resumed run draws exactly the batches
an uninterrupted one would, with no sampler state to checkpoint.
"""

import dataclasses
import json
import os
import pathlib
import tempfile
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from unpaired_seg.data import dataset as ds


# ---------------------------------------------------------------------------------------------
# Intensity and size.
# ---------------------------------------------------------------------------------------------

def normalize_intensity(image: np.ndarray, spec: Mapping, *, name: str = "image") -> np.ndarray:
  """Normalises one volume by the modality's scheme in the manifest.

  Args:
    image: raw intensities, any shape.
    spec: the manifest's `normalization` block: scheme `zscore`, `minmax` (to [-1, 1]),
      `clip_zscore` (with `window: [lo, hi]`), or `none`.
    name: used in error messages (the case's file).

  Returns:
    float32 array of the same shape.
  """
  x = image.astype(np.float32)
  scheme = spec.get("scheme")
  if scheme == "none":
    return x
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


def crop_or_pad(array: np.ndarray, size: Sequence[int], pad_value: float) -> np.ndarray:
  """Centre-crops or pads the first two (in-plane) axes of [H, W, ...] to `size`."""
  out = array
  for axis, target in enumerate(size):
    current = out.shape[axis]
    if current > target:
      start = (current - target) // 2
      out = np.take(out, np.arange(start, start + target), axis=axis)
    elif current < target:
      before = (target - current) // 2
      widths = [(0, 0)] * out.ndim
      widths[axis] = (before, target - current - before)
      out = np.pad(out, widths, constant_values=pad_value)
  return out


@dataclasses.dataclass
class PreparedCase:
  """One normalised volume of one modality, in-plane size fixed, slices along the last axis."""
  modality: str
  case: str
  subject: str
  image: np.ndarray            # float32 [H, W, Z]
  label: np.ndarray | None     # uint8 [H, W, Z] shared labels
  affine: np.ndarray           # [4, 4] of the stored volume
  spacing: tuple[float, float, float]

  @property
  def num_slices(self) -> int:
    return self.image.shape[-1]


def prepare_cases(volumes: Sequence[ds.Volume], spec: ds.ModalitySpec,
                  image_size: Sequence[int]) -> list[PreparedCase]:
  """Normalises and crops/pads every volume of one modality."""
  cases = []
  for v in volumes:
    image = normalize_intensity(v.image, spec.normalization, name=f"{v.modality}/{v.case}")
    image = crop_or_pad(image, image_size, pad_value=float(image.min()))
    label = None if v.label is None else crop_or_pad(v.label, image_size, pad_value=0)
    cases.append(PreparedCase(v.modality, v.case, v.subject, image, label, v.affine, v.spacing))
  return cases


# ---------------------------------------------------------------------------------------------
# Splits by subject.
# ---------------------------------------------------------------------------------------------

class SplitError(ValueError):
  """A splits file is inconsistent with the dataset, or a test subject leaks into training."""


def _split_subjects(subjects: Sequence[str], fractions: Mapping[str, float],
                    rng: np.random.Generator) -> dict[str, list[str]]:
  order = list(rng.permutation(sorted(subjects)))
  n = len(order)
  n_test = int(round(fractions["test"] * n))
  n_val = int(round(fractions["val"] * n))
  if n >= 3:  # every non-zero share gets at least one subject
    n_test = max(n_test, 1) if fractions["test"] > 0 else 0
    n_val = max(n_val, 1) if fractions["val"] > 0 else 0
  if n - n_test - n_val < 1:
    raise SplitError(f"{n} subjects are too few for split fractions {dict(fractions)}")
  return {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
          "train": sorted(order[n_test + n_val:])}


def subjects_of(manifest: ds.Manifest, modality: str) -> list[str]:
  return sorted({manifest.subject_of(modality, c) for c in ds.list_cases(manifest, modality)})


def make_splits(manifest: ds.Manifest, modalities: Sequence[str], fractions: Mapping[str, float],
                seed: int) -> dict:
  """Seeded per-subject split. A paired dataset splits its common subjects once for all modalities."""
  result = {"seed": seed, "fractions": dict(fractions), "paired": manifest.paired, "modalities": {}}
  if manifest.paired:
    common = set.intersection(*(set(subjects_of(manifest, m)) for m in modalities))
    shared = _split_subjects(sorted(common), fractions, np.random.default_rng(seed))
    for m in modalities:
      result["modalities"][m] = {k: list(v) for k, v in shared.items()}
  else:
    for m in modalities:
      rng = np.random.default_rng([seed, zlib.crc32(m.encode())])
      result["modalities"][m] = _split_subjects(subjects_of(manifest, m), fractions, rng)
  check_no_leakage(result)
  return result


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
                          fractions: Mapping[str, float], seed: int) -> dict:
  """Reuses `path` if it exists (checked against the dataset), else creates and writes it."""
  path = pathlib.Path(path)
  if path.exists():
    try:
      splits = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise SplitError(f"{path}: not valid JSON ({e})") from e
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
  splits = make_splits(manifest, modalities, fractions, seed)
  write_json_atomic(path, splits)
  return splits


def cases_in(cases: Sequence[PreparedCase], splits: Mapping, part: str) -> list[PreparedCase]:
  """The cases whose subject is in split `part` of their modality."""
  return [c for c in cases if c.subject in set(splits["modalities"][c.modality][part])]


def write_json_atomic(path: os.PathLike, obj) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Slices and the sampler.
# ---------------------------------------------------------------------------------------------

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
  """

  def __init__(self, cases: Sequence[PreparedCase], batch_size: int, foreground_fraction: float,
               context_slices: int, seed: int, stream: int):
    if not cases:
      raise ValueError("the sampler needs at least one case")
    self.cases = list(cases)
    self.batch_size = batch_size
    self.foreground_fraction = foreground_fraction
    self.context = context_slices
    self.seed = seed
    self.stream = stream
    pairs, fg = [], []
    for ci, c in enumerate(self.cases):
      for z in range(c.num_slices):
        pairs.append((ci, z))
        if c.label is not None and c.label[:, :, z].any():
          fg.append((ci, z))
    self.all_slices = np.asarray(pairs, dtype=np.int64)
    self.fg_slices = np.asarray(fg, dtype=np.int64) if fg else self.all_slices

  def indices(self, step: int) -> np.ndarray:
    """[B, 2] (case index, slice) for `step`: a pure function of (seed, stream, step)."""
    rng = np.random.default_rng([self.seed, self.stream, step])
    from_fg = rng.random(self.batch_size) < self.foreground_fraction
    fg = self.fg_slices[rng.integers(0, len(self.fg_slices), self.batch_size)]
    anywhere = self.all_slices[rng.integers(0, len(self.all_slices), self.batch_size)]
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
