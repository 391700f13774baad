"""Intensity randomisation of 2D slices for zero-label modalities, in jax.numpy.

A segmentor trained on one modality's labelled images fails on another's because it has learnt that
modality's intensities. These transforms replace a labelled image's intensities by random ones while
keeping its anatomy (the label never changes), so that the network must read shape:

  * GIN (global intensity non-linear augmentation, Ouyang et al., "Causality-inspired single-source
    domain generalization for medical image segmentation"): a freshly drawn shallow convolutional
    network per sample (`gin_layers` layers of `gin_channels` channels, each kernel 1x1 or 3x3 at
    random, weights and biases N(0, 1), leaky ReLU between layers), its output mixed with the image by
    a U(0, 1) weight and rescaled to the image's Frobenius norm.
  * IPA (their interventional pixel mixing): two GIN views of the same image blended by a smooth
    random mask (control values U(0, 1) on a coarse grid, interpolated), so that different regions
    get different intensity mappings.
  * Location-scale augmentation with Bezier remaps (Su et al., SLAug, "Rethinking data augmentation
    for single-source domain generalization in medical image segmentation"): the image mapped to
    [0, 1], remapped by a random cubic Bezier curve through (0, 0) and (1, 1), scaled by
    clip(N(1, 0.1), 0.9, 1.1) and shifted by N(0, 0.5) (clipped so that the 20th and 80th
    percentiles stay in [0, 1]), clipped to [0, 1] and mapped back to the image's range. Globally
    the curve is increasing; locally each class region of the label (background included) gets its
    own curve, inverted (decreasing: bright becomes dark) for the background and with probability
    1/2 for each organ, and pixels at the bottom 1 % of the range (air) keep their value, as in the
    authors' code. Beyond the paper, `p_nonmonotone` of the local curves are non-monotone (inner
    control values drawn from U(-1, 2), the curve clipped to [0, 1]).

Only samples whose label is used (`labelled`) are randomised: the images of a modality without
labels stay as they are, because they are what the network must learn to read. SLAug's
saliency-balancing fusion and CSDG's consistency loss between views are not implemented.
Every random choice is drawn per sample under `jnp.where`, so one trace serves every draw.
"""

import dataclasses

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST
_CURVE_POINTS = 65           # samples of a Bezier curve; the remap interpolates between them
_BACKGROUND = 0.01           # SLAug: in [0, 1], values at most this are air and stay as they are


@dataclasses.dataclass(frozen=True)
class RandomizeSettings:
  """The `data.augment.intensity` section (probabilities per labelled sample)."""
  p_gin: float = 0.0
  gin_layers: int = 4
  gin_channels: int = 2
  gin_leak: float = 0.01       # PyTorch's leaky_relu default, which the authors' code uses
  p_ipa: float = 0.0            # of the GIN samples, how many are two views mixed by a mask
  ipa_grid: int = 4             # control values per side of the mixing mask
  p_global: float = 0.0         # SLAug global location-scale (monotone Bezier)
  p_local: float = 0.0          # SLAug local location-scale (a curve per class region)
  p_nonmonotone: float = 0.0    # of the local curves, how many are non-monotone

  @classmethod
  def from_config(cls, section) -> "RandomizeSettings":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(section.keys()) - names)
    if unknown:
      raise ValueError(f"config keys data.augment.intensity.{unknown[0]}: unknown (known: "
                       f"{sorted(names)})")
    return cls(**{k: section[k] for k in names if k in section})

  @property
  def active(self) -> bool:
    return self.p_gin > 0 or self.p_global > 0 or self.p_local > 0


# ---------------------------------------------------------------------------------------------
# GIN and IPA.
# ---------------------------------------------------------------------------------------------

def _random_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array,
                 one_by_one: jax.Array) -> jax.Array:
  """Per-sample 3x3 `kernel` [B, 3, 3, c_in, c_out] and `bias` [B, c_out] on [B, H, W, c_in] (zeros
  outside, a correlation as in every conv layer); where `one_by_one` [B], only the centre tap.

  Written as the nine shifted copies of x contracted with each sample's kernel: one einsum, where a
  grouped convolution of one group per sample would compile slower on XLA's CPU backend.
  """
  _, h, w, _ = x.shape
  centre = jnp.zeros((3, 3)).at[1, 1].set(1.0)
  kernel = jnp.where(one_by_one[:, None, None, None, None], kernel * centre[..., None, None], kernel)
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  shifts = jnp.stack([jnp.stack([padded[:, i:i + h, j:j + w] for j in range(3)], axis=3)
                      for i in range(3)], axis=3)                      # [B, H, W, 3, 3, c_in]
  out = jnp.einsum("bhwijc,bijco->bhwo", shifts, kernel, precision=_HIGHEST)
  return out + bias[:, None, None, :]


def gin(key: jax.Array, x: jax.Array, s: RandomizeSettings,
        alpha: jax.Array | None = None) -> jax.Array:
  """GIN of [B, H, W, C]: a random shallow network per sample, mixed with x by `alpha` [B]
  (U(0, 1) when None), rescaled to each sample's Frobenius norm.

  Every weight comes from one N(0, 1) array and every choice from one U(0, 1) array: one random op
  each compiles several times faster than a key per layer.
  """
  b, _, _, c = x.shape
  widths = [c] + [s.gin_channels] * (s.gin_layers - 1) + [c]
  sizes = [(9 * widths[i] * widths[i + 1], widths[i + 1]) for i in range(s.gin_layers)]
  k_n, k_u = jax.random.split(key)
  normal = jax.random.normal(k_n, (b, sum(k + o for k, o in sizes)))
  uniform = jax.random.uniform(k_u, (s.gin_layers + 1, b))
  y, at = x, 0
  for i, (n_kernel, n_bias) in enumerate(sizes):
    kernel = normal[:, at:at + n_kernel].reshape(b, 3, 3, widths[i], widths[i + 1])
    bias = normal[:, at + n_kernel:at + n_kernel + n_bias]
    at += n_kernel + n_bias
    y = _random_conv(y, kernel, bias, uniform[i] < 0.5)
    if i < s.gin_layers - 1:
      y = jax.nn.leaky_relu(y, s.gin_leak)
  alpha = (uniform[-1] if alpha is None else alpha)[:, None, None, None]
  mixed = alpha * y + (1.0 - alpha) * x
  norm = lambda v: jnp.sqrt(jnp.sum(v * v, axis=(1, 2, 3), keepdims=True))
  return mixed * norm(x) / jnp.maximum(norm(mixed), 1e-6)


def smooth_mask(key: jax.Array, b: int, h: int, w: int, grid: int) -> jax.Array:
  """[B, H, W, 1] in [0, 1]: U(0, 1) values on a grid x grid lattice, interpolated (cubic)."""
  coarse = jax.random.uniform(key, (b, grid, grid, 1))
  return jnp.clip(jax.image.resize(coarse, (b, h, w, 1), "cubic"), 0.0, 1.0)


def gin_ipa(key: jax.Array, x: jax.Array, s: RandomizeSettings) -> jax.Array:
  """GIN, with probability p_ipa per sample replaced by two GIN views blended by a smooth mask."""
  k_gin, k_mask, k_use = jax.random.split(key, 3)
  if s.p_ipa <= 0:
    return gin(k_gin, x, s)
  b, h, w, _ = x.shape
  # Both views from one GIN call on the batch twice over (each copy draws its own network): one
  # traced network instead of two.
  views = gin(k_gin, jnp.concatenate([x, x]), s)
  first, second = views[:b], views[b:]
  mask = smooth_mask(k_mask, b, h, w, s.ipa_grid)
  mixed = mask * first + (1.0 - mask) * second
  use = jax.random.uniform(k_use, (b,)) < s.p_ipa
  return jnp.where(use[:, None, None, None], mixed, first)


# ---------------------------------------------------------------------------------------------
# Bezier remaps and location-scale (SLAug).
# ---------------------------------------------------------------------------------------------

INCREASING, INVERTED, NON_MONOTONE = 0, 1, 2     # kinds of remap


def bezier_curve(controls: jax.Array, kind: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Samples (x, y) [P] of a remap from the cubic Bezier through (0, 0) and (1, 1) with inner
  control points `controls` [2, 2] (rows: points, columns: x, y), drawn in [0, 1].

  x is sorted so that y = f(x) is a function. INCREASING sorts y too (f non-decreasing, SLAug's
  global curve); INVERTED pairs sorted x with y sorted the other way (f non-increasing, 0 -> 1 and
  1 -> 0: SLAug's 'inverse' curve); NON_MONOTONE stretches the inner y controls to [-1, 2], which
  lets the curve rise and fall, and clips it to [0, 1].
  """
  t = jnp.linspace(0.0, 1.0, _CURVE_POINTS)
  basis = jnp.stack([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3])   # [4, P]
  inner_y = jnp.where(kind == NON_MONOTONE, 3.0 * controls[:, 1] - 1.0, controls[:, 1])
  inner = jnp.stack([controls[:, 0], inner_y], axis=1)
  points = jnp.concatenate([jnp.zeros((1, 2)), inner, jnp.ones((1, 2))])                  # [4, 2]
  xy = jnp.einsum("kp,kd->pd", basis, points, precision=_HIGHEST)
  x, y = xy[:, 0], xy[:, 1]
  up = jnp.sort(y)
  y = jnp.where(kind == INCREASING, up, jnp.where(kind == INVERTED, up[::-1], jnp.clip(y, 0, 1)))
  return jnp.sort(x), y


def remap(values: jax.Array, controls: jax.Array, kind: jax.Array) -> jax.Array:
  """values in [0, 1] through the Bezier remap of `controls` [2, 2] and `kind`."""
  x, y = bezier_curve(controls, kind)
  return jnp.interp(values, x, y)


def location_scale(u: jax.Array, values: jax.Array, p20: jax.Array, p80: jax.Array) -> jax.Array:
  """SLAug's location-scale of values in [0, 1] from two N(0, 1) draws `u` [2]: scale
  clip(N(1, 0.1), 0.9, 1.1), shift N(0, 0.5) clipped to [-p20, 1 - p80], result clipped to [0, 1]."""
  scale = jnp.clip(1.0 + 0.1 * u[0], 0.9, 1.1)
  shift = jnp.clip(0.5 * u[1], -p20, 1.0 - p80)
  return jnp.clip(values * scale + shift, 0.0, 1.0)


def _unit_range(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  axes = tuple(range(1, x.ndim))
  low, high = x.min(axes, keepdims=True), x.max(axes, keepdims=True)
  span = jnp.maximum(high - low, 1e-6)
  return (x - low) / span, low, span


def _masked_quantiles(v: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The 20th and 80th percentiles (nearest rank) of v's values where mask (all when empty), over
  every other row and column of [H, W, C]: a quarter of the sort, and the percentiles only bound
  the location shift."""
  flat, m = v[::2, ::2].reshape(-1), mask[::2, ::2].reshape(-1)
  m = jnp.where(m.any(), m, True)
  order = jnp.sort(jnp.where(m, flat, jnp.inf))
  n = m.sum()
  pick = lambda q: order[jnp.clip(jnp.round(q * (n - 1)).astype(jnp.int32), 0, flat.size - 1)]
  return pick(0.2), pick(0.8)


def slaug_global(key: jax.Array, x: jax.Array) -> jax.Array:
  """Global location-scale of [B, H, W, C]: one monotone Bezier remap and location-scale each."""
  b = x.shape[0]
  k_c, k_n = jax.random.split(key)
  unit, low, span = _unit_range(x)
  controls = jax.random.uniform(k_c, (b, 2, 2))
  normal = jax.random.normal(k_n, (b, 2))

  def one(v, c, n):
    r = remap(v, c, INCREASING)
    p20, p80 = _masked_quantiles(r, jnp.ones_like(r, bool))
    return location_scale(n, r, p20, p80)

  return jax.vmap(one)(unit, controls, normal) * span + low


def slaug_local(key: jax.Array, x: jax.Array, label: jax.Array, num_classes: int,
                p_nonmonotone: float = 0.0) -> jax.Array:
  """Local location-scale: each class region of `label` [B, H, W] (background included) gets its own
  Bezier remap and location-scale; the background's curve is inverted, each organ's with
  probability 1/2, and any of them non-monotone with `p_nonmonotone`; air (<= 1 % of the range)
  keeps its value."""
  b = x.shape[0]
  k_u, k_n = jax.random.split(key)   # one random op per distribution: faster to compile
  unit, low, span = _unit_range(x)
  u = jax.random.uniform(k_u, (b, num_classes, 6))
  controls = u[..., :4].reshape(b, num_classes, 2, 2)
  normal = jax.random.normal(k_n, (b, num_classes, 2))
  inverted = (u[..., 4] < 0.5) | (jnp.arange(num_classes) == 0)
  kinds = jnp.where(inverted, INVERTED, INCREASING)
  kinds = jnp.where(u[..., 5] < p_nonmonotone, NON_MONOTONE, kinds)

  def region(v, lab, c, n, kind, k):   # class k's remap of the whole image, then its region
    mask = (lab == k)[..., None] & jnp.ones_like(v, bool)
    r = remap(v, c, kind)
    p20, p80 = _masked_quantiles(r, mask)
    return location_scale(n, r, p20, p80)

  def one(v, lab, c, n, m):   # classes vmapped, not unrolled: one compiled body for all of them
    per_class = jax.vmap(region, in_axes=(None, None, 0, 0, 0, 0))(
        v, lab, c, n, m, jnp.arange(num_classes))                       # [K, H, W, C]
    out = jnp.take_along_axis(per_class, lab[None, ..., None].astype(jnp.int32), axis=0)[0]
    return jnp.where(v <= _BACKGROUND, v, out)

  return jax.vmap(one)(unit, label, controls, normal, kinds) * span + low


def randomize(key: jax.Array, image: jax.Array, label: jax.Array, labelled: jax.Array,
              s: RandomizeSettings, num_classes: int) -> jax.Array:
  """One of GIN(-IPA), global or local location-scale per labelled sample, drawn with their
  probabilities (tried in that order: a sample takes the first drawn); others are untouched.

  Args:
    image: [B, H, W, C] float; label: [B, H, W] int (unchanged, read by the local transform);
    labelled: [B], > 0 where the sample's label is used.
  """
  if not s.active:
    return image
  b = image.shape[0]
  k_draw, k_gin, k_global, k_local = jax.random.split(key, 4)
  draws = jax.random.uniform(k_draw, (3, b))
  x = image.astype(jnp.float32)
  out = x
  choices = ((s.p_gin, lambda: gin_ipa(k_gin, x, s)),
             (s.p_global, lambda: slaug_global(k_global, x)),
             (s.p_local, lambda: slaug_local(k_local, x, label, num_classes, s.p_nonmonotone)))
  taken = jnp.zeros((b,), bool)
  for (p, transform), u in zip(choices, draws):
    if p <= 0:
      continue
    pick = (u < p) & ~taken
    out = jnp.where(pick[:, None, None, None], transform(), out)
    taken = taken | pick
  use = (labelled > 0)[:, None, None, None]
  return jnp.where(use, out, x).astype(image.dtype)
