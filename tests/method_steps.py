"""Shared pieces of the methods' training tests: a fixed two-modality batch and a jitted train
step that fails if it traces more than once."""

import chex
import jax
import numpy as np

from unpaired_seg import rng


def two_modality_batch(seed: int = 0, size: int = 4) -> dict:
  """MR and CT batches of 32 x 32 slices with three organs; MR bright, CT dark on them."""
  r = np.random.default_rng(seed)
  out = {}
  for i, m in enumerate(("mr", "ct")):
    label = np.zeros((size, 32, 32), np.int32)
    label[:, 8:20, 6:18] = 1 + i
    label[:, 22:28, 20:30] = 3
    image = (label * (1.0 if m == "mr" else -1.0) + 0.3 * r.standard_normal(label.shape))
    out[m] = {"image": image[..., None].astype(np.float32), "label": label,
              "labelled": np.ones((size,), np.float32)}
  return out


def traced_once_step(method):
  """`method.train_step` jitted with a fixed key; a second trace fails the test."""
  chex.clear_trace_counter()  # the same nested function is traced once per parameter

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(state, batch):
    return method.train_step(state, batch, rng.prng_key(1))

  return step
