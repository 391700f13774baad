"""Tests of unpaired_seg.ops.sampling against hand-computed values and map_coordinates.

  python -m pytest -q tests/ops/test_sampling.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy import ndimage

from unpaired_seg.ops import sampling


def _ramp_image():
  """[2, 3, 2] image: channel 0 is 10 row + col, channel 1 its negative.

  A function that is bilinear in (row, col) is reproduced exactly by bilinear interpolation, so
  every value and derivative below can be written down by hand.
  """
  rows, cols = np.meshgrid(np.arange(2.0), np.arange(3.0), indexing="ij")
  ramp = 10 * rows + cols
  return jnp.asarray(np.stack([ramp, -ramp], axis=-1), jnp.float32)


def _map_coordinates_sample(image, coords, order=1):
  """Reference: map_coordinates per channel, mode='nearest'; coords [N, 2] -> [N, C]."""
  return jnp.stack(
      [ndimage.map_coordinates(image[..., c], [coords[:, 0], coords[:, 1]], order=order,
                               mode="nearest") for c in range(image.shape[-1])], axis=-1)


def test_bilinear_sample_hand_computed_values():
  image = _ramp_image()
  coords = jnp.asarray([
      [0.5, 0.5],    # mean of 0, 1, 10, 11
      [0.25, 1.5],   # 0.75 * 1.5 + 0.25 * 11.5
      [1.0, 2.0],    # the bottom-right pixel itself
      [0.0, 0.0],
      [-1.0, 5.0],   # outside: clamped to (0, 2)
      [3.0, 0.5],    # outside below: clamped to (1, 0.5)
  ])
  expected = np.array([5.5, 4.0, 12.0, 0.0, 2.0, 10.5])
  out = sampling.bilinear_sample(image, coords)
  assert out.shape == (6, 2)
  np.testing.assert_allclose(out[:, 0], expected, atol=1e-6)
  np.testing.assert_allclose(out[:, 1], -expected, atol=1e-6)


def test_bilinear_sample_hand_computed_coordinate_gradients():
  image = _ramp_image()

  def channel0(point):
    return sampling.bilinear_sample(image, point)[0]

  grad = jax.jit(jax.grad(channel0))
  # Inside, d/drow = 10 and d/dcol = 1 for the ramp 10 row + col.
  np.testing.assert_allclose(grad(jnp.asarray([0.3, 1.7])), [10.0, 1.0], atol=1e-5)
  # On the last row and column the derivative is the one-sided one towards the inside, not zero.
  np.testing.assert_allclose(grad(jnp.asarray([1.0, 2.0])), [10.0, 1.0], atol=1e-5)
  # Outside, the clamped coordinate has no gradient; the other one keeps its own.
  np.testing.assert_allclose(grad(jnp.asarray([-1.0, 0.5])), [0.0, 1.0], atol=1e-5)
  np.testing.assert_allclose(grad(jnp.asarray([5.0, 7.0])), [0.0, 0.0], atol=1e-5)


def test_bilinear_sample_matches_map_coordinates_values_and_gradients():
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.normal(size=(5, 6, 3)), jnp.float32)
  # Inside points (non-integer almost surely) and points well outside on every side.
  inside = jnp.asarray(rng.uniform(size=(40, 2)) * [4.0, 5.0], jnp.float32)
  anywhere = jnp.asarray(rng.uniform(-3.0, 9.0, size=(40, 2)), jnp.float32)
  coords = jnp.concatenate([inside, anywhere], axis=0)

  np.testing.assert_allclose(
      sampling.bilinear_sample(image, coords), _map_coordinates_sample(image, coords), atol=1e-5)

  weights = jnp.arange(1.0, 4.0)  # makes the scalar depend on every channel differently

  def ours(img, pts):
    return jnp.sum(sampling.bilinear_sample(img, pts) * weights)

  def reference(img, pts):
    return jnp.sum(_map_coordinates_sample(img, pts) * weights)

  # Gradient w.r.t. the image at every point; w.r.t. the coordinates inside, away from kinks.
  ours_grad = jax.jit(jax.grad(ours, argnums=(0, 1)))
  reference_grad = jax.jit(jax.grad(reference, argnums=(0, 1)))
  ours_image, ours_coords = ours_grad(image, inside)
  ref_image, ref_coords = reference_grad(image, inside)
  np.testing.assert_allclose(ours_image, ref_image, atol=1e-5)
  np.testing.assert_allclose(ours_coords, ref_coords, atol=1e-4)
  assert np.abs(ours_coords).min() > 0
  np.testing.assert_allclose(
      ours_grad(image, anywhere)[0], reference_grad(image, anywhere)[0], atol=1e-5)


def test_bilinear_sample_keeps_the_coordinate_batch_shape():
  image = _ramp_image()
  coords = jnp.zeros((4, 3, 5, 2))
  assert sampling.bilinear_sample(image, coords).shape == (4, 3, 5, 2)


def test_identity_grid_values_and_identity_sampling():
  grid = sampling.identity_grid(2, 3)
  expected = np.array([[[0, 0], [0, 1], [0, 2]], [[1, 0], [1, 1], [1, 2]]], np.float32)
  np.testing.assert_array_equal(grid, expected)
  assert grid.dtype == jnp.float32
  image = jnp.asarray(np.random.default_rng(1).normal(size=(4, 7, 2)), jnp.float32)
  np.testing.assert_allclose(
      sampling.bilinear_sample(image, sampling.identity_grid(4, 7)), image, atol=1e-6)


def test_warp_image_matches_per_item_sampling_and_a_hand_shift():
  rng = np.random.default_rng(2)
  image = jnp.asarray(rng.normal(size=(3, 4, 5, 2)), jnp.float32)
  coords = jnp.asarray(rng.uniform(-1.0, 6.0, size=(3, 4, 5, 2)), jnp.float32)
  warped = sampling.warp_image(image, coords)
  assert warped.shape == (3, 4, 5, 2)
  for b in range(3):
    np.testing.assert_allclose(
        warped[b], sampling.bilinear_sample(image[b], coords[b]), atol=1e-6)

  # Sampling one column to the right moves the content left; the last column is replicated.
  shifted = sampling.identity_grid(4, 5) + jnp.asarray([0.0, 1.0])
  out = sampling.warp_image(image, jnp.broadcast_to(shifted, (3, 4, 5, 2)))
  np.testing.assert_allclose(out[:, :, :4], image[:, :, 1:], atol=1e-6)
  np.testing.assert_allclose(out[:, :, 4], image[:, :, 4], atol=1e-6)


def test_nearest_sample_returns_only_present_labels_and_matches_map_coordinates():
  rng = np.random.default_rng(3)
  present = np.array([0, 3, 7], np.int32)
  labels = jnp.asarray(present[rng.integers(0, 3, size=(6, 5, 1))])
  coords = jnp.asarray(rng.uniform(-3.0, 8.0, size=(200, 2)), jnp.float32)
  ties = jnp.asarray([[0.5, 0.5], [1.5, 2.5], [4.5, 3.5], [2.0, 1.5], [-0.5, 4.5]])
  coords = jnp.concatenate([coords, ties], axis=0)
  out = sampling.nearest_sample(labels, coords)
  assert out.dtype == jnp.int32
  assert out.shape == (205, 1)
  assert set(np.unique(out)) <= set(present)
  np.testing.assert_array_equal(out, _map_coordinates_sample(labels, coords, order=0))
  # Hand-checked: (0.5, 0.5) rounds up to pixel (1, 1); (-0.5, 4.5) clamps to (0, 4).
  np.testing.assert_array_equal(out[200], labels[1, 1])
  np.testing.assert_array_equal(out[204], labels[0, 4])


@pytest.mark.parametrize(
    "function, image_shape, coords_shape, message",
    [
        (sampling.bilinear_sample, (4, 4), (3, 2), "image"),
        (sampling.bilinear_sample, (4, 4, 1), (3, 3), "coords"),
        (sampling.nearest_sample, (1, 4, 4, 1), (3, 2), "image"),
        (sampling.warp_image, (4, 4, 1), (4, 4, 2), "image"),
        (sampling.warp_image, (2, 4, 4, 1), (3, 4, 4, 2), "batch"),
        (sampling.warp_image, (2, 4, 4, 1), (2, 4, 4, 3), "coords"),
    ],
)
def test_bad_shapes_raise_value_errors_naming_the_argument(function, image_shape, coords_shape,
                                                           message):
  with pytest.raises(ValueError, match=message):
    function(jnp.zeros(image_shape), jnp.zeros(coords_shape))


def test_identity_grid_rejects_bad_sizes():
  with pytest.raises(ValueError, match="height"):
    sampling.identity_grid(0, 3)
  with pytest.raises(ValueError, match="width"):
    sampling.identity_grid(3, 2.5)
