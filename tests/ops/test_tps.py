"""Tests of unpaired_seg.ops.tps: identity, affine maps, an independent solve, gradients, jit.

  python -m pytest -q tests/ops/test_tps.py
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy import ndimage

from unpaired_seg.ops import sampling
from unpaired_seg.ops import tps


def _normal(seed, shape):
  """Seeded float32 normal samples from numpy (no per-shape compile, unlike jax.random)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _numpy_tps(control_points, values, queries):
  """Independent float64 TPS: kernel r^2 log r on the distance r, system solved with numpy.

  Returns (weights [K, 2], affine [3, 2], interpolant at queries [N, 2]).
  """
  c = np.asarray(control_points, np.float64)
  v = np.asarray(values, np.float64)
  k = len(c)

  def u(r):
    return 0.0 if r == 0 else r * r * np.log(r)

  system = np.zeros((k + 3, k + 3))
  for i in range(k):
    for j in range(k):
      system[i, j] = u(np.hypot(*(c[i] - c[j])))
    system[i, k:] = (1.0, c[i, 0], c[i, 1])
    system[k:, i] = (1.0, c[i, 0], c[i, 1])
  rhs = np.zeros((k + 3, 2))
  rhs[:k] = v
  solution = np.linalg.solve(system, rhs)
  weights, affine = solution[:k], solution[k:]

  out = np.zeros((len(queries), 2))
  for n, q in enumerate(np.asarray(queries, np.float64)):
    out[n] = affine[0] + affine[1] * q[0] + affine[2] * q[1]
    for i in range(k):
      out[n] += weights[i] * u(np.hypot(*(q - c[i])))
  return weights, affine, out


def _affine_displacements(control_points, matrix, translation):
  """Offsets d_k with c_k + d_k = matrix @ c_k + translation, as [1, K, 2]."""
  return (control_points @ matrix.T + translation - control_points)[None]


def test_regular_control_grid_is_row_major_on_the_unit_square():
  grid = tps.regular_control_grid(3)
  expected = np.array([[0, 0], [0, 0.5], [0, 1], [0.5, 0], [0.5, 0.5], [0.5, 1], [1, 0], [1, 0.5],
                       [1, 1]], np.float32)
  np.testing.assert_allclose(grid, expected, atol=1e-7)
  assert tps.regular_control_grid().shape == (25, 2)
  np.testing.assert_allclose(tps.regular_control_grid()[6], [0.25, 0.25], atol=1e-7)
  with pytest.raises(ValueError, match="n must be"):
    tps.regular_control_grid(1)


def test_tps_kernel_values_and_gradient_at_zero():
  r_squared = jnp.asarray([0.0, 1.0, 4.0, np.e, 0.25])
  # 0.5 r^2 log r^2 = r^2 log r: 0, 0, 4 log 2, e / 2, 0.25 log 0.5.
  expected = [0.0, 0.0, 4 * np.log(2.0), np.e / 2, 0.25 * np.log(0.5)]
  np.testing.assert_allclose(tps.tps_kernel(r_squared), expected, rtol=1e-6, atol=1e-7)

  centre = jnp.asarray([0.3, 0.6])

  def radial(point):
    return tps.tps_kernel(jnp.sum((point - centre) ** 2))

  # At the centre the true gradient (log r^2 + 1)(x - c) tends to 0: finite, not NaN.
  at_centre = jax.grad(radial)(centre)
  assert np.all(np.isfinite(at_centre))
  np.testing.assert_allclose(at_centre, [0.0, 0.0], atol=1e-7)
  assert np.isfinite(jax.grad(tps.tps_kernel)(0.0))
  # Away from it, the analytic gradient.
  point = jnp.asarray([0.5, 0.1])
  offset = np.asarray(point - centre, np.float64)
  analytic = (np.log(np.sum(offset ** 2)) + 1) * offset
  np.testing.assert_allclose(jax.grad(radial)(point), analytic, rtol=1e-5)


def test_fit_and_evaluate_match_an_independent_numpy_solve():
  rng = np.random.default_rng(0)
  # Well-spread but irregular control points: a jittered 3x4 grid.
  rows, cols = np.meshgrid(np.linspace(0, 1, 3), np.linspace(0, 1, 4), indexing="ij")
  control_points = np.stack([rows.ravel(), cols.ravel()], -1) + rng.uniform(-0.1, 0.1, (12, 2))
  values = control_points + rng.normal(0.0, 0.1, (12, 2))
  queries = rng.uniform(-0.2, 1.2, (30, 2))

  ref_weights, ref_affine, ref_values = _numpy_tps(control_points, values, queries)
  weights, affine = tps.fit_tps(jnp.asarray(control_points, jnp.float32),
                                jnp.asarray(values, jnp.float32))
  assert weights.shape == (12, 2) and affine.shape == (3, 2)
  np.testing.assert_allclose(weights, ref_weights, rtol=1e-3, atol=1e-3)
  np.testing.assert_allclose(affine, ref_affine, rtol=1e-3, atol=1e-3)
  control_points = jnp.asarray(control_points, jnp.float32)
  out = tps.evaluate_tps(jnp.asarray(queries, jnp.float32), control_points, weights, affine)
  np.testing.assert_allclose(out, ref_values, atol=1e-4)
  # It interpolates: the control points map to their values.
  at_controls = tps.evaluate_tps(control_points, control_points, weights, affine)
  np.testing.assert_allclose(at_controls, values, atol=1e-5)


def test_zero_displacement_is_the_identity():
  control_points = tps.regular_control_grid()
  grid = tps.thin_plate_spline_grid(control_points, jnp.zeros((2, 25, 2)), 7, 9)
  assert grid.shape == (2, 7, 9, 2)
  np.testing.assert_allclose(grid[0], sampling.identity_grid(7, 9), atol=1e-4)
  np.testing.assert_allclose(grid[1], sampling.identity_grid(7, 9), atol=1e-4)
  image = _normal(0, (2, 7, 9, 3))
  np.testing.assert_allclose(tps.thin_plate_spline(image, jnp.zeros((2, 25, 2))), image, atol=1e-6)


def test_affine_displacements_reproduce_the_affine_map_at_every_pixel():
  control_points = tps.regular_control_grid()
  matrix = jnp.asarray([[1.1, 0.2], [-0.15, 0.9]])
  translation = jnp.asarray([0.05, -0.07])
  displacements = _affine_displacements(control_points, matrix, translation)
  height, width = 11, 13
  grid = tps.thin_plate_spline_grid(control_points, displacements, height, width)

  scale = np.array([height - 1, width - 1], np.float64)
  expected = np.zeros((height, width, 2))
  for i in range(height):
    for j in range(width):
      q = np.array([i, j]) / scale
      expected[i, j] = (np.asarray(matrix) @ q + np.asarray(translation)) * scale
  np.testing.assert_allclose(grid[0], expected, atol=1e-3)
  # The radial part vanishes for an affine map.
  weights, _ = tps.fit_tps(control_points, control_points + displacements[0])
  np.testing.assert_allclose(weights, np.zeros((25, 2)), atol=1e-4)


def test_one_displaced_control_point_moves_its_own_pixel_exactly():
  # On a 9x9 image the 5x5 control grid sits on pixels 0, 2, 4, 6, 8.
  displacements = jnp.zeros((1, 25, 2)).at[0, 12].set(jnp.asarray([0.1, -0.05]))
  grid = tps.thin_plate_spline_grid(tps.regular_control_grid(), displacements, 9, 9)
  np.testing.assert_allclose(grid[0, 4, 4], [4 + 0.8, 4 - 0.4], atol=1e-4)
  for i, j in [(0, 0), (2, 6), (8, 8), (6, 4)]:  # other control points stay where they are
    np.testing.assert_allclose(grid[0, i, j], [i, j], atol=1e-4)
  assert np.abs(np.asarray(grid[0, 3, 3]) - [3, 3]).max() > 1e-2  # and the pixels between move


def test_translation_by_one_pixel_samples_the_next_row():
  height, width = 6, 5
  image = _normal(1, (1, height, width, 2))
  displacements = jnp.broadcast_to(jnp.asarray([1.0 / (height - 1), 0.0]), (1, 25, 2))
  warped = tps.thin_plate_spline(image, displacements)
  # Backward warp: output row r shows moving row r + 1; the last row is the replicated edge.
  np.testing.assert_allclose(warped[:, :-1], image[:, 1:], atol=1e-4)
  np.testing.assert_allclose(warped[:, -1], image[:, -1], atol=1e-4)


def _smooth_image(batch, height, width):
  rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  image = np.stack([np.sin(0.7 * rows + 0.3 * cols), np.cos(0.2 * rows - 0.9 * cols)], axis=-1)
  return jnp.asarray(np.broadcast_to(image, (batch, height, width, 2)), jnp.float32)


def _warp_loss(displacements, image, pixel_weights):
  return jnp.sum(tps.thin_plate_spline(image, displacements) * pixel_weights)


# One compiled gradient shared by the tests below (same shapes), which keeps the file fast.
_warp_loss_grad = jax.jit(jax.grad(_warp_loss, argnums=(0, 1)))
_IMAGE_SHAPE = (2, 8, 10, 2)


@pytest.mark.parametrize("scale", [0.0, 0.05])
def test_gradients_are_finite_and_non_zero(scale):
  image = _smooth_image(*_IMAGE_SHAPE[:3])
  displacements = scale * _normal(2, (2, 25, 2))
  pixel_weights = _normal(3, image.shape)
  grad_disp, grad_image = _warp_loss_grad(displacements, image, pixel_weights)
  for grad in (grad_disp, grad_image):
    assert np.all(np.isfinite(grad))
    assert np.abs(grad).max() > 1e-3
  # Each batch item gets its own gradient.
  assert np.abs(grad_disp[0]).max() > 1e-3 and np.abs(grad_disp[1]).max() > 1e-3


def test_gradient_with_respect_to_control_points_is_finite_where_pixels_sit_on_them():
  # On a 9x9 image every control point of the 5x5 grid is a pixel: r = 0 in the kernel there.
  image = _smooth_image(1, 9, 9)
  displacements = 0.05 * _normal(10, (1, 25, 2))

  def loss(control_points):
    return jnp.sum(tps.thin_plate_spline(image, displacements, control_points) ** 2)

  grad = jax.jit(jax.grad(loss))(tps.regular_control_grid())
  assert np.all(np.isfinite(grad))
  assert np.abs(grad).max() > 1e-3


def test_displacement_gradient_matches_a_map_coordinates_warp():
  """The chain rule through the grid: an independent sampler and a finite difference agree."""
  batch, height, width = _IMAGE_SHAPE[:3]
  image = _smooth_image(batch, height, width)
  control_points = tps.regular_control_grid()
  displacements = 0.05 * _normal(4, (batch, 25, 2))
  pixel_weights = _normal(5, image.shape)

  @jax.jit
  @jax.value_and_grad
  def reference(disp):
    grid = tps.thin_plate_spline_grid(control_points, disp, height, width)
    warped = jnp.stack([
        jnp.stack([ndimage.map_coordinates(image[b, ..., c], [grid[b, ..., 0], grid[b, ..., 1]],
                                           order=1, mode="nearest") for c in range(2)], -1)
        for b in range(batch)])
    return jnp.sum(warped * pixel_weights)

  ref_value, ref_grad = reference(displacements)
  np.testing.assert_allclose(_warp_loss(displacements, image, pixel_weights), ref_value, rtol=1e-5)
  np.testing.assert_allclose(_warp_loss_grad(displacements, image, pixel_weights)[0], ref_grad,
                             rtol=1e-3, atol=1e-3)

  # The grid is linear in the displacements, so a central difference is exact up to rounding.
  direction = _normal(6, displacements.shape)

  def grid_of(disp):
    return tps.thin_plate_spline_grid(control_points, disp, height, width)

  _, tangent = jax.jit(lambda d, v: jax.jvp(grid_of, (d,), (v,)))(displacements, direction)
  step = 0.1
  difference = (grid_of(displacements + step * direction) -
                grid_of(displacements - step * direction)) / (2 * step)
  np.testing.assert_allclose(tangent, difference, atol=1e-3)
  assert np.abs(tangent).max() > 0.1


def test_jitted_warp_traces_once():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def warp(image, displacements):
    return tps.thin_plate_spline(image, displacements)

  try:
    image = jnp.ones((2, 6, 7, 1))
    first = warp(image, jnp.zeros((2, 25, 2)))
    second = warp(_smooth_image(2, 6, 7)[..., :1],
                  0.03 * _normal(7, (2, 25, 2)))
    assert first.shape == second.shape == (2, 6, 7, 1)
    np.testing.assert_allclose(first, image, atol=1e-6)
  finally:
    chex.clear_trace_counter()


def test_vmap_over_an_extra_batch_axis_matches_the_batched_call():
  image = _normal(8, (3, 2, 6, 7, 2))
  displacements = 0.05 * _normal(9, (3, 2, 25, 2))
  mapped = jax.vmap(tps.thin_plate_spline)(image, displacements)
  flat = tps.thin_plate_spline(image.reshape(6, 6, 7, 2), displacements.reshape(6, 25, 2))
  np.testing.assert_allclose(mapped, flat.reshape(3, 2, 6, 7, 2), atol=1e-5)


def test_custom_control_points():
  control_points = tps.regular_control_grid(3)
  image = _smooth_image(1, 5, 5)
  displacements = jnp.zeros((1, 9, 2))
  np.testing.assert_allclose(tps.thin_plate_spline(image, displacements, control_points), image,
                             atol=1e-6)


def test_bad_inputs_raise_value_errors_naming_the_argument():
  image = jnp.zeros((2, 6, 6, 1))
  with pytest.raises(ValueError, match="control_points"):
    tps.thin_plate_spline(image, jnp.zeros((2, 16, 2)))  # K = 16 against the default 25
  with pytest.raises(ValueError, match="image"):
    tps.thin_plate_spline(jnp.zeros((6, 6, 1)), jnp.zeros((1, 25, 2)))
  with pytest.raises(ValueError, match="displacements"):
    tps.thin_plate_spline(image, jnp.zeros((3, 25, 2)))
  with pytest.raises(ValueError, match="height"):
    tps.thin_plate_spline_grid(tps.regular_control_grid(), jnp.zeros((1, 25, 2)), 1, 6)
  with pytest.raises(ValueError, match="values"):
    tps.fit_tps(tps.regular_control_grid(), jnp.zeros((24, 2)))
  with pytest.raises(ValueError, match="at least 3"):
    tps.fit_tps(jnp.zeros((2, 2)), jnp.zeros((2, 2)))
  with pytest.raises(ValueError, match="affine"):
    tps.evaluate_tps(jnp.zeros((4, 2)), tps.regular_control_grid(), jnp.zeros((25, 2)),
                     jnp.zeros((2, 2)))
