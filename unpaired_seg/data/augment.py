"""On-device augmentation in jax.numpy: rotation, scaling and flips of 2D slices.

Images are resampled bilinearly, label maps with nearest neighbour, both with the SAME transform per
sample. Runs inside the jitted train step, so it costs no host time.
"""

import jax
import jax.numpy as jnp


def affine_coords(height: int, width: int, angle: jax.Array, scale: jax.Array,
                  mirror: jax.Array) -> jax.Array:
  """Backward sampling grid of a rotation by `angle` (radians), zoom `scale` and column mirror.

  Args:
    height, width: output size.
    angle: rotation of the content, radians.
    scale: zoom factor of the content (> 1 enlarges).
    mirror: +1 (none) or -1 (mirror left-right).

  Returns:
    [H, W, 2] (row, col) coordinates in the input at which each output pixel samples.
  """
  centre = jnp.array([(height - 1) / 2.0, (width - 1) / 2.0])
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                            jnp.arange(width, dtype=jnp.float32), indexing="ij")
  out = jnp.stack([rows, cols], axis=-1) - centre                 # [H, W, 2]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  # Backward map: rotate by -angle and divide by the scale, then mirror the columns.
  inverse = jnp.array([[cos, sin], [-sin, cos]]) / scale
  src = (out @ inverse.T) * jnp.array([1.0, 1.0]).at[1].set(mirror)
  return src + centre


def random_affine_coords(rng: jax.Array, height: int, width: int, *, rotate_deg: float,
                         scale: tuple[float, float], flip: bool) -> jax.Array:
  """`affine_coords` with angle, zoom and mirror drawn uniformly; returns [H, W, 2]."""
  k_rot, k_scale, k_flip = jax.random.split(rng, 3)
  angle = jnp.deg2rad(jax.random.uniform(k_rot, (), minval=-rotate_deg, maxval=rotate_deg))
  s = jax.random.uniform(k_scale, (), minval=scale[0], maxval=scale[1])
  mirror = jnp.where(flip & jax.random.bernoulli(k_flip), -1.0, 1.0)
  return affine_coords(height, width, angle, s, mirror)


def _sample(channel: jax.Array, coords: jax.Array, order: int) -> jax.Array:
  return jax.scipy.ndimage.map_coordinates(channel, [coords[..., 0], coords[..., 1]], order=order,
                                           mode="nearest")


def augment_batch(rng: jax.Array, image: jax.Array, label: jax.Array, *, rotate_deg: float,
                  scale: tuple[float, float], flip: bool) -> tuple[jax.Array, jax.Array]:
  """Applies one random transform per sample to images and labels alike.

  Args:
    rng: PRNG key.
    image: [B, H, W, C] float.
    label: [B, H, W] integer class map.
    rotate_deg: rotations uniform in [-rotate_deg, rotate_deg].
    scale: zoom uniform in [low, high].
    flip: whether to mirror left-right with probability 1/2.

  Returns:
    The augmented (image, label), same shapes and dtypes.
  """
  b, h, w, _ = image.shape
  coords = _batch_coords(rng, b, h, w, rotate_deg=rotate_deg, scale=scale, flip=flip)
  image_out = jax.vmap(_per_channel, in_axes=(0, 0, None))(image, coords, 1)
  label_out = jax.vmap(_sample, in_axes=(0, 0, None))(label.astype(jnp.float32), coords, 0)
  return image_out.astype(image.dtype), jnp.round(label_out).astype(label.dtype)


def augment_partners(rng: jax.Array, partners: jax.Array, *, rotate_deg: float,
                     scale: tuple[float, float], flip: bool) -> jax.Array:
  """Candidates [B, k, H, W, C] moved with the transform `augment_batch(rng, ...)` gives sample b.

  With the same `rng` and settings as the `augment_batch` call of their own slices, every partner
  candidate of slice b gets slice b's rotation, zoom and mirror: a pair's correspondence survives
  the augmentation (MMSDNet's `mmsdnet.augment_partners`).
  """
  b, _, h, w, _ = partners.shape
  coords = _batch_coords(rng, b, h, w, rotate_deg=rotate_deg, scale=scale, flip=flip)
  out = jax.vmap(lambda cands, c: jax.vmap(lambda x: _per_channel(x, c, 1))(cands))(
      partners, coords)
  return out.astype(partners.dtype)


def _batch_coords(rng, b, h, w, *, rotate_deg, scale, flip) -> jax.Array:
  keys = jax.random.split(rng, b)
  return jax.vmap(lambda k: random_affine_coords(k, h, w, rotate_deg=rotate_deg, scale=scale,
                                                 flip=flip))(keys)             # [B, H, W, 2]


_per_channel = jax.vmap(_sample, in_axes=(-1, None, None), out_axes=-1)
