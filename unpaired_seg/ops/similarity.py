"""Similarity between anatomy factors, in pure jax.numpy (no Flax).

The automated pairing of MMSDNet/DAFNet scores each candidate slice by the overlap of the target's
anatomy factor with the candidate's deformed factor; a small network turns the scores into pair
weights (`unpaired_seg.nn.disentangle.PairWeighting`). The optional registration term of the
spatial transformer compares organ masks per organ (`soft_dice_per_class`).

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
  a, b = _checked("soft_dice_per_sample", a, b, smooth, min_ndim=2,
                  need="[B, ...] with at least one axis after the batch")
  axes = tuple(range(1, a.ndim))
  return _dice_over(a, b, axes, smooth)


def soft_dice_per_class(a: jax.Array, b: jax.Array, *, smooth: float = 1e-6) -> jax.Array:
  """Soft Dice per sample and channel: [B, ..., C] twice -> [B, C].

  Dice_nc = (2 sum(a_nc * b_nc) + smooth) / (sum a_nc + sum b_nc + smooth), the sums running over
  the axes between the batch and the channel axis (e.g. an organ's mask in one slice). A channel
  empty in both is 1; the gradient stays finite there.

  Args:
    a: [B, ..., C] non-negative, e.g. soft organ masks.
    b: same shape as `a`.
    smooth: added to the numerator and the denominator, >= 0.

  Returns:
    [B, C] Dice, in [0, 1] for non-negative inputs.
  """
  a, b = _checked("soft_dice_per_class", a, b, smooth, min_ndim=3,
                  need="[B, ..., C] with at least one axis between batch and channel")
  axes = tuple(range(1, a.ndim - 1))
  return _dice_over(a, b, axes, smooth)


def _checked(caller: str, a, b, smooth: float, *, min_ndim: int, need: str):
  """`a` and `b` as arrays of one float dtype, or a ValueError naming the argument."""
  a = jnp.asarray(a)
  b = jnp.asarray(b)
  if a.ndim < min_ndim:
    raise ValueError(f"{caller}: `a` must be {need}, got shape {a.shape}")
  if a.shape != b.shape:
    raise ValueError(f"{caller}: `a` {a.shape} and `b` {b.shape} must have the same shape")
  if smooth < 0:
    raise ValueError(f"{caller}: `smooth` must be >= 0, got {smooth}")
  dtype = jnp.result_type(a, b, jnp.float32)
  return a.astype(dtype), b.astype(dtype)


def _dice_over(a: jax.Array, b: jax.Array, axes: tuple[int, ...], smooth: float) -> jax.Array:
  """(2 sum(a b) + smooth) / (sum a + sum b + smooth) over `axes`; 1 where the denominator is 0."""
  numerator = 2.0 * jnp.sum(a * b, axis=axes) + smooth
  denominator = jnp.sum(a, axis=axes) + jnp.sum(b, axis=axes) + smooth
  # The inner `where` keeps the untaken branch finite: a bare n / d has a NaN gradient at d == 0.
  nonzero = denominator != 0
  safe = jnp.where(nonzero, denominator, 1.0)
  return jnp.where(nonzero, numerator / safe, 1.0)
