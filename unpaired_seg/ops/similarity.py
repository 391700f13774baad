"""Similarity between anatomy factors, in pure jax.numpy (no Flax).

The automated pairing of MMSDNet/DAFNet scores each candidate slice by the overlap of the target's
anatomy factor with the candidate's deformed factor; a small network turns the scores into pair
weights (`unpaired_seg.nn.disentangle.PairWeighting`).

  python -m pytest -q tests/ops/test_similarity.py
"""

import jax
import jax.numpy as jnp


def soft_dice_per_sample(a: jax.Array, b: jax.Array, *, smooth: float = 1e-12) -> jax.Array:
  """Soft Dice between two batches of factors, pooled over positions AND channels, per sample.

  Dice_n = (2 sum(a_n * b_n) + smooth) / (sum a_n + sum b_n + smooth), the sums running over every
  axis but the batch axis, as the authors' pairing network computes it (their smoothing 1e-12).
  Two empty samples have Dice 1 (also with `smooth=0`); the gradient stays finite there.

  Args:
    a: [B, H, W, C] (or [B, ...]) non-negative factor, e.g. a binary anatomy factor.
    b: same shape as `a`.
    smooth: added to the numerator and the denominator, >= 0.

  Returns:
    [B] Dice per sample, in [0, 1] for non-negative inputs.
  """
  a = jnp.asarray(a)
  b = jnp.asarray(b)
  if a.ndim < 2:
    raise ValueError(f"soft_dice_per_sample: `a` must be [B, ...] with at least one axis after "
                     f"the batch, got shape {a.shape}")
  if a.shape != b.shape:
    raise ValueError(f"soft_dice_per_sample: `a` {a.shape} and `b` {b.shape} must have the same "
                     "shape")
  if smooth < 0:
    raise ValueError(f"soft_dice_per_sample: `smooth` must be >= 0, got {smooth}")
  dtype = jnp.result_type(a, b, jnp.float32)
  a = a.astype(dtype)
  b = b.astype(dtype)
  axes = tuple(range(1, a.ndim))
  numerator = 2.0 * jnp.sum(a * b, axis=axes) + smooth
  denominator = jnp.sum(a, axis=axes) + jnp.sum(b, axis=axes) + smooth
  # The inner `where` keeps the untaken branch finite: a bare n / d has a NaN gradient at d == 0.
  nonzero = denominator != 0
  safe = jnp.where(nonzero, denominator, 1.0)
  return jnp.where(nonzero, numerator / safe, 1.0)
