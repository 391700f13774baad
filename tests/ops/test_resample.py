"""The matmul/reshape lowerings compute what flax's max_pool and ConvTranspose compute."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unpaired_seg.nn.layers import UpConv
from unpaired_seg.ops import resample


def _random(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("shape,window", [((2, 8, 6, 3), (2, 2)), ((2, 9, 7, 3), (2, 2)),
                                          ((1, 4, 6, 8, 2), (2, 2, 2)), ((2, 8, 6, 3), (1, 2))])
def test_max_pool_equals_flax_values_and_gradients(shape, window):
  x = _random(shape)
  expected = nn.max_pool(x, window, strides=window, padding="VALID")
  np.testing.assert_array_equal(resample.max_pool(x, window), expected)
  # Continuous random inputs: every window's maximum is unique, so the gradients agree exactly.
  weights = _random(expected.shape, seed=1)
  grad_ours = jax.grad(lambda v: jnp.sum(weights * resample.max_pool(v, window)))(x)
  grad_flax = jax.grad(lambda v: jnp.sum(
      weights * nn.max_pool(v, window, strides=window, padding="VALID")))(x)
  np.testing.assert_array_equal(grad_ours, grad_flax)


def test_max_pool_hand_example_and_ties():
  x = jnp.asarray([[1., 5., 2., 2.], [3., 4., 2., 2.]]).reshape(1, 2, 4, 1)
  np.testing.assert_array_equal(resample.max_pool(x, (2, 2)).reshape(-1), [5., 2.])
  # A tied window shares the gradient evenly; the gradient's total per window is kept.
  g = jax.grad(lambda v: jnp.sum(resample.max_pool(v, (2, 2))))(x).reshape(2, 4)
  np.testing.assert_allclose(g, [[0, 1, .25, .25], [0, 0, .25, .25]])


def test_max_pool_rejects_bad_windows():
  with pytest.raises(ValueError, match="spatial axes"):
    resample.max_pool(jnp.zeros((1, 4, 4, 1)), (2,))
  with pytest.raises(ValueError, match="larger"):
    resample.max_pool(jnp.zeros((1, 1, 4, 1)), (2, 2))


def test_depth_to_space_hand_example():
  # One 1 x 1 cell with a 2 x 2 window of sub-pixels 0..3 becomes the 2 x 2 image [[0, 1], [2, 3]].
  x = jnp.arange(4.0).reshape(1, 1, 1, 2, 2, 1)
  np.testing.assert_array_equal(resample.depth_to_space(x, (2, 2))[0, ..., 0], [[0, 1], [2, 3]])


@pytest.mark.parametrize("shape,window,features", [((2, 4, 5, 3), (2, 2), 6),
                                                   ((1, 3, 2, 4, 2), (2, 2, 2), 3)])
def test_upconv_equals_conv_transpose(shape, window, features):
  x = _random(shape)
  reference = nn.ConvTranspose(features, window, strides=window)
  ours = UpConv(features, window)
  ref_vars = reference.init(jax.random.key(3), x)
  our_vars = ours.init(jax.random.key(3), x)
  # Same variables: names, shapes and (same seed) values, so checkpoints and seeds carry over.
  jax.tree.map(np.testing.assert_array_equal, ref_vars, our_vars)
  assert jax.tree.structure(ref_vars) == jax.tree.structure(our_vars)
  bias = _random((features,), seed=2)
  variables = {"params": {**ref_vars["params"], "bias": bias}}
  np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x),
                             rtol=1e-5, atol=1e-5)

  def loss(module, v, inp):
    return jnp.sum(jnp.sin(module.apply(v, inp)))
  grads_ours = jax.grad(lambda v, i: loss(ours, v, i), argnums=(0, 1))(variables, x)
  grads_ref = jax.grad(lambda v, i: loss(reference, v, i), argnums=(0, 1))(variables, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               grads_ours, grads_ref)


def test_transposed_conv_rejects_mismatched_channels():
  with pytest.raises(ValueError, match="does not match kernel"):
    resample.transposed_conv_stride_equal(jnp.zeros((1, 2, 2, 3)), jnp.zeros((2, 2, 4, 5)))
