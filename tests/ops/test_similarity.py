"""Tests of unpaired_seg.ops.similarity: soft Dice of anatomy factors and masks.

  python -m pytest -q tests/ops/test_similarity.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unpaired_seg.ops.similarity import soft_dice_per_class, soft_dice_per_sample


def _loop_dice(a, b, smooth):
  """Reference: explicit loops over every element of each sample, in float64."""
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  out = []
  for n in range(a.shape[0]):
    inter = total = 0.0
    for x, y in zip(a[n].ravel(), b[n].ravel()):
      inter += x * y
      total += x + y
    out.append((2.0 * inter + smooth) / (total + smooth))
  return np.asarray(out)


def test_hand_computed_value():
  # Sample 0: a has 2 pixels on, b has 1, overlapping in one -> 2 * 1 / (2 + 1) = 2/3 (channels
  # pooled: the second channel's pixel counts in the same sum). Sample 1: identical -> 1.
  a = np.zeros((2, 2, 2, 2), np.float32)
  b = np.zeros_like(a)
  a[0, 0, 0, 0] = a[0, 1, 1, 1] = 1.0
  b[0, 1, 1, 1] = 1.0
  a[1, 0, 1, 0] = b[1, 0, 1, 0] = 1.0
  np.testing.assert_allclose(soft_dice_per_sample(a, b), [2.0 / 3.0, 1.0], rtol=1e-6)


def test_soft_inputs_match_a_loop_reference():
  rng = np.random.default_rng(0)
  a = rng.uniform(size=(3, 4, 5, 2)).astype(np.float32)
  b = rng.uniform(size=(3, 4, 5, 2)).astype(np.float32)
  for smooth in (1e-12, 1.0):
    np.testing.assert_allclose(soft_dice_per_sample(a, b, smooth=smooth),
                               _loop_dice(a, b, smooth), rtol=1e-5)


def test_empty_samples_give_one_with_finite_gradient():
  a = jnp.zeros((2, 3, 3, 2))
  b = jnp.zeros((2, 3, 3, 2)).at[1, 0, 0, 0].set(1.0)
  for smooth in (0.0, 1e-12):
    dice = soft_dice_per_sample(a, b, smooth=smooth)
    np.testing.assert_allclose(dice, [1.0, 0.0], atol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(soft_dice_per_sample(x, b, smooth=smooth)))(a)
    assert np.all(np.isfinite(grad))


def test_symmetric_and_jit():
  rng = np.random.default_rng(1)
  a = rng.uniform(size=(2, 3, 3, 4)).astype(np.float32)
  b = rng.uniform(size=(2, 3, 3, 4)).astype(np.float32)
  f = jax.jit(soft_dice_per_sample)
  np.testing.assert_allclose(f(a, b), f(b, a), rtol=1e-6)
  assert f(a, b).shape == (2,)


def test_bad_inputs_raise_named_errors():
  with pytest.raises(ValueError, match="`a`.*`b`"):
    soft_dice_per_sample(jnp.zeros((2, 3, 3, 1)), jnp.zeros((2, 3, 3, 2)))
  with pytest.raises(ValueError, match="`a`"):
    soft_dice_per_sample(jnp.zeros((2,)), jnp.zeros((2,)))
  with pytest.raises(ValueError, match="smooth"):
    soft_dice_per_sample(jnp.zeros((2, 3)), jnp.zeros((2, 3)), smooth=-1.0)


def test_per_class_dice_matches_the_loop_reference_channel_by_channel():
  rng = np.random.default_rng(2)
  a = rng.uniform(size=(3, 4, 5, 2)).astype(np.float32)
  b = rng.uniform(size=(3, 4, 5, 2)).astype(np.float32)
  for smooth in (1e-6, 1.0):
    dice = soft_dice_per_class(a, b, smooth=smooth)
    assert dice.shape == (3, 2)
    for c in range(2):
      np.testing.assert_allclose(dice[:, c], _loop_dice(a[..., c:c + 1], b[..., c:c + 1], smooth),
                                 rtol=1e-5)


def test_per_class_dice_hand_computed_and_empty_channels():
  # Channel 0: a has 2 pixels, b 1 of them -> 2/3. Channel 1 empty in both -> 1 (smooth 0 too).
  a = np.zeros((1, 2, 2, 2), np.float32)
  b = np.zeros_like(a)
  a[0, 0, 0, 0] = a[0, 1, 1, 0] = 1.0
  b[0, 1, 1, 0] = 1.0
  for smooth in (0.0, 1e-6):
    np.testing.assert_allclose(soft_dice_per_class(a, b, smooth=smooth), [[2.0 / 3.0, 1.0]],
                               rtol=1e-5)
    grad = jax.grad(lambda x: jnp.sum(soft_dice_per_class(x, b, smooth=smooth)))(jnp.asarray(a))
    assert np.all(np.isfinite(grad))
  with pytest.raises(ValueError, match="`a`.*`b`"):
    soft_dice_per_class(jnp.zeros((2, 3, 3, 1)), jnp.zeros((2, 3, 3, 2)))
  with pytest.raises(ValueError, match="between batch and channel"):
    soft_dice_per_class(jnp.zeros((2, 3)), jnp.zeros((2, 3)))
