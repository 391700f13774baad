"""nnU-Net's intensity augmentations of 2D slices, in jax.numpy: they change the image, never the label.

Noise, blur, multiplicative brightness, contrast, low-resolution simulation and gamma (plain and on the
inverted image), in nnU-Net's order, each applied to a sample with its own probability and with
parameters drawn per sample (batchgenerators' `augment_*` functions are the reference). Every random
choice is a drawn Bernoulli selected with `jnp.where`, so one trace serves every draw; a transform of
probability 0 is left out of the trace altogether.

Deliberate departures from nnU-Net: one draw per sample serves all its channels (here the channels are
adjacent slices of one volume, not modalities, so they should change alike), where nnU-Net draws per
channel and blurs and downsamples each channel with probability 1/2; the low-resolution simulation
upsamples linearly, not with cubic splines.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST   # no TF32 on GPUs: intensities keep their float32 precision


@dataclasses.dataclass(frozen=True)
class IntensitySettings:
  """Probabilities and (low, high) ranges of the intensity transforms; keys of `data.augment`."""
  p_noise: float
  noise_std: tuple[float, float]
  p_blur: float
  blur_sigma: tuple[float, float]
  p_brightness: float
  brightness: tuple[float, float]
  p_contrast: float
  contrast: tuple[float, float]
  p_lowres: float
  lowres_zoom: tuple[float, float]
  p_gamma: float
  p_gamma_inverted: float
  gamma: tuple[float, float]
  gamma_retain_stats: bool


def split_uniform(u_side: jax.Array, u_value: jax.Array, low: float, high: float) -> jax.Array:
  """nnU-Net's draw of a factor around 1, from two U(0, 1) draws: half the time from [low, 1), half
  from [1, high).

  A plain uniform draw over (0.7, 1.5) would enlarge two times in three; this way shrinking and
  enlarging are equally likely.
  """
  below = (u_side < 0.5) & (low < 1.0)
  lo = jnp.where(below, low, max(low, 1.0))
  hi = jnp.where(below, 1.0, high)
  return lo + (hi - lo) * u_value


def scaled(u: jax.Array, bounds: tuple[float, float]) -> jax.Array:
  """A U(0, 1) draw moved to U(low, high)."""
  return bounds[0] + (bounds[1] - bounds[0]) * u


def gaussian_matrix(n: int, sigma: jax.Array, *, max_sigma: float, mode: str = "reflect",
                    truncate: float = 4.0) -> jax.Array:
  """[n, n] matrix M with M @ x = scipy.ndimage.gaussian_filter1d(x, sigma, mode=mode, truncate=...).

  A matrix takes a traced `sigma` (drawn per sample) where a convolution would need a static kernel:
  the kernel has scipy's radius int(truncate * sigma + 0.5), masked inside the largest one that
  `max_sigma` allows. Modes: 'reflect' (scipy's default, d c b a | a b c d | d c b a) and 'constant'
  (zeros outside).
  """
  big = int(truncate * max_sigma + 0.5)
  radius = jnp.floor(truncate * sigma + 0.5)

  def weight(offset):
    return jnp.where(jnp.abs(offset) <= radius, jnp.exp(-0.5 * (offset / sigma) ** 2), 0.0)

  total = weight(jnp.arange(-big, big + 1, dtype=jnp.float32)).sum()
  i = jnp.arange(n, dtype=jnp.float32)[:, None]
  j = jnp.arange(n, dtype=jnp.float32)[None, :]
  if mode == "constant":
    return weight(j - i) / total
  if mode != "reflect":
    raise ValueError(f"mode {mode!r} is not 'reflect' or 'constant'")
  # Input j is read at every position p of the reflected line with p = j or p = -1 - j modulo 2n.
  matrix = jnp.zeros((n, n), jnp.float32)
  for t in range(-(big // (2 * n) + 1), big // (2 * n) + 2):
    matrix += weight(j + 2 * n * t - i) + weight(2 * n * t - 1 - j - i)
  return matrix / total


def _separable(rows: jax.Array, cols: jax.Array, image: jax.Array) -> jax.Array:
  """rows @ image[..., c] @ cols.T for each channel of an [H, W, C] image."""
  return jnp.einsum("ai,ijc,bj->abc", rows, image, cols, precision=_HIGHEST)


def gaussian_noise(key: jax.Array, image: jax.Array, std: jax.Array) -> jax.Array:
  """Adds zero-mean Gaussian noise of standard deviation `std`."""
  return image + std * jax.random.normal(key, image.shape, image.dtype)


def gaussian_blur(image: jax.Array, sigma: jax.Array, *, max_sigma: float) -> jax.Array:
  """scipy's gaussian_filter (mode 'reflect', truncate 4) over H and W of an [H, W, C] image."""
  h, w, _ = image.shape
  return _separable(gaussian_matrix(h, sigma, max_sigma=max_sigma),
                    gaussian_matrix(w, sigma, max_sigma=max_sigma), image)


def _stats_axes(image):
  return tuple(range(image.ndim - 1))   # per channel, as nnU-Net


def contrast(image: jax.Array, factor: jax.Array) -> jax.Array:
  """Scales about each channel's mean, then clips to the channel's former [min, max] (nnU-Net's
  preserve_range), so that contrast never widens the intensity range."""
  axes = _stats_axes(image)
  mean = image.mean(axes, keepdims=True)
  out = (image - mean) * factor + mean
  return jnp.clip(out, image.min(axes, keepdims=True), image.max(axes, keepdims=True))


def low_resolution_matrix(n: int, zoom: jax.Array) -> jax.Array:
  """[n, n] matrix: nearest-neighbour downsampling to round(n * zoom) samples, then linear
  upsampling back to n (skimage.transform.resize's pixel-centre grid, 'edge' mode). A matrix keeps the
  shape static while the low-resolution size is drawn per sample."""
  m = jnp.maximum(jnp.round(n * zoom), 1.0)
  out = jnp.arange(n, dtype=jnp.float32)
  low = jnp.clip((out + 0.5) * (m / n) - 0.5, 0.0, m - 1.0)   # output pixel -> low-res coordinate
  low0 = jnp.floor(low)
  frac = (low - low0)[:, None]
  low1 = jnp.minimum(low0 + 1.0, m - 1.0)

  def source(k):   # the full-resolution pixel that low-res sample k took (nearest neighbour)
    return jnp.clip(jnp.floor((k + 0.5) * (n / m)), 0, n - 1).astype(jnp.int32)

  return ((1.0 - frac) * jax.nn.one_hot(source(low0), n)
          + frac * jax.nn.one_hot(source(low1), n))


def low_resolution(image: jax.Array, zoom: jax.Array) -> jax.Array:
  """Simulates an acquisition at `zoom` (<= 1) times the resolution of an [H, W, C] image."""
  h, w, _ = image.shape
  return _separable(low_resolution_matrix(h, zoom), low_resolution_matrix(w, zoom), image)


def gamma(image: jax.Array, g: jax.Array, *, invert: bool = False,
          retain_stats: bool = True) -> jax.Array:
  """nnU-Net's gamma: each channel mapped to [0, 1] by its min and range, raised to `g`, mapped back.

  With `invert` it works on -image (so it brightens what plain gamma darkens); with `retain_stats`
  the channel's mean and standard deviation are restored afterwards.
  """
  x = -image if invert else image
  axes = _stats_axes(x)
  mean, std = x.mean(axes, keepdims=True), x.std(axes, keepdims=True)
  low = x.min(axes, keepdims=True)
  span = x.max(axes, keepdims=True) - low + 1e-7
  x = ((x - low) / span) ** g * span + low
  if retain_stats:
    x = (x - x.mean(axes, keepdims=True)) / (x.std(axes, keepdims=True) + 1e-8) * std + mean
  return -x if invert else x


def augment_intensity(rng: jax.Array, images: jax.Array, s: IntensitySettings) -> jax.Array:
  """nnU-Net's intensity transforms, in nnU-Net's order, on [B, H, W, C]; same shape and dtype.

  Each sample draws whether and how much of each transform. All these numbers come from one U(0, 1)
  array, three rows per transform (whether, how much, which side of 1): one random op for the batch
  compiles several times faster than a key per sample and transform, and turning one transform off
  leaves the others' draws as they were.
  """
  b = images.shape[0]
  k_draws, k_noise = jax.random.split(rng)

  def noise(u, x):
    return gaussian_noise(k_noise, x, scaled(u[0], s.noise_std)[:, None, None, None])

  blur = jax.vmap(functools.partial(gaussian_blur, max_sigma=s.blur_sigma[1]))
  gammas = [jax.vmap(functools.partial(gamma, invert=invert, retain_stats=s.gamma_retain_stats))
            for invert in (True, False)]
  steps = (
      (s.p_noise, noise),
      (s.p_blur, lambda u, x: blur(x, scaled(u[0], s.blur_sigma))),
      (s.p_brightness, lambda u, x: x * scaled(u[0], s.brightness)[:, None, None, None]),
      (s.p_contrast, lambda u, x: jax.vmap(contrast)(x, split_uniform(u[1], u[0], *s.contrast))),
      (s.p_lowres, lambda u, x: jax.vmap(low_resolution)(x, scaled(u[0], s.lowres_zoom))),
      (s.p_gamma_inverted, lambda u, x: gammas[0](x, split_uniform(u[1], u[0], *s.gamma))),
      (s.p_gamma, lambda u, x: gammas[1](x, split_uniform(u[1], u[0], *s.gamma))),
  )
  draws = jax.random.uniform(k_draws, (len(steps), 3, b))
  x = images.astype(jnp.float32)
  for (p, transform), u in zip(steps, draws):
    if p <= 0.0:      # nothing traced: a transform that never happens costs nothing
      continue
    x = jnp.where((u[0] < p)[:, None, None, None], transform(u[1:], x), x)
  return x.astype(images.dtype)
