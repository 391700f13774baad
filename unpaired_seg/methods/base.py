"""What a method plug-in provides to the one trainer.

A method is an object with:
  init(rng, example_batch) -> state          a pytree with a scalar `step`; all the method keeps
  train_step(state, batch, rng, variant=None) -> (state, metrics)
                                            pure and jittable for each static `variant`; metrics
                                            is a dict of scalars and must contain 'loss'
  predict(state, image, modality) -> logits  pure and jittable; image [B, H, W, C] -> [B, H, W, K]
  parameter_counts(state) -> dict[str, int]  logged at start-up
  describe() -> dict                         JSON-able summary (networks, sharing) for config.json
and, with defaults in `Method`:
  step_variants() -> tuple                   the static variants of `train_step` the run uses; the
                                            trainer compiles one step for each (default: (None,))
  variant_of_step(step) -> variant           which one trains step `step` (0-based), chosen on the
                                            host (e.g. DualStream's alternate regime: a modality)
  extra_batch_shapes(image_shape) -> dict    per-sample shapes of the batch keys a method adds to
                                            each modality's batch (for random benchmark batches)

`batch` is {modality: {'image': [B, H, W, C] float32, 'label': [B, H, W] int32,
'labelled': [B] float32}}; a method may ask for more by defining `host_batch(data, step)`.
"""

import jax
import numpy as np


def count_parameters(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


class Method:
  """Defaults of the optional parts of the contract above."""

  def step_variants(self) -> tuple:
    return (None,)

  def variant_of_step(self, step: int):
    del step
    return None

  def extra_batch_shapes(self, image_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    del image_shape
    return {}
