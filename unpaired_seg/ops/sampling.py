"""Bilinear and nearest-neighbour sampling of 2D images at arbitrary pixel coordinates.

Pure jax.numpy (no Flax). Coordinates are (row, col) in PIXEL units: (0, 0) is the centre of the
top-left pixel and (H - 1, W - 1) the centre of the bottom-right one. Points outside the
image take the value of the nearest edge pixel (replicate padding), the behaviour of
`jax.scipy.ndimage.map_coordinates(..., mode='nearest')`.

The samplers are written with plain gathers rather than with `map_coordinates`, so that the gradient
with respect to the coordinates is explicit (see `bilinear_sample`).

  python -m pytest -q tests/ops/test_sampling.py
"""

import jax
import jax.numpy as jnp
import numpy as np


def _check_image_and_coords(image: jax.Array, coords: jax.Array, name: str) -> None:
  """Raises ValueError when `image` is not [H, W, C] or `coords` is not [..., 2]."""
  if image.ndim != 3:
    raise ValueError(
        f"{name}: image must be [H, W, C], got shape {tuple(image.shape)}")
  if image.shape[0] < 1 or image.shape[1] < 1:
    raise ValueError(f"{name}: image must not be empty, got shape {tuple(image.shape)}")
  if coords.ndim < 1 or coords.shape[-1] != 2:
    raise ValueError(
        f"{name}: coords must be [..., 2] (row, col), got shape {tuple(coords.shape)}")


def _clamp(x: jax.Array, upper: int) -> jax.Array:
  """Clamps `x` to [0, upper] with a gradient of 1 inside (edges included) and 0 outside.

  `jnp.clip` splits the gradient at a tie (0.5 each way), which would halve the gradient of a
  coordinate that sits exactly on the last row or column, where every identity grid has points.
  """
  x = jnp.where(x < 0, jnp.zeros_like(x), x)
  return jnp.where(x > upper, jnp.full_like(x, upper), x)


def _linear_neighbours(x: jax.Array, size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Neighbouring indices and the fraction between them along one axis of length `size`.

  The lower index is at most size - 2 so that a coordinate on the last pixel interpolates between
  the last two pixels with fraction 1: its derivative is then the one-sided difference towards the
  inside instead of zero, and identity-grid points on the bottom and right edges still pass
  gradients.

  Returns:
    (lower, upper, fraction): int32 indices in [0, size - 1] and the weight of `upper`, in [0, 1].
  """
  x = _clamp(x, size - 1)
  lower = jnp.clip(jnp.floor(x), 0, max(size - 2, 0))
  fraction = x - lower
  lower = lower.astype(jnp.int32)
  upper = jnp.minimum(lower + 1, size - 1)
  return lower, upper, fraction


@jax.jit
def bilinear_sample(image: jax.Array, coords: jax.Array) -> jax.Array:
  """Samples `image` at real-valued pixel coordinates by bilinear interpolation.

  Border handling: coordinates are clamped to [0, H - 1] x [0, W - 1] (replicate padding), so a
  point outside the image takes the value of the nearest edge point and its gradient with respect
  to the clamped coordinate is zero. The values equal those of
  `jax.scipy.ndimage.map_coordinates(order=1, mode='nearest')`, inside the image and out.

  Gradients: with respect to `image`, the bilinear weights; with respect to `coords`, the
  derivative of the bilinear interpolant. At an integer coordinate (where the interpolant has a
  kink) this is the forward difference, except on the last row or column where it is the backward
  difference.

  Args:
    image: [H, W, C] image, any float dtype.
    coords: [..., 2] (row, col) pixel coordinates.

  Returns:
    [..., C] samples, in the dtype that `image` and `coords` promote to.
  """
  image = jnp.asarray(image)
  coords = jnp.asarray(coords)
  _check_image_and_coords(image, coords, "bilinear_sample")
  if not jnp.issubdtype(coords.dtype, jnp.floating):
    coords = coords.astype(jnp.float32)  # integer coordinates would make integer fractions
  height, width, channels = image.shape
  batch_shape = coords.shape[:-1]
  flat = coords.reshape(-1, 2)  # [N, 2]

  row0, row1, row_fraction = _linear_neighbours(flat[:, 0], height)
  col0, col1, col_fraction = _linear_neighbours(flat[:, 1], width)
  row_fraction = row_fraction[:, None]  # [N, 1], broadcasts over channels
  col_fraction = col_fraction[:, None]

  top = image[row0, col0] * (1 - col_fraction) + image[row0, col1] * col_fraction  # [N, C]
  bottom = image[row1, col0] * (1 - col_fraction) + image[row1, col1] * col_fraction
  samples = top * (1 - row_fraction) + bottom * row_fraction
  return samples.reshape(*batch_shape, channels)


@jax.jit
def nearest_sample(image: jax.Array, coords: jax.Array) -> jax.Array:
  """Samples `image` at the pixel nearest to each coordinate; for label maps.

  Coordinates are rounded half up (floor(x + 0.5)), then clamped into the image (replicate
  padding), so the output holds only values present in `image` and keeps its dtype. This equals
  `jax.scipy.ndimage.map_coordinates(order=0, mode='nearest')`. There is no useful gradient with
  respect to `coords` (rounding); use it on labels, not on what a loss must move.

  Args:
    image: [H, W, C] image or label map, any dtype.
    coords: [..., 2] (row, col) pixel coordinates.

  Returns:
    [..., C] samples with the dtype of `image`.
  """
  image = jnp.asarray(image)
  coords = jnp.asarray(coords)
  _check_image_and_coords(image, coords, "nearest_sample")
  height, width, channels = image.shape
  batch_shape = coords.shape[:-1]
  flat = jnp.floor(coords.reshape(-1, 2) + 0.5).astype(jnp.int32)  # [N, 2]
  rows = jnp.clip(flat[:, 0], 0, height - 1)
  cols = jnp.clip(flat[:, 1], 0, width - 1)
  return image[rows, cols].reshape(*batch_shape, channels)


def identity_grid(height: int, width: int) -> jax.Array:
  """The (row, col) pixel coordinates of every pixel: sampling there returns the image unchanged.

  Args:
    height: number of rows H, a positive int.
    width: number of columns W, a positive int.

  Returns:
    [H, W, 2] float32 grid with grid[i, j] = (i, j).
  """
  for name, value in (("height", height), ("width", width)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise ValueError(f"identity_grid: {name} must be a positive int, got {value!r}")
  height, width = int(height), int(width)
  rows, cols = jnp.meshgrid(
      jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32), indexing="ij")
  return jnp.stack([rows, cols], axis=-1)


@jax.jit
def warp_image(image: jax.Array, coords: jax.Array) -> jax.Array:
  """Backward warp of a batch: output pixel p of item b is `image[b]` sampled at `coords[b, p]`.

  Args:
    image: [B, H, W, C] moving images.
    coords: [B, H', W', 2] (row, col) pixel coordinates into each moving image (usually H' = H,
      W' = W); any [B, ..., 2] works.

  Returns:
    [B, H', W', C] bilinearly sampled images.
  """
  image = jnp.asarray(image)
  coords = jnp.asarray(coords)
  if image.ndim != 4:
    raise ValueError(f"warp_image: image must be [B, H, W, C], got shape {tuple(image.shape)}")
  if coords.ndim < 2 or coords.shape[-1] != 2:
    raise ValueError(
        f"warp_image: coords must be [B, H, W, 2] (row, col), got shape {tuple(coords.shape)}")
  if coords.shape[0] != image.shape[0]:
    raise ValueError(
        f"warp_image: batch sizes differ: image {tuple(image.shape)}, coords {tuple(coords.shape)}")
  return jax.vmap(bilinear_sample)(image, coords)
