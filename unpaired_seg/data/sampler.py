"""Batches of 2D slices: a sampler that is a pure function of (seed, stream, step).

A resumed run draws exactly the batches an uninterrupted one would, with no sampler state to
checkpoint; a process builds only its rows of the global batch.
"""

from collections.abc import Sequence

import numpy as np

from unpaired_seg.data import patches
from unpaired_seg.data.cases import classes_per_slice

_classes_per_slice = classes_per_slice   # the name `pipeline` has always had


def label_slices(case) -> dict[int, np.ndarray]:
  """{class > 0: the slices of the case's training view that contain it}; {} without a label.

  A prepared case keeps this index (`label_slices`); any other object with `image` and `label`
  is indexed from its label.
  """
  index = getattr(case, "label_slices", None)
  if index is not None:
    return index
  return {} if case.label is None else classes_per_slice(case.label)


def slice_stack(volume: np.ndarray, slices: np.ndarray, context: int) -> np.ndarray:
  """[H, W, Z] volume -> [N, H, W, 2*context+1] slices, neighbours clamped at the ends."""
  z = volume.shape[-1]
  offsets = np.arange(-context, context + 1)
  idx = np.clip(np.asarray(slices)[:, None] + offsets[None, :], 0, z - 1)       # [N, 2c+1]
  return np.moveaxis(volume[:, :, idx], (2, 3), (0, 3))


class SliceSampler:
  """Draws (case, slice) pairs, oversampling slices that contain a labelled structure.

  Args:
    cases: prepared cases of ONE modality (`cases.PreparedCase` or `lazy_cases.LazyCase`).
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

  def __init__(self, cases: Sequence, batch_size: int, foreground_fraction: float,
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
    # From each case's per-slice class index, not its label volume: a lazily read case answers
    # from its index file, so no label is read, let alone all of them held.
    # A slice holds a labelled structure exactly when it holds some class > 0.
    for ci, c in enumerate(self.cases):
      present = label_slices(c)
      pairs.extend((ci, z) for z in range(c.num_slices))
      if present:
        fg.extend((ci, int(z)) for z in np.unique(np.concatenate(list(present.values()))))
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

  def batch(self, step: int, rows: slice | None = None) -> dict[str, np.ndarray]:
    """The slices of `step`; `rows` (a process's part of the global batch) loads only those."""
    idx = self.indices(step)
    if rows is not None:
      idx = idx[rows]
    images, labels, labelled = [], [], []
    for ci, z in idx:
      c = self.cases[ci]
      image, label = c.image, c.label   # once each: a lazy case opens its arrays on access
      images.append(slice_stack(image, np.array([z]), self.context)[0])
      # An unlabelled case (semi-supervised training) contributes an all-background map; the
      # batch's `labelled` flag, not this map, tells the loss to ignore it.
      labels.append(label[:, :, z] if label is not None else np.zeros(image.shape[:2], np.uint8))
      labelled.append(label is not None)
    return {"image": np.stack(images).astype(np.float32),
            "label": np.stack(labels).astype(np.int32),
            "labelled": np.array(labelled, np.float32),
            "case_index": idx[:, 0].astype(np.int32),
            "slice_index": idx[:, 1].astype(np.int32)}
