"""3D patches: a patch sampler for training and sliding-window inference over a whole volume.

Patches have one fixed shape [h, w, d] (the in-plane training view by `d` slices), so a 3D
network compiles once for training and once for inference. Volumes are [X, Y, Z] arrays as the
2D pipeline keeps them; a patch batch is [B, h, w, d, 1] (the network's [B, D, H, W, C] with the
volume's axes in their stored order).

  sampler = PatchSampler(cases, batch_size=4, patch_shape=(96, 96, 8), foreground_fraction=0.5,
                         seed=0, stream=0)
  batch = sampler.batch(step)          # a pure function of (seed, stream, step)
  labels = predict_volume_patches(predict, state, 'ct', volume, patch_shape=(96, 96, 8))
"""

import math
from collections.abc import Callable, Sequence

import numpy as np


def _pad_to(volume: np.ndarray, shape: Sequence[int], value: float) -> np.ndarray:
  """Pads [X, Y, Z] at the end of each axis up to at least `shape`."""
  pad = [(0, max(0, s - n)) for n, s in zip(volume.shape, shape)]
  return np.pad(volume, pad, constant_values=value) if any(p for _, p in pad) else volume


# How the oversampled share of a batch is drawn (config key data.oversample); the slice sampler
# (sampler.SliceSampler) takes the same modes.
OVERSAMPLING = ("foreground", "class")


def check_oversample(mode: str) -> str:
  if mode not in OVERSAMPLING:
    raise ValueError(f"config key 'data.oversample': {mode!r} is not one of {OVERSAMPLING}")
  return mode


def window_starts(length: int, size: int, overlap: float) -> list[int]:
  """Starts of windows of `size` covering [0, length), neighbours overlapping by `overlap`."""
  if not 0.0 <= overlap < 1.0:
    raise ValueError(f"window_starts: overlap must be in [0, 1), got {overlap}")
  if length <= size:
    return [0]
  stride = max(1, int(size * (1.0 - overlap)))
  count = math.ceil((length - size) / stride) + 1
  return sorted({int(round(s)) for s in np.linspace(0, length - size, count)})


class PatchSampler:
  """Draws 3D patches of a fixed shape, centred on a labelled voxel with some probability.

  Args:
    cases: prepared cases of ONE modality (`image`, `label` [h, w, Z]: a `cases.PreparedCase`
      or `lazy_cases.LazyCase`).
    batch_size: patches per batch.
    patch_shape: (h, w, d); h, w at most the training view (shorter volumes are padded).
    foreground_fraction: probability that a patch contains a voxel of a labelled structure.
    seed: run seed.
    stream: distinguishes the modalities' streams.
    oversample: 'foreground' centres an oversampled patch on any labelled voxel; 'class' first
      draws a class uniformly among those present in the drawn case, then a voxel of it
      (nnU-Net's class-balanced sampling).
  """

  def __init__(self, cases: Sequence, batch_size: int, patch_shape: Sequence[int],
               foreground_fraction: float, seed: int, stream: int,
               oversample: str = "foreground"):
    if not cases:
      raise ValueError("PatchSampler: needs at least one case")
    if len(patch_shape) != 3 or any(int(s) < 1 for s in patch_shape):
      raise ValueError(f"PatchSampler: patch_shape must be three positive sizes, got {patch_shape}")
    self.cases = list(cases)
    self.batch_size = batch_size
    self.patch_shape = tuple(int(s) for s in patch_shape)
    self.foreground_fraction = foreground_fraction
    self.seed, self.stream = seed, stream
    self.oversample = check_oversample(oversample)
    # Foreground voxels per case (subsampled: any voxel of a structure will do as a centre), and
    # per case and class for class-balanced draws (subsampled per class, so a small organ keeps
    # its voxels).
    self.foreground, self.class_voxels = [], []
    # One case's label at a time: a lazily read case (`lazy_cases`) is not held after its turn.
    for c in self.cases:
      label = c.label
      fg = np.argwhere(label > 0) if label is not None else np.zeros((0, 3), np.int64)
      self.foreground.append(fg[:: max(1, len(fg) // 4096)])
      per_class = {}
      if oversample == "class" and len(fg):
        values = label[tuple(fg.T)]
        for k in np.unique(values):
          voxels = fg[values == k]
          per_class[int(k)] = voxels[:: max(1, len(voxels) // 4096)]
      self.class_voxels.append(per_class)

  def corners(self, step: int) -> np.ndarray:
    """[B, 4] (case index, x0, y0, z0) of `step`'s patches: a pure function of the step."""
    rng = np.random.default_rng([self.seed, self.stream, step])
    out = np.zeros((self.batch_size, 4), np.int64)
    for b in range(self.batch_size):
      ci = int(rng.integers(len(self.cases)))
      shape = np.maximum(self.cases[ci].image.shape, self.patch_shape)
      high = shape - np.asarray(self.patch_shape)                      # inclusive upper corner
      use_fg = rng.random() < self.foreground_fraction and len(self.foreground[ci])
      if use_fg and self.oversample == "class":
        voxels = list(self.class_voxels[ci].values())
        chosen = voxels[rng.integers(len(voxels))]
        centre = chosen[rng.integers(len(chosen))]
        corner = np.clip(centre - np.asarray(self.patch_shape) // 2, 0, high)
      elif use_fg:
        centre = self.foreground[ci][rng.integers(len(self.foreground[ci]))]
        corner = np.clip(centre - np.asarray(self.patch_shape) // 2, 0, high)
      else:
        corner = np.array([rng.integers(h + 1) for h in high])
      out[b] = (ci, *corner)
    return out

  def batch(self, step: int, rows: slice | None = None) -> dict[str, np.ndarray]:
    """{'image': [B, h, w, d, 1] float32, 'label': [B, h, w, d] int32, 'labelled': [B]}.

    `rows` (a process's part of the global batch) loads only those patches.
    """
    h, w, d = self.patch_shape
    images, labels, labelled = [], [], []
    corners = self.corners(step)
    for ci, x0, y0, z0 in (corners if rows is None else corners[rows]):
      c = self.cases[ci]
      image, label = c.image, c.label
      labelled.append(label is not None)
      image = _pad_to(image, self.patch_shape, float(image.min()))
      label = np.zeros(image.shape, np.uint8) if label is None else label
      label = _pad_to(label, self.patch_shape, 0)
      images.append(image[x0:x0 + h, y0:y0 + w, z0:z0 + d])
      labels.append(label[x0:x0 + h, y0:y0 + w, z0:z0 + d])
    return {"image": np.stack(images)[..., None].astype(np.float32),
            "label": np.stack(labels).astype(np.int32),
            "labelled": np.asarray(labelled, np.float32)}


def predict_volume_patches(predict: Callable, state, modality: str, image: np.ndarray, *,
                           patch_shape: Sequence[int], batch_size: int = 2,
                           overlap: float = 0.5) -> np.ndarray:
  """Labels of a whole [X, Y, Z] volume from overlapping fixed-shape 3D windows.

  Every call of `predict` gets [batch_size, h, w, d, 1] (the last batch padded by repeating a
  window), so the network compiles once. Class probabilities of overlapping windows are summed
  before the argmax.

  Args:
    predict: (state, [B, h, w, d, 1], modality) -> probabilities [B, h, w, d, K].
    state: the method's state.
    modality: the volume's modality.
    image: float32 [X, Y, Z], normalised.
    patch_shape: (h, w, d).
    batch_size: windows per call.
    overlap: share of a window that neighbouring windows overlap, per axis.

  Returns:
    uint8 [X, Y, Z] labels.
  """
  image = np.asarray(image, np.float32)
  if image.ndim != 3:
    raise ValueError(f"predict_volume_patches: image must be [X, Y, Z], got shape {image.shape}")
  shape = tuple(int(s) for s in patch_shape)
  padded = _pad_to(image, shape, float(image.min()))
  starts = [(i, j, k) for i in window_starts(padded.shape[0], shape[0], overlap)
            for j in window_starts(padded.shape[1], shape[1], overlap)
            for k in window_starts(padded.shape[2], shape[2], overlap)]
  total = None
  for b0 in range(0, len(starts), batch_size):
    part = starts[b0:b0 + batch_size]
    windows = [padded[i:i + shape[0], j:j + shape[1], k:k + shape[2]] for i, j, k in part]
    windows += [windows[-1]] * (batch_size - len(windows))
    probs = np.asarray(predict(state, np.stack(windows)[..., None], modality))
    if total is None:
      total = np.zeros(padded.shape + (probs.shape[-1],), np.float32)
    for p, (i, j, k) in zip(probs, part):
      total[i:i + shape[0], j:j + shape[1], k:k + shape[2]] += p
  labels = np.argmax(total, axis=-1).astype(np.uint8)
  return labels[: image.shape[0], : image.shape[1], : image.shape[2]]
