"""What a method plug-in provides to the one trainer.

A method is an object with:
  init(rng, example_batch) -> state          a pytree with a scalar `step`; all the method keeps
  train_step(state, batch, rng) -> (state, metrics)
                                            pure and jittable; metrics is a dict of scalars and
                                            must contain 'loss'
  predict(state, image, modality) -> logits  pure and jittable; image [B, H, W, C] -> [B, H, W, K]
  parameter_counts(state) -> dict[str, int]  logged at start-up
  describe() -> dict                         JSON-able summary (networks, sharing) for config.json

`batch` is {modality: {'image': [B, H, W, C] float32, 'label': [B, H, W] int32,
'labelled': [B] float32}}; a method may ask for more through `extra_batch_keys`.
"""

import jax
import numpy as np


def count_parameters(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))
