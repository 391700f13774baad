"""On-device augmentation in jax.numpy: nnU-Net's transforms of 2D slices and their label maps.

Spatial transforms (rotation, scaling, optional elastic deformation, mirroring) move image and label
with the SAME sampling grid per sample: images are resampled bilinearly, label maps with nearest
neighbour. Intensity transforms (`intensity.py`) then change the image only. Each transform is applied
to a sample with its own probability, parameters are drawn per sample, and every random choice is a
drawn Bernoulli under `jnp.where`, so the jitted train step traces once. It runs inside that step and
costs no host time.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from unpaired_seg.data import intensity as intensity_lib
from unpaired_seg.data import randomize as randomize_lib


@dataclasses.dataclass(frozen=True)
class Settings:
  """The `data.augment` section, minus `enabled`, as a hashable value (a static jit argument)."""
  rotate_deg: float
  p_rotate: float
  scale: tuple[float, float]
  p_scale: float
  elastic: bool
  p_elastic: float
  elastic_alpha: tuple[float, float]
  elastic_sigma: tuple[float, float]
  mirror_axes: tuple[int, ...]        # 0: rows (up-down), 1: columns (left-right)
  p_mirror: float
  intensity: intensity_lib.IntensitySettings
  # Intensity randomisation of labelled samples (`data.augment.intensity`, randomize.py).
  randomize: randomize_lib.RandomizeSettings = randomize_lib.RandomizeSettings()

  @classmethod
  def from_config(cls, aug) -> "Settings":
    """From `config.data.augment`; the legacy `flip=True` is mirror axis 1 (left-right)."""
    def plain(name):
      value = aug[name]
      return tuple(value) if isinstance(value, (tuple, list)) else value

    derived = ("mirror_axes", "intensity", "randomize")
    spatial = {f.name: plain(f.name) for f in dataclasses.fields(cls) if f.name not in derived}
    axes = set(aug["mirror_axes"]) | ({1} if aug["flip"] else set())
    intensity = intensity_lib.IntensitySettings(
        **{f.name: plain(f.name) for f in dataclasses.fields(intensity_lib.IntensitySettings)})
    randomize = randomize_lib.RandomizeSettings.from_config(aug.get("intensity", {}))
    return cls(**spatial, mirror_axes=tuple(sorted(axes)), intensity=intensity,
               randomize=randomize)

  @property
  def moves(self) -> bool:
    """Whether any spatial transform can happen (else no resampling is traced at all)."""
    return ((self.p_rotate > 0 and self.rotate_deg > 0)
            or (self.p_scale > 0 and tuple(self.scale) != (1.0, 1.0))
            or (self.elastic and self.p_elastic > 0 and self.elastic_alpha[1] > 0)
            or (self.p_mirror > 0 and bool(self.mirror_axes)))


def affine_coords(height: int, width: int, angle: jax.Array, scale: jax.Array, mirror: jax.Array,
                  mirror_rows: jax.Array = 1.0, displacement: jax.Array | None = None) -> jax.Array:
  """Backward sampling grid of a deformation, rotation by `angle`, zoom `scale` and mirrors.

  Args:
    height, width: output size.
    angle: rotation of the content, radians.
    scale: zoom factor of the content (> 1 enlarges).
    mirror: +1 (none) or -1 (mirror left-right, i.e. the columns).
    mirror_rows: +1 (none) or -1 (mirror up-down).
    displacement: optional [H, W, 2] elastic offsets (pixels) of each output pixel's sample point,
      applied before the rotation as batchgenerators does.

  Returns:
    [H, W, 2] (row, col) coordinates in the input at which each output pixel samples.
  """
  centre_r, centre_c = (height - 1) / 2.0, (width - 1) / 2.0
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32) - centre_r,
                            jnp.arange(width, dtype=jnp.float32) - centre_c, indexing="ij")
  if displacement is not None:
    rows, cols = rows + displacement[..., 0], cols + displacement[..., 1]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  # Backward map: rotate by -angle and divide by the scale, then mirror. Written out rather than as
  # a matmul, which a GPU may run in TF32 and so move every pixel by up to a few hundredths.
  src_r = (cos * rows + sin * cols) / scale * mirror_rows
  src_c = (cos * cols - sin * rows) / scale * mirror
  return jnp.stack([src_r + centre_r, src_c + centre_c], axis=-1)


def elastic_displacement(noise: jax.Array, alpha: jax.Array, sigma: jax.Array, *,
                         max_sigma: float) -> jax.Array:
  """[H, W, 2] offsets from noise [2, H, W] uniform in [-1, 1]: smoothed by a Gaussian of `sigma`
  (zeros outside), times `alpha` (batchgenerators' elastic_deform_coordinates)."""
  _, height, width = noise.shape
  rows = intensity_lib.gaussian_matrix(height, sigma, max_sigma=max_sigma, mode="constant")
  cols = intensity_lib.gaussian_matrix(width, sigma, max_sigma=max_sigma, mode="constant")
  smooth = jnp.einsum("ai,kij,bj->abk", rows, noise, cols, precision=jax.lax.Precision.HIGHEST)
  return alpha * smooth


def batch_coords(rng: jax.Array, b: int, h: int, w: int, s: Settings) -> jax.Array:
  """[B, H, W, 2]: `affine_coords` of each sample, its transforms drawn with their probabilities.

  The per-sample numbers come from one U(0, 1) array (one random op compiles several times faster
  than a key per sample and transform), the elastic noise from a key of its own.
  """
  k_draws, k_noise = jax.random.split(rng)
  u = jax.random.uniform(k_draws, (10, b))
  angle = jnp.where(u[0] < s.p_rotate,
                    jnp.deg2rad(intensity_lib.scaled(u[1], (-s.rotate_deg, s.rotate_deg))), 0.0)
  zoom = jnp.where(u[2] < s.p_scale, intensity_lib.split_uniform(u[3], u[4], *s.scale), 1.0)
  on_axis = jnp.array([0 in s.mirror_axes, 1 in s.mirror_axes])
  mirror = jnp.where(on_axis & (u[5:7].T < s.p_mirror), -1.0, 1.0)          # [B, 2]
  displacement = None
  if s.elastic and s.p_elastic > 0:
    alpha = jnp.where(u[7] < s.p_elastic, intensity_lib.scaled(u[8], s.elastic_alpha), 0.0)
    noise = jax.random.uniform(k_noise, (b, 2, h, w), minval=-1.0, maxval=1.0)
    displacement = jax.vmap(functools.partial(elastic_displacement, max_sigma=s.elastic_sigma[1]))(
        noise, alpha, intensity_lib.scaled(u[9], s.elastic_sigma))
  return jax.vmap(lambda a, z, m, d: affine_coords(h, w, a, z, m[1], m[0], d))(
      angle, zoom, mirror, displacement)


def _sample(channel: jax.Array, coords: jax.Array, order: int) -> jax.Array:
  return jax.scipy.ndimage.map_coordinates(channel, [coords[..., 0], coords[..., 1]], order=order,
                                           mode="nearest")


_per_channel = jax.vmap(_sample, in_axes=(-1, None, None), out_axes=-1)


def augment_batch(rng: jax.Array, image: jax.Array, label: jax.Array, settings: Settings,
                  labelled: jax.Array | None = None,
                  num_classes: int = 0) -> tuple[jax.Array, jax.Array]:
  """Applies one random spatial transform per sample to images and labels alike, then the intensity
  randomisation to the labelled samples' images, then nnU-Net's intensity transforms.

  Args:
    rng: PRNG key.
    image: [B, H, W, C] float.
    label: [B, H, W] integer class map.
    settings: what to draw, `Settings.from_config(config.data.augment)`.
    labelled: [B], > 0 where a sample's label is used: only those are randomised (none when None).
    num_classes: classes of the label maps, background included (the local randomisation's regions).

  Returns:
    The augmented (image, label), same shapes and dtypes.
  """
  k_spatial, k_intensity = jax.random.split(rng)
  b, h, w, _ = image.shape
  out_i, out_l = image.astype(jnp.float32), label
  if settings.moves:
    coords = batch_coords(k_spatial, b, h, w, settings)
    out_i = jax.vmap(_per_channel, in_axes=(0, 0, None))(out_i, coords, 1)
    moved = jax.vmap(_sample, in_axes=(0, 0, None))(label.astype(jnp.float32), coords, 0)
    out_l = jnp.round(moved).astype(label.dtype)
  if settings.randomize.active and labelled is not None:
    # A key of its own, so that turning the randomisation on leaves every other draw as it was.
    out_i = randomize_lib.randomize(jax.random.fold_in(rng, 2), out_i, out_l, labelled,
                                    settings.randomize, num_classes)
  out_i = intensity_lib.augment_intensity(k_intensity, out_i, settings.intensity)
  return out_i.astype(image.dtype), out_l


def augment_partners(rng: jax.Array, partners: jax.Array, settings: Settings) -> jax.Array:
  """Candidates [B, k, H, W, C] moved with the spatial transform `augment_batch(rng, ...)` gives
  sample b.

  With the same `rng` and settings as the `augment_batch` call of their own slices, every partner
  candidate of slice b gets slice b's rotation, zoom, deformation and mirror: a pair's correspondence
  survives the augmentation (MMSDNet's `mmsdnet.augment_partners`). Intensities change independently
  per candidate, as they would for any other image.
  """
  k_spatial, k_intensity = jax.random.split(rng)
  b, k, h, w, c = partners.shape
  out = partners.astype(jnp.float32)
  if settings.moves:
    coords = batch_coords(k_spatial, b, h, w, settings)
    out = jax.vmap(lambda cands, co: jax.vmap(lambda x: _per_channel(x, co, 1))(cands))(out, coords)
  out = intensity_lib.augment_intensity(jax.random.fold_in(k_intensity, 1),
                                        out.reshape(b * k, h, w, c), settings.intensity)
  return out.reshape(partners.shape).astype(partners.dtype)
