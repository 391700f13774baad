"""The contract between a method plug-in and the one trainer: everything the trainer calls.

A method subclasses `Method` and implements the abstract part:
  init(rng, example_batch) -> state          a pytree with a scalar `step`; all the method keeps
  train_step(state, batch, rng, variant=None) -> (state, metrics)
                                            pure and jittable for each static `variant`; metrics
                                            is a dict of scalars and must contain 'loss'
  predict(state, image, modality) -> logits  pure and jittable; image [B, H, W, C] -> [B, H, W, K]
  parameter_counts(state) -> dict[str, int]  logged at start-up
  describe() -> dict                         JSON-able summary (networks, sharing) for config.json
and may override the rest, whose defaults suit a method trained on single slices:
  host_batch(data, step, rows=None) -> dict  the batch of `step` on the host, a pure function of
                                            (seed, step); `rows` is the part of the global batch
                                            this process builds (multi-host), None for all of it
  augment_partners: bool                     whether the batch's 'partner_image' slices move with
                                            their own slice's spatial augmentation
  step_variants() -> tuple                   the static variants of `train_step` the run uses; the
                                            trainer compiles one step for each (default: (None,))
  variant_of_step(step) -> variant           which one trains step `step` (0-based), chosen on the
                                            host (e.g. DualStream's alternate regime: a modality)
  extra_batch_shapes(image_shape) -> dict    per-sample shapes of the batch keys a method adds to
                                            each modality's batch (for random benchmark batches)
  predict_volume                             None, or a callable (predict, state, modality, image,
                                            **slice options) -> [X, Y, Z] labels used in place of
                                            slice-by-slice prediction (e.g. 3D sliding windows)
  extra_evaluations(state, data, ...) -> ExtraResults
                                            method-specific test results: entries for summary.json
                                            and files for the trainer to write into the workdir

`batch` is {modality: {'image': [B, H, W, C] float32, 'label': [B, H, W] int32,
'labelled': [B] float32}} plus whatever keys the method's `host_batch` adds.
"""

import abc
import dataclasses
from collections.abc import Callable

import jax
import numpy as np


@dataclasses.dataclass
class ExtraResults:
  """What `Method.extra_evaluations` returns: summary.json entries and workdir files.

  `files` maps a path relative to the workdir to its bytes (or text); the trainer writes them
  atomically, on process 0 only.
  """
  summary: dict = dataclasses.field(default_factory=dict)
  files: dict[str, bytes | str] = dataclasses.field(default_factory=dict)


def count_parameters(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


class Method(abc.ABC):
  """The contract above: abstract where every method differs, defaults for the rest."""

  num_classes: int
  augment_partners: bool = False
  predict_volume: Callable | None = None

  @abc.abstractmethod
  def init(self, rng: jax.Array, example_batch: dict):
    """The initial state (a pytree with a scalar `step`)."""

  @abc.abstractmethod
  def train_step(self, state, batch: dict, rng: jax.Array, variant=None):
    """(new state, metrics with 'loss'); pure and jittable."""

  @abc.abstractmethod
  def predict(self, state, image: jax.Array, modality: str) -> jax.Array:
    """Logits [B, H, W, K] of image [B, H, W, C]; pure and jittable."""

  @abc.abstractmethod
  def parameter_counts(self, state) -> dict[str, int]:
    """Parameter counts per network, logged at start-up."""

  @abc.abstractmethod
  def describe(self) -> dict:
    """A JSON-able summary of the networks and what they share."""

  def host_batch(self, data, step: int, rows: slice | None = None) -> dict:
    from unpaired_seg.data import loader  # host-side data code
    return loader.sampler_batch(data, step, rows)

  def extra_evaluations(self, state, data, *, config, workdir, settings,
                        checkpoint_step: int) -> ExtraResults:
    del state, data, config, workdir, settings, checkpoint_step
    return ExtraResults()

  def step_variants(self) -> tuple:
    return (None,)

  def variant_of_step(self, step: int):
    del step
    return None

  def extra_batch_shapes(self, image_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    del image_shape
    return {}
