"""Tiny source volumes in the abdominal layout, for tests of scoring and predicting in the
original geometry: LAS int16 MR and LPS uint8 CT (BTCV raw labels), anisotropic voxels.

Intensities encode the SHARED label (`INTENSITY_STEP * shared + INTENSITY_OFFSET`; BTCV organs
outside the shared set look like background), so `label_from_intensity` is a perfect "model" on
the source grid and an imperfect one after resampling.
"""

import pathlib

import numpy as np

from unpaired_seg.data import dataset

MR_SHAPE = (24, 20, 5)
CT_SHAPE = (30, 26, 6)
MR_AFFINE = np.array([[-1.25, 0., 0., 20.], [0., 1.25, 0., -10.], [0., 0., 7.7, -30.],
                      [0., 0., 0., 1.]])
CT_AFFINE = np.array([[-0.8, 0., 0., 4.], [0., -0.8, 0., 6.], [0., 0., 3.0, 1.],
                      [0., 0., 0., 1.]])
# BTCV raw value -> shared label (7 stomach and 8 aorta are not shared: background).
CT_TO_SHARED = {0: 0, 6: 1, 2: 2, 3: 3, 1: 4, 7: 0, 8: 0}
INTENSITY_STEP = 50
INTENSITY_OFFSET = 10


def _organs(shape, raw_values, rng) -> np.ndarray:
  """Boxes of each raw value at random places (later ones may cover earlier ones)."""
  label = np.zeros(shape, np.uint8)
  for value in raw_values:
    size = [max(3, n // 3) for n in shape[:2]]
    x = rng.integers(1, shape[0] - size[0])
    y = rng.integers(1, shape[1] - size[1])
    z0 = rng.integers(0, shape[2] - 2)
    label[x:x + size[0], y:y + size[1], z0:z0 + 3] = value
  return label


def write_abdomen_source(root: pathlib.Path, mr_ids=(1, 2, 3), ct_ids=(0, 1, 2),
                         seed: int = 0) -> pathlib.Path:
  """Writes <root>/mr/{image,label}_<id>.nii.gz (LAS) and <root>/ct/... (LPS)."""
  rng = np.random.default_rng(seed)
  for subject in mr_ids:
    label = _organs(MR_SHAPE, (1, 2, 3, 4), rng)
    image = (INTENSITY_STEP * label.astype(np.int16) + INTENSITY_OFFSET).astype(np.int16)
    dataset.save_nifti(root / "mr" / f"image_{subject}.nii.gz", image, MR_AFFINE)
    dataset.save_nifti(root / "mr" / f"label_{subject}.nii.gz", label, MR_AFFINE)
  lut = np.zeros(256, np.uint8)
  for raw, shared in CT_TO_SHARED.items():
    lut[raw] = shared
  for subject in ct_ids:
    label = _organs(CT_SHAPE, (7, 6, 2, 3, 1, 8), rng)
    image = (INTENSITY_STEP * lut[label] + INTENSITY_OFFSET).astype(np.uint8)
    dataset.save_nifti(root / "ct" / f"image_{subject}.nii.gz", image, CT_AFFINE)
    dataset.save_nifti(root / "ct" / f"label_{subject}.nii.gz", label, CT_AFFINE)
  return root


def label_from_intensity(image: np.ndarray, num_classes: int = 5) -> np.ndarray:
  """The label an (unnormalised) intensity encodes, nearest step."""
  return np.clip(np.rint((np.asarray(image, np.float64) - INTENSITY_OFFSET) / INTENSITY_STEP),
                 0, num_classes - 1).astype(np.uint8)


def shared_by_hand(raw: np.ndarray, table) -> np.ndarray:
  """Raw -> shared labels voxel by voxel (an independent loop, not a lookup table)."""
  out = np.zeros(raw.shape, np.uint8)
  for index in np.ndindex(raw.shape):
    out[index] = table[int(raw[index])]
  return out
