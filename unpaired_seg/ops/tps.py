"""Thin-plate-spline (TPS) warps of 2D images, as the MMSDNet/DAFNet spatial transformer uses them.

Pure jax.numpy (no Flax). A TPS is the polyharmonic spline of order 2 in 2D,

  f(x) = sum_k w_k phi(|x - c_k|^2) + a_0 + a_1 x_row + a_2 x_col,  phi(r^2) = 0.5 r^2 log(r^2),

(phi = r^2 log r) fitted without regularisation so that f(c_k) = v_k at the control points c_k and
sum_k w_k = sum_k w_k c_k = 0. The spatial transformer predicts offsets of a regular 5x5 grid
on [0, 1]^2; the TPS through (grid, grid + offsets) is evaluated at every output pixel and gives
the point of the moving image that the pixel samples (a backward warp), followed by bilinear
sampling.

Coordinates are (row, col) throughout, normalised to [0, 1]^2 for the spline and in pixels
(normalised x (H - 1, W - 1)) for sampling; `sampling.bilinear_sample` takes (row, col), so no
swap to (x, y) is needed.

  python -m pytest -q tests/ops/test_tps.py
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from unpaired_seg.ops import sampling


def regular_control_grid(n: int = 5) -> jax.Array:
  """A regular n x n grid of control points covering [0, 1]^2, including the corners.

  Args:
    n: points per side, at least 2.

  Returns:
    [n * n, 2] float32 (row, col) points in row-major order: point i * n + j is (i, j) / (n - 1).
  """
  if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 2:
    raise ValueError(f"regular_control_grid: n must be an int >= 2, got {n!r}")
  axis = jnp.linspace(0.0, 1.0, int(n), dtype=jnp.float32)
  rows, cols = jnp.meshgrid(axis, axis, indexing="ij")
  return jnp.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1)


def tps_kernel(r_squared: jax.Array) -> jax.Array:
  """The TPS radial basis phi = 0.5 r^2 log(r^2) (= r^2 log r) of the SQUARED distance.

  phi(0) = 0, its limit. The derivative with respect to r^2, 0.5 (log r^2 + 1), diverges at 0,
  but its product with d(r^2)/dx = 2 (x - c), which is all that a gradient with respect to a
  point x or a centre c sees, tends to 0. The derivative at r^2 = 0 is therefore defined as 0,
  which makes those gradients exact and finite; the `where` guard keeps log(0) out of the
  computation altogether, since a masked-out -inf would still turn the gradient into NaN.

  Args:
    r_squared: squared distances, >= 0, any shape.

  Returns:
    phi(r_squared), same shape and dtype.
  """
  r_squared = jnp.asarray(r_squared)
  positive = r_squared > 0
  safe = jnp.where(positive, r_squared, jnp.ones_like(r_squared))
  return jnp.where(positive, 0.5 * r_squared * jnp.log(safe), jnp.zeros_like(r_squared))


def _kernel_matrix(points: jax.Array, control_points: jax.Array) -> jax.Array:
  """phi(|p_n - c_k|^2) as [N, K], from explicit differences.

  Unlike the expansion |p|^2 - 2 p.c + |c|^2, a sum of squared differences is never negative and is
  exactly 0 at a control point, where the kernel's guard applies.
  """
  difference = points[:, None, :] - control_points[None, :, :]  # [N, K, 2]
  return tps_kernel(jnp.sum(difference * difference, axis=-1))


def _affine_basis(points: jax.Array) -> jax.Array:
  """[N, 3] rows (1, row, col): the polynomial part P of the TPS system."""
  return jnp.concatenate([jnp.ones_like(points[:, :1]), points], axis=-1)


def _check_points(points: jax.Array, name: str, caller: str) -> None:
  if points.ndim != 2 or points.shape[-1] != 2:
    raise ValueError(f"{caller}: {name} must be [N, 2] (row, col), got shape {tuple(points.shape)}")


@jax.jit
def fit_tps(control_points: jax.Array, values: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Fits the interpolating thin-plate spline through (control_points, values), no regularisation.

  Solves the standard system [[Phi, P], [P^T, 0]] [w; a] = [v; 0], Phi_kl = phi(|c_k - c_l|^2),
  P = [1, row, col]. It is non-singular when the control points are distinct and not all on one
  line. One spline per output coordinate, both solved together. For a batch of value sets,
  `jax.vmap` it.

  Args:
    control_points: [K, 2] (row, col) points c_k, K >= 3.
    values: [K, 2] target values v_k (e.g. the displaced control points).

  Returns:
    (weights, affine): weights [K, 2] of the radial terms and affine [3, 2], the coefficients of
    (1, row, col).
  """
  control_points = jnp.asarray(control_points)
  values = jnp.asarray(values)
  _check_points(control_points, "control_points", "fit_tps")
  _check_points(values, "values", "fit_tps")
  num_points = control_points.shape[0]
  if num_points < 3:
    raise ValueError(f"fit_tps: control_points needs at least 3 points, got {num_points}")
  if values.shape[0] != num_points:
    raise ValueError(
        f"fit_tps: values {tuple(values.shape)} must match control_points "
        f"{tuple(control_points.shape)}")
  dtype = jnp.result_type(control_points, values)
  control_points = control_points.astype(dtype)
  values = values.astype(dtype)

  phi = _kernel_matrix(control_points, control_points)  # [K, K]
  basis = _affine_basis(control_points)  # [K, 3]
  system = jnp.block([[phi, basis], [basis.T, jnp.zeros((3, 3), dtype)]])  # [K + 3, K + 3]
  rhs = jnp.concatenate([values, jnp.zeros((3, 2), dtype)], axis=0)  # [K + 3, 2]
  solution = jnp.linalg.solve(system, rhs)
  return solution[:num_points], solution[num_points:]


@jax.jit
def evaluate_tps(points: jax.Array, control_points: jax.Array, weights: jax.Array,
                 affine: jax.Array) -> jax.Array:
  """Evaluates a fitted thin-plate spline at `points`.

  Args:
    points: [N, 2] (row, col) points.
    control_points: [K, 2] the control points it was fitted on.
    weights: [K, 2] radial weights from `fit_tps`.
    affine: [3, 2] affine coefficients from `fit_tps`.

  Returns:
    [N, 2] spline values.
  """
  points = jnp.asarray(points)
  control_points = jnp.asarray(control_points)
  _check_points(points, "points", "evaluate_tps")
  _check_points(control_points, "control_points", "evaluate_tps")
  weights = jnp.asarray(weights)
  affine = jnp.asarray(affine)
  if weights.shape != control_points.shape:
    raise ValueError(
        f"evaluate_tps: weights {tuple(weights.shape)} must match control_points "
        f"{tuple(control_points.shape)}")
  if affine.shape != (3, 2):
    raise ValueError(f"evaluate_tps: affine must be [3, 2], got shape {tuple(affine.shape)}")
  return _kernel_matrix(points, control_points) @ weights + _affine_basis(points) @ affine


@functools.partial(jax.jit, static_argnames=("height", "width"))
def thin_plate_spline_grid(control_points: jax.Array, displacements: jax.Array, height: int,
                           width: int) -> jax.Array:
  """The dense backward sampling grid of a batch of TPS warps, in pixel coordinates.

  The spline maps each control point c_k to c_k + d_k (normalised [0, 1]^2 coordinates). Output
  pixel p (normalised q = p / (H - 1, W - 1)) samples the moving image at
  grid[p] = f(q) * (H - 1, W - 1). The spline is fitted to the displacements d_k and added to q,
  which is the same map (a TPS reproduces affine maps, the identity included) but exact at zero
  displacement and free of the float32 rounding of re-creating q.

  Args:
    control_points: [K, 2] (row, col) control points on [0, 1]^2, e.g. `regular_control_grid()`.
    displacements: [B, K, 2] offsets added to the control points, normalised units, unbounded.
    height: H, output rows, >= 2.
    width: W, output columns, >= 2.

  Returns:
    [B, H, W, 2] (row, col) pixel coordinates into the moving image.
  """
  control_points = jnp.asarray(control_points)
  displacements = jnp.asarray(displacements)
  _check_points(control_points, "control_points", "thin_plate_spline_grid")
  if displacements.ndim != 3 or displacements.shape[1:] != control_points.shape:
    raise ValueError(
        f"thin_plate_spline_grid: displacements must be [B, K, 2] with K = "
        f"{control_points.shape[0]} control points, got shape {tuple(displacements.shape)}")
  for name, value in (("height", height), ("width", width)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 2:
      raise ValueError(f"thin_plate_spline_grid: {name} must be an int >= 2, got {value!r}")
  dtype = jnp.result_type(control_points, displacements, jnp.float32)
  control_points = control_points.astype(dtype)
  displacements = displacements.astype(dtype)

  height, width = int(height), int(width)
  scale = jnp.asarray([height - 1, width - 1], dtype)
  pixels = sampling.identity_grid(height, width).astype(dtype).reshape(-1, 2)  # [H * W, 2]
  points = pixels / scale  # [H * W, 2] on [0, 1]^2

  def one_grid(offsets):  # [K, 2] -> [H * W, 2]
    weights, affine = fit_tps(control_points, offsets)
    return evaluate_tps(points, control_points, weights, affine)

  # The kernel matrix of the points does not depend on the batch: vmap leaves it unbatched.
  moved = points + jax.vmap(one_grid)(displacements)  # [B, H * W, 2]
  return (moved * scale).reshape(displacements.shape[0], height, width, 2)


@jax.jit
def thin_plate_spline(image: jax.Array, displacements: jax.Array,
                      control_points: jax.Array | None = None) -> jax.Array:
  """Warps a batch of images with TPS warps given by control-point displacements (bilinear).

  With zero displacements the output is the input. Differentiable in `image` and
  `displacements`; under `jax.jit` it traces once per shape.

  Args:
    image: [B, H, W, C] moving images, H, W >= 2.
    displacements: [B, K, 2] (row, col) offsets of the control points, normalised [0, 1] units.
    control_points: [K, 2] control points on [0, 1]^2; default `regular_control_grid(5)` (K = 25).

  Returns:
    [B, H, W, C] warped images: output pixel p is the moving image at the TPS image of p.
  """
  image = jnp.asarray(image)
  if image.ndim != 4:
    raise ValueError(
        f"thin_plate_spline: image must be [B, H, W, C], got shape {tuple(image.shape)}")
  if control_points is None:
    control_points = regular_control_grid(5)
  control_points = jnp.asarray(control_points)
  displacements = jnp.asarray(displacements)
  if displacements.ndim != 3 or displacements.shape[0] != image.shape[0]:
    raise ValueError(
        f"thin_plate_spline: displacements must be [B, K, 2] with B = {image.shape[0]}, got shape "
        f"{tuple(displacements.shape)}")
  if control_points.ndim != 2 or displacements.shape[1:] != control_points.shape:
    raise ValueError(
        f"thin_plate_spline: displacements {tuple(displacements.shape)} do not match "
        f"control_points {tuple(control_points.shape)} (the default is the regular 5x5 grid, "
        f"K = 25)")
  grid = thin_plate_spline_grid(control_points, displacements, image.shape[1], image.shape[2])
  return sampling.warp_image(image, grid)
