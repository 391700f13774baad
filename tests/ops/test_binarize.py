"""Tests of unpaired_seg.ops.binarize: exact 0/1 forward, identity gradient backward.

  python -m pytest -q tests/ops/test_binarize.py
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unpaired_seg.ops import binarize


def _probabilities(seed, shape):
  """Seeded softmax probabilities [..., C] from numpy logits."""
  logits = np.random.default_rng(seed).normal(size=shape) * 2.0
  return jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)


def _loop_round(p):
  """Reference: each entry compared with 0.5 in a loop (0.5 itself goes to 0, half-to-even)."""
  p = np.asarray(p)
  out = np.zeros_like(p)
  for index in itertools.product(*(range(n) for n in p.shape)):
    out[index] = 1.0 if p[index] > 0.5 else 0.0
  return out


def _loop_onehot(p):
  """Reference: per pixel, the first channel holding the largest value gets the one."""
  p = np.asarray(p)
  out = np.zeros_like(p)
  for index in itertools.product(*(range(n) for n in p.shape[:-1])):
    row = p[index]
    best = 0
    for c in range(1, len(row)):
      if row[c] > row[best]:
        best = c
    out[index + (best,)] = 1.0
  return out


def test_round_forward_is_exactly_per_channel_rounding():
  p = _probabilities(0, (2, 3, 4, 5))
  out = binarize.straight_through_round(p)
  assert out.dtype == p.dtype and out.shape == p.shape
  np.testing.assert_array_equal(np.asarray(out), _loop_round(p))
  assert set(np.unique(np.asarray(out))) <= {0.0, 1.0}


def test_round_pixel_with_every_probability_below_half_is_all_zero():
  p = jnp.asarray([[0.3, 0.3, 0.4], [0.1, 0.8, 0.1], [0.5, 0.25, 0.25]], jnp.float32)
  out = np.asarray(binarize.straight_through_round(p))
  np.testing.assert_array_equal(out, [[0, 0, 0], [0, 1, 0], [0, 0, 0]])


def test_round_is_exact_for_tiny_and_near_one_values():
  p = jnp.asarray([1e-8, 1e-30, 0.49999997, 0.50000006, 1.0 - 6e-8, 1.0], jnp.float32)
  np.testing.assert_array_equal(np.asarray(binarize.straight_through_round(p)),
                                [0, 0, 0, 1, 1, 1])


def test_onehot_is_exact_for_large_scores():
  # In float32, 1e8 + (1 - 1e8) is 0: the output must still be exactly one-hot.
  p = jnp.asarray([[1e8, 3.0, -1e8], [-5e7, 2e8, 0.0]], jnp.float32)
  np.testing.assert_array_equal(np.asarray(binarize.straight_through_onehot_argmax(p)),
                                [[1, 0, 0], [0, 1, 0]])


def test_onehot_forward_has_exactly_one_one_per_pixel_at_the_argmax():
  p = _probabilities(1, (2, 3, 4, 6))
  out = np.asarray(binarize.straight_through_onehot_argmax(p))
  np.testing.assert_array_equal(out, _loop_onehot(p))
  np.testing.assert_array_equal(out.sum(-1), np.ones(p.shape[:-1]))


def test_onehot_ties_go_to_the_first_channel_and_other_axes_work():
  p = jnp.asarray([[0.25, 0.25, 0.25, 0.25], [0.1, 0.45, 0.45, 0.0]], jnp.float32)
  np.testing.assert_array_equal(np.asarray(binarize.straight_through_onehot_argmax(p)),
                                [[1, 0, 0, 0], [0, 1, 0, 0]])
  # Channels first: axis 0.
  out = binarize.straight_through_onehot_argmax(p.T, axis=0)
  np.testing.assert_array_equal(np.asarray(out), [[1, 0], [0, 1], [0, 0], [0, 0]])


@pytest.mark.parametrize("mode", binarize.BINARIZE_MODES)
def test_gradient_is_the_identity(mode):
  p = _probabilities(2, (2, 4, 4, 5))
  w = jnp.asarray(np.random.default_rng(3).normal(size=p.shape), jnp.float32)
  grad = jax.jit(jax.grad(lambda q: jnp.sum(w * binarize.binarize(q, mode))))(p)
  np.testing.assert_array_equal(np.asarray(grad), np.asarray(w))


def test_binarize_dispatches_by_name_and_jits():
  p = _probabilities(4, (3, 7))
  f = jax.jit(binarize.binarize, static_argnames="mode")
  np.testing.assert_array_equal(np.asarray(f(p, mode="round")), _loop_round(p))
  np.testing.assert_array_equal(np.asarray(f(p, mode="onehot_argmax")), _loop_onehot(p))


def test_bad_inputs_raise_named_errors():
  with pytest.raises(ValueError, match="mode"):
    binarize.binarize(jnp.zeros((2, 3)), "argmax")
  with pytest.raises(ValueError, match="floating"):
    binarize.straight_through_round(jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="scalar"):
    binarize.straight_through_onehot_argmax(jnp.float32(0.3))
  with pytest.raises(ValueError, match="axis"):
    binarize.straight_through_onehot_argmax(jnp.zeros((2, 3)), axis=2)
