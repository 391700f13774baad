"""The embedded default data: a synthetic abdominal MR/CT dataset in the on-disk layout.

Each subject's anatomy is a set of analytic shapes in normalised coordinates (x, y in [-1, 1]
across the field of view, z in [-1, 1] across the slice stack; RAS: +x towards the subject's
right, +y anterior, +z superior): an elliptic body with a subcutaneous fat layer, an abdominal
cavity of soft tissue with visceral fat, the spine with paraspinal muscles, and five organs --
liver (right), spleen (left), right and left kidneys (posterior, bean-shaped), and a stomach
(anterior left). Organs are ellipsoids with random radii, rotation and a smooth random
deformation; positions, sizes and the body vary from subject to subject. Because the anatomy is
a function of the coordinates, a deformed copy of a subject (paired mode) is the same anatomy
evaluated at warped coordinates.

The two modalities map tissues to intensities non-monotonically (fat bright in MR and dark in CT,
liver the other way round; kidney brighter than spleen in CT, darker in MR), with a smooth
multiplicative bias field, mild texture, partial-volume blur and noise. MR is stored as int16
scanner-like values (0..~1200), CT as int16 Hounsfield-like values (-1000..~1000). CT raw labels
use BTCV's numbering (1 spleen, 2 right kidney, 3 left kidney, 6 liver, 7 stomach); the stomach
is not a shared label and maps to background.

Example:

  python -c "from unpaired_seg.data import phantom; print(phantom.ensure('/tmp/phantom'))"
"""

import os
import pathlib
import shutil
import uuid

import numpy as np
from scipy import ndimage

from unpaired_seg.data import arrays
from unpaired_seg.data import dataset
# The anatomy lives in its own module; its names stay importable from here (tests, users).
from unpaired_seg.data.phantom_anatomy import (AIR, BONE, FAT, KIDNEY_L, KIDNEY_R, LIVER,
                                               MUSCLE, SPLEEN, STOMACH, _NUM_TISSUES, _ORGANS,
                                               _grid_points, _sample_anatomy, _tissue_map,
                                               _warp_points, _wave_field, _waves)

GENERATOR_VERSION = 1
# Paired mode: the in-plane deformation between a subject's modalities, as a multiple of the
# default (about 2 voxels at the peak on 64 in-plane voxels); 4 gives about 8.
MAX_PAIR_MISALIGNMENT = 4.0
MODES = ("unpaired", "paired")
SUPPORTED_MODALITIES = ("mr", "ct")
LABELS = ("background", "liver", "right_kidney", "left_kidney", "spleen")
# Both modalities on one grid so the default data needs no resampling. [mm]
SPACING = (2.0, 2.0, 5.0)
MIN_IN_PLANE = 24
# With fewer slices the organs could not both span several slices and miss the end slices.
MIN_SLICES = 12


# Raw label value of each tissue in each modality's label files (0 elsewhere).
_RAW_LABELS = {
    "mr": {LIVER: 1, KIDNEY_R: 2, KIDNEY_L: 3, SPLEEN: 4},
    "ct": {LIVER: 6, KIDNEY_R: 2, KIDNEY_L: 3, SPLEEN: 1, STOMACH: 7},
}
_MODALITY_ENTRIES = {
    "mr": {"label_map": {"0": 0, "1": 1, "2": 2, "3": 3, "4": 4},
           "normalization": {"scheme": "zscore"}, "unmapped": "error"},
    "ct": {"label_map": {"0": 0, "6": 1, "2": 2, "3": 3, "1": 4},
           "normalization": {"scheme": "clip_zscore", "window": [-200.0, 300.0]},
           "unmapped": "background"},
}

# Mean intensity per tissue: [air, fat, muscle, bone, liver, spleen, kidney_r, kidney_l, stomach].
# MR (T2-like): fat bright, liver dark, spleen > kidney. CT (portal venous, HU): fat dark,
# liver brighter, kidney > spleen -- soft tissues inside the CT window [-200, 300].
_TISSUE_MEAN = {
    "mr": np.array([0., 820., 230., 130., 330., 650., 540., 540., 720.], np.float32),
    "ct": np.array([-1000., -100., 45., 650., 80., 130., 200., 200., 15.], np.float32),
}
_MODALITY_SEED_ID = {"mr": 0, "ct": 1}
# Seed stream purposes: independent streams per (purpose, modality, subject).
_ANATOMY, _WARP, _APPEARANCE = 0, 1, 2


def _settings(mode, num_subjects, shape, seed, modalities, pair_misalignment=1.0) -> dict:
  """Validates the generator arguments; returns them as the manifest's "phantom" block.

  `pair_misalignment` enters the block only when it is not 1, so datasets written before it
  existed (all at 1) still match their settings.
  """
  if mode not in MODES:
    raise ValueError(f"argument 'mode' must be one of {', '.join(MODES)}, got {mode!r}")
  if not dataset._is_int(num_subjects) or num_subjects < 1:
    raise ValueError(f"argument 'num_subjects' must be a positive integer, got {num_subjects!r}")
  if not dataset._is_int(seed) or seed < 0:
    raise ValueError(f"argument 'seed' must be a non-negative integer, got {seed!r}")
  try:
    shape = tuple(shape)
  except TypeError:
    shape = ()
  if (len(shape) != 3 or not all(dataset._is_int(s) for s in shape)
      or min(shape[:2]) < MIN_IN_PLANE or shape[2] < MIN_SLICES):
    raise ValueError(f"argument 'shape' must be three integers (X, Y, Z) with X, Y >= "
                     f"{MIN_IN_PLANE} and Z >= {MIN_SLICES}, got {shape!r}")
  if isinstance(modalities, str):
    raise ValueError(f"argument 'modalities' must be a sequence of names such as ('mr', 'ct'), "
                     f"got the string {modalities!r}")
  modalities = tuple(modalities)
  if (not modalities or len(set(modalities)) != len(modalities)
      or not all(m in SUPPORTED_MODALITIES for m in modalities)):
    raise ValueError(f"argument 'modalities' must be distinct names from "
                     f"{SUPPORTED_MODALITIES}, got {modalities!r}")
  if (isinstance(pair_misalignment, bool) or not isinstance(pair_misalignment, (int, float))
      or not 0 <= pair_misalignment <= MAX_PAIR_MISALIGNMENT):
    raise ValueError(f"argument 'pair_misalignment' must be a number in [0, "
                     f"{MAX_PAIR_MISALIGNMENT}], got {pair_misalignment!r}")
  if mode != "paired" and pair_misalignment != 1:
    raise ValueError(f"argument 'pair_misalignment' only applies to mode 'paired' (mode "
                     f"{mode!r} has no pairs), got {pair_misalignment!r}")
  settings = {"generator_version": GENERATOR_VERSION, "mode": mode,
              "num_subjects": int(num_subjects), "shape": [int(s) for s in shape],
              "seed": int(seed), "modalities": list(modalities)}
  if pair_misalignment != 1:
    settings["pair_misalignment"] = float(pair_misalignment)
  return settings


# ---------------------------------------------------------------------------------------------
# Appearance
# ---------------------------------------------------------------------------------------------


def _smooth_noise(rng, shape, sigma) -> np.ndarray:
  field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
  return field / max(float(field.std()), 1e-6)


def _render(tissue: np.ndarray, points, modality: str,
            rng: np.random.Generator) -> np.ndarray:
  """Intensities of a tissue map [X, Y, Z] as the modality's stored int16 image."""
  shape = tissue.shape
  mean = _TISSUE_MEAN[modality].copy()
  if modality == "mr":
    mean[1:] *= rng.uniform(0.96, 1.04, _NUM_TISSUES - 1).astype(np.float32)
  else:
    mean[1:] += rng.uniform(-8, 8, _NUM_TISSUES - 1).astype(np.float32)
  image = mean[tissue]
  texture = _smooth_noise(rng, shape, (1.2, 1.2, 0.5))
  body = tissue != AIR
  if modality == "mr":
    image = np.where(body, image * (1 + 0.04 * texture), image)
  else:
    image = np.where(body, image + 6.0 * texture, image)
  # Partial volume at tissue borders.
  image = ndimage.gaussian_filter(image, (0.6, 0.6, 0.0))
  bias = np.exp(_wave_field(points, _waves(rng, 3, (1.0, 2.5), 0.05, dims=1))[0]).reshape(shape)
  if modality == "mr":
    image = image * bias
    sigma = rng.uniform(12, 25)
    real = image + sigma * rng.standard_normal(shape).astype(np.float32)
    imag = sigma * rng.standard_normal(shape).astype(np.float32)
    image = np.sqrt(real * real + imag * imag)  # Rician magnitude noise.
    return np.clip(np.rint(image), 0, 4095).astype(np.int16)
  # CT: a weak multiplicative field on attenuation (HU + 1000), not on HU itself.
  image = (image + 1000) * bias ** 0.2 - 1000
  image = image + rng.uniform(8, 15) * rng.standard_normal(shape).astype(np.float32)
  return np.clip(np.rint(image), -1024, 3071).astype(np.int16)


def _labels(tissue: np.ndarray, modality: str) -> np.ndarray:
  lut = np.zeros(_NUM_TISSUES, np.uint8)
  for t, raw in _RAW_LABELS[modality].items():
    lut[t] = raw
  return lut[tissue]


def _usable(tissue: np.ndarray) -> bool:
  """Every organ present, and no organ on the first or last slice."""
  present = np.zeros(_NUM_TISSUES, bool)
  present[np.unique(tissue)] = True
  ends = np.concatenate([tissue[:, :, 0].ravel(), tissue[:, :, -1].ravel()])
  return bool(present[list(_ORGANS)].all()) and not np.isin(ends, _ORGANS).any()


def _subject_tissues(settings: dict, index: int, points) -> dict[str, np.ndarray]:
  """Tissue maps [X, Y, Z] of subject `index` for every modality."""
  shape, seed, modalities = tuple(settings["shape"]), settings["seed"], settings["modalities"]
  tissues = {}
  if settings["mode"] == "paired":
    anatomy_rng = np.random.default_rng([seed, _ANATOMY, index])
    for _ in range(50):  # Redraw in the rare case an organ vanishes (e.g. behind another).
      anatomy = _sample_anatomy(anatomy_rng)
      for i, m in enumerate(modalities):
        warp_rng = np.random.default_rng([seed, _WARP, _MODALITY_SEED_ID[m], index])
        at = points if i == 0 else _warp_points(points, shape, warp_rng,
                                                 settings.get("pair_misalignment", 1.0))
        tissues[m] = _tissue_map(anatomy, at).reshape(shape)
      if all(_usable(t) for t in tissues.values()):
        return tissues
    raise RuntimeError(f"phantom: no usable anatomy for subject {index} with shape {shape}")
  for m in modalities:
    anatomy_rng = np.random.default_rng([seed, _ANATOMY, _MODALITY_SEED_ID[m], index])
    for _ in range(50):
      tissues[m] = _tissue_map(_sample_anatomy(anatomy_rng), points).reshape(shape)
      if _usable(tissues[m]):
        break
    else:
      raise RuntimeError(f"phantom: no usable anatomy for {m} subject {index} with shape {shape}")
  return tissues


# ---------------------------------------------------------------------------------------------
# Writing the dataset
# ---------------------------------------------------------------------------------------------


def _manifest_dict(settings: dict) -> dict:
  mode, n = settings["mode"], settings["num_subjects"]
  modalities = {}
  for m in settings["modalities"]:
    entry = {k: (dict(v) if isinstance(v, dict) else v) for k, v in _MODALITY_ENTRIES[m].items()}
    prefix = "" if mode == "paired" else f"{m}_"
    entry["subjects"] = {f"case_{i:03d}": f"{prefix}s{i:03d}" for i in range(n)}
    modalities[m] = entry
  return {
      "name": f"phantom_{mode}",
      "description": (f"Synthetic abdominal {'/'.join(settings['modalities'])} phantom, {mode}: "
                      f"{n} subjects, shape {settings['shape']}, spacing {list(SPACING)} mm, "
                      f"seed {settings['seed']}."),
      "labels": list(LABELS),
      "paired": mode == "paired",
      "file_ending": ".nii.gz",
      "modalities": modalities,
      "phantom": settings,
  }


def _write(settings: dict, folder: pathlib.Path) -> None:
  shape = tuple(settings["shape"])
  points = _grid_points(shape)
  affine = np.diag(list(SPACING) + [1.0])
  # Centre the field of view on the world origin.
  affine[:3, 3] = -0.5 * (np.array(shape) - 1) * np.array(SPACING)
  dataset.write_manifest(folder, _manifest_dict(settings))
  for index in range(settings["num_subjects"]):
    tissues = _subject_tissues(settings, index, points)
    for m, tissue in tissues.items():
      rng = np.random.default_rng([settings["seed"], _APPEARANCE, _MODALITY_SEED_ID[m], index])
      case = f"case_{index:03d}"
      dataset.save_nifti(folder / m / dataset.IMAGES_DIR / f"{case}.nii.gz",
                         _render(tissue, points, m, rng), affine)
      dataset.save_nifti(folder / m / dataset.LABELS_DIR / f"{case}.nii.gz",
                         _labels(tissue, m), affine)


def generate(root, *, mode: str = "unpaired", num_subjects: int = 20, shape=(64, 64, 24),
             seed: int = 0, modalities=("mr", "ct"),
             pair_misalignment: float = 1.0) -> dataset.Manifest:
  """Writes a complete phantom dataset at `root` and returns its manifest.

  Everything is written into a temporary folder beside `root` that is renamed into place at the
  end, so an interrupted run never leaves a partial dataset at `root`; with the NIfTI files, the
  .npy arrays that readers memory-map (`arrays`).

  Args:
    root: destination folder; must not exist or be empty.
    mode: "unpaired" (each modality from different subjects, ids `mr_s000`, `ct_s000`, ...) or
      "paired" (the same subjects `s000`, ... in every modality; later modalities show a smooth
      in-plane deformation of a few voxels and a -1..+1 slice offset of the first's anatomy).
    num_subjects: subjects (cases) per modality.
    shape: volume shape (X, Y, Z); z is the slice axis.
    seed: the data are a deterministic function of all arguments.
    modalities: a subset of ("mr", "ct"); in paired mode the first is the reference.
    pair_misalignment: paired mode only: the in-plane deformation's amplitude as a multiple of
      the default's (0 = exactly aligned in-plane, up to MAX_PAIR_MISALIGNMENT); the anatomy,
      appearance and slice offsets stay the same.

  Returns:
    `dataset.load_manifest(root)`.

  Raises:
    ValueError: naming a bad argument.
    dataset.DatasetError: `root` exists and is not empty.
  """
  settings = _settings(mode, num_subjects, shape, seed, modalities, pair_misalignment)
  root = pathlib.Path(root)
  if root.exists() and (not root.is_dir() or any(root.iterdir())):
    raise dataset.DatasetError(f"{root}: refusing to generate a phantom over an existing, "
                               "non-empty path")
  root.parent.mkdir(parents=True, exist_ok=True)
  tmp = root.with_name(f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}")
  try:
    _write(settings, tmp)
    arrays.write_dataset_arrays(tmp)   # readers memory-map these instead of decoding NIfTI
    try:
      # POSIX rename replaces an empty directory but never a non-empty one.
      os.rename(tmp, root)
    except OSError as e:
      raise dataset.DatasetError(f"{root}: cannot move the generated phantom into place: "
                                 f"{e}") from e
  finally:
    if tmp.exists():
      shutil.rmtree(tmp, ignore_errors=True)
  return dataset.load_manifest(root)


def ensure(root, *, mode: str = "unpaired", num_subjects: int = 20, shape=(64, 64, 24),
           seed: int = 0, modalities=("mr", "ct"),
           pair_misalignment: float = 1.0) -> dataset.Manifest:
  """Generates the phantom at `root` unless `root/dataset.json` exists; then only loads it.

  Args: as `generate`.

  Returns:
    The manifest of the dataset at `root`.

  Raises:
    dataset.DatasetError: the existing dataset is not a phantom, or was generated with other
      settings (both are named).
  """
  settings = _settings(mode, num_subjects, shape, seed, modalities, pair_misalignment)
  root = pathlib.Path(root)
  if not (root / dataset.MANIFEST_NAME).is_file():
    try:
      return generate(root, **{k: v for k, v in settings.items() if k != "generator_version"})
    except dataset.DatasetError:
      # Another process may have put the same phantom in place meanwhile: load and compare.
      if not (root / dataset.MANIFEST_NAME).is_file():
        raise
  manifest = dataset.load_manifest(root)
  if manifest.phantom is None:
    raise dataset.DatasetError(f"{root / dataset.MANIFEST_NAME}: not a phantom dataset (no "
                               "manifest key 'phantom'); choose another folder")
  if manifest.phantom != settings:
    raise dataset.DatasetError(
        f"{root / dataset.MANIFEST_NAME}: phantom generated with settings {manifest.phantom}, "
        f"requested {settings}; delete the folder or choose another one")
  return manifest
