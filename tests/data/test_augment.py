"""On-device augmentation: identity at zero strength, labels stay labels, image and label move together,
intensity transforms against numpy/scipy references, draws per sample and per key, one trace."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from configs import common
from unpaired_seg import config_schema
from unpaired_seg import rng as rng_lib
from unpaired_seg.data import augment
from unpaired_seg.data import intensity

INTENSITY = ("noise", "blur", "brightness", "contrast", "lowres", "gamma", "gamma_inverted")
# Jitted with the settings static, as the train step has them: each setting compiles once.
_augment = jax.jit(augment.augment_batch, static_argnums=3)
_partners = jax.jit(augment.augment_partners, static_argnums=2)
# The transforms themselves, jitted too: one compile per function instead of one per op and shape.
_blur = jax.jit(intensity.gaussian_blur, static_argnames="max_sigma")
_gaussian_matrix = jax.jit(intensity.gaussian_matrix, static_argnums=0,
                           static_argnames=("max_sigma", "mode"))
_gamma = jax.jit(intensity.gamma, static_argnames=("invert", "retain_stats"))
_low_resolution = jax.jit(intensity.low_resolution)
_elastic = jax.jit(augment.elastic_displacement, static_argnames="max_sigma")


def _key(seed):
  return rng_lib.prng_key(seed)  # the train step's kind of key ('rbg')


def _only(**overrides) -> augment.Settings:
  """The default (nnU-Net) ranges with every probability 0 except those in `overrides`."""
  aug = common.get_base_config().data.augment
  aug.update({k: 0.0 for k in aug if k.startswith("p_")})
  aug.update(overrides)
  return augment.Settings.from_config(aug)


def _batch():
  image = np.zeros((2, 16, 16, 1), np.float32)
  label = np.zeros((2, 16, 16), np.int32)
  image[:, 4:10, 3:8, 0] = 1.0
  label[:, 4:10, 3:8] = 3
  label[:, 11:14, 10:13] = 1
  image[:, 11:14, 10:13, 0] = 0.5
  return jnp.asarray(image), jnp.asarray(label)


def _smooth_batch(b=4, size=32, channels=1, seed=0):
  """Positive images [b, size, size, channels] with structure at several scales, and labels."""
  rng = np.random.default_rng(seed)
  image = scipy.ndimage.gaussian_filter(rng.normal(size=(b, size, size, channels)), (0, 2, 2, 0))
  image = 1.0 + image / np.abs(image).max()
  label = rng.integers(0, 4, (b, size, size))
  return jnp.asarray(image, jnp.float32), jnp.asarray(label, jnp.int32)


# --- identity at zero strength ------------------------------------------------------------------

def test_zero_probabilities_are_the_identity():
  image, label = _smooth_batch()
  out_i, out_l = _augment(_key(0), image, label, _only())
  np.testing.assert_array_equal(out_i, image)
  np.testing.assert_array_equal(out_l, label)


def test_neutral_parameters_are_the_identity():
  image, label = _smooth_batch()
  neutral = _only(p_rotate=1.0, rotate_deg=0.0, p_scale=1.0, scale=(1.0, 1.0), elastic=True,
                  p_elastic=1.0, elastic_alpha=(0.0, 0.0), p_noise=1.0, noise_std=(0.0, 0.0),
                  p_brightness=1.0, brightness=(1.0, 1.0), p_contrast=1.0, contrast=(1.0, 1.0),
                  p_lowres=1.0, lowres_zoom=(1.0, 1.0), p_gamma=1.0, p_gamma_inverted=1.0,
                  gamma=(1.0, 1.0))
  out_i, out_l = _augment(_key(1), image, label, neutral)
  np.testing.assert_allclose(out_i, image, atol=1e-5)
  np.testing.assert_array_equal(out_l, label)
  # The image is not even resampled then (`neutral.moves` is False); the grid it would use is the
  # identity all the same.
  coords = jax.jit(augment.batch_coords, static_argnums=(1, 2, 3, 4))(_key(1), 4, 32, 32, neutral)
  np.testing.assert_allclose(coords, np.broadcast_to(augment.affine_coords(32, 32, 0.0, 1.0, 1.0),
                                                     coords.shape), atol=1e-5)


# --- intensity transforms: image only, against references ----------------------------------------

def test_intensity_transforms_change_the_image_only():
  # Every intensity transform at p = 1 and no spatial one: one compile for all seven.
  image, label = _smooth_batch(channels=3)
  out_i, out_l = _augment(_key(2), image, label,
                          _only(**{f"p_{name}": 1.0 for name in INTENSITY}))
  np.testing.assert_array_equal(out_l, label)
  assert out_i.shape == image.shape and out_i.dtype == image.dtype
  assert np.isfinite(np.asarray(out_i)).all()
  assert (np.abs(np.asarray(out_i - image)).max(axis=(1, 2, 3)) > 1e-3).all()


def test_blur_matches_scipy_gaussian_filter():
  image = np.asarray(_smooth_batch(b=1, channels=2)[0][0])
  for sigma in (0.5, 0.77, 1.0):
    got = _blur(jnp.asarray(image), jnp.float32(sigma), max_sigma=1.0)
    np.testing.assert_allclose(got, scipy.ndimage.gaussian_filter(image, (sigma, sigma, 0)),
                               atol=1e-5)


@pytest.mark.parametrize("mode", ["reflect", "constant"])
def test_gaussian_matrix_matches_scipy_also_past_the_border(mode):
  x = np.random.default_rng(3).normal(size=7)
  for sigma in (0.6, 2.5):      # at 2.5 the kernel (radius 10) is wider than the line
    m = _gaussian_matrix(7, jnp.float32(sigma), max_sigma=2.5, mode=mode)
    np.testing.assert_allclose(m @ x, scipy.ndimage.gaussian_filter1d(x, sigma, mode=mode),
                               atol=1e-5)


def _numpy_gamma(x, g, invert, retain_stats):
  """batchgenerators' augment_gamma, per channel of [H, W, C]."""
  out = np.empty_like(x)
  for c in range(x.shape[-1]):
    d = -x[..., c] if invert else x[..., c].copy()
    mn, sd = d.mean(), d.std()
    minm, rnge = d.min(), d.max() - d.min()
    d = np.power((d - minm) / (rnge + 1e-7), g) * (rnge + 1e-7) + minm
    if retain_stats:
      d = (d - d.mean()) / (d.std() + 1e-8) * sd + mn
    out[..., c] = -d if invert else d
  return out


@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize("retain_stats", [False, True])
def test_gamma_matches_the_numpy_formula(invert, retain_stats):
  x = np.asarray(_smooth_batch(b=1, channels=2)[0][0], np.float64) * 3.0 - 2.0
  for g in (0.7, 1.5):
    got = _gamma(jnp.asarray(x, jnp.float32), jnp.float32(g), invert=invert,
                          retain_stats=retain_stats)
    np.testing.assert_allclose(got, _numpy_gamma(x, g, invert, retain_stats), atol=1e-4)


def test_contrast_scales_about_the_mean_within_the_old_range():
  x = np.asarray(_smooth_batch(b=1, channels=2)[0][0])
  for factor in (0.75, 1.25):
    mean = x.mean((0, 1))
    expected = np.clip((x - mean) * factor + mean, x.min((0, 1)), x.max((0, 1)))
    np.testing.assert_allclose(intensity.contrast(jnp.asarray(x), factor), expected, atol=1e-6)


def test_noise_has_the_drawn_standard_deviation():
  x = jnp.zeros((64, 64, 1))
  noisy = intensity.gaussian_noise(_key(4), x, jnp.float32(0.1))
  assert abs(float(noisy.std()) - 0.1) < 0.005 and abs(float(noisy.mean())) < 0.005


def _numpy_low_resolution(x, zoom):
  """Nearest-neighbour downsampling to round(n * zoom), linear ('edge') upsampling, per axis."""
  for axis in (0, 1):
    n = x.shape[axis]
    m = max(int(round(n * zoom)), 1)
    src = np.clip(np.floor((np.arange(m) + 0.5) * n / m), 0, n - 1).astype(int)
    low = np.take(x, src, axis=axis)
    at = (np.arange(n) + 0.5) * m / n - 0.5
    x = np.apply_along_axis(lambda v: np.interp(at, np.arange(m), v), axis, low)
  return x


def test_low_resolution_matches_numpy():
  x = np.asarray(_smooth_batch(b=1, channels=2)[0][0], np.float64)
  for zoom in (0.5, 0.63, 1.0):
    got = _low_resolution(jnp.asarray(x, jnp.float32), jnp.float32(zoom))
    np.testing.assert_allclose(got, _numpy_low_resolution(x, zoom), atol=1e-5)
  np.testing.assert_allclose(_low_resolution(jnp.asarray(x, jnp.float32), 1.0), x,
                             atol=1e-6)


def test_split_uniform_shrinks_and_enlarges_equally_often():
  u = jax.random.uniform(_key(5), (2, 400))
  values = np.asarray(intensity.split_uniform(u[0], u[1], 0.7, 1.5))
  assert values.min() >= 0.7 and values.max() <= 1.5
  assert 0.4 < (values < 1.0).mean() < 0.6


# --- spatial transforms: label follows the image -------------------------------------------------

def _one_hot_batch(seed=6, classes=4):
  rng = np.random.default_rng(seed)
  label = scipy.ndimage.zoom(rng.integers(0, classes, (4, 8, 8)), (1, 4, 4), order=0)  # blobs
  image = jax.nn.one_hot(label, classes, dtype=jnp.float32)
  return image, jnp.asarray(label, jnp.int32)


def test_mirrors_move_label_and_image_alike():
  image, label = _one_hot_batch()
  out_i, out_l = _augment(_key(7), image, label, _only(mirror_axes=(0, 1), p_mirror=1.0))
  np.testing.assert_array_equal(out_l, np.asarray(label)[:, ::-1, ::-1])
  np.testing.assert_array_equal(out_i, jax.nn.one_hot(out_l, 4))


def test_rotation_zoom_and_deformation_move_label_and_image_alike():
  image, label = _one_hot_batch()
  settings = _only(p_rotate=1.0, p_scale=1.0, elastic=True, p_elastic=1.0)
  out_i, out_l = _augment(_key(8), image, label, settings)
  assert out_l.dtype == label.dtype and out_i.shape == image.shape
  assert set(np.unique(np.asarray(out_l))) <= set(np.unique(np.asarray(label)))
  assert not np.array_equal(out_l, label)
  # Bilinear one-hot and nearest-neighbour label agree except on a thin band along the edges.
  assert (np.asarray(out_i).argmax(-1) == np.asarray(out_l)).mean() > 0.95


def test_elastic_displacement_is_smooth_and_scaled_by_alpha():
  noise = jax.random.uniform(_key(9), (2, 32, 32), minval=-1.0, maxval=1.0)
  field = np.asarray(_elastic(noise, 200.0, 10.0, max_sigma=13.0))
  assert field.shape == (32, 32, 2) and 0.3 < np.abs(field).max() < 30.0
  assert np.abs(np.diff(field, axis=0)).max() < 0.2 * np.abs(field).max()   # neighbours move alike
  np.testing.assert_allclose(_elastic(noise, 100.0, 10.0, max_sigma=13.0),
                             field / 2, rtol=1e-5, atol=1e-6)


def _warp_nearest(label, coords):
  return np.asarray(jax.scipy.ndimage.map_coordinates(
      jnp.asarray(label, jnp.float32), [coords[..., 0], coords[..., 1]], order=0, mode="nearest"))


def test_quarter_turns_and_mirrors_match_numpy():
  _, label = _batch()
  label = np.asarray(label[0])
  quarter = _warp_nearest(label, augment.affine_coords(16, 16, jnp.pi / 2, 1.0, 1.0))
  assert any(np.array_equal(quarter, np.rot90(label, k)) for k in (1, -1))
  half = _warp_nearest(label, augment.affine_coords(16, 16, jnp.pi, 1.0, 1.0))
  np.testing.assert_array_equal(half, np.rot90(label, 2))
  mirrored = _warp_nearest(label, augment.affine_coords(16, 16, 0.0, 1.0, -1.0))
  np.testing.assert_array_equal(mirrored, label[:, ::-1])
  upside_down = _warp_nearest(label, augment.affine_coords(16, 16, 0.0, 1.0, 1.0, -1.0))
  np.testing.assert_array_equal(upside_down, label[::-1])


def test_zoom_by_two_doubles_the_area():
  label = np.zeros((32, 32), np.int32)
  label[12:20, 12:20] = 1                                          # 64 pixels about the centre
  zoomed = _warp_nearest(label, augment.affine_coords(32, 32, 0.0, 2.0, 1.0))
  assert abs(int(zoomed.sum()) - 256) <= 36


def test_legacy_flip_mirrors_columns_half_the_time():
  image, label = _batch()
  settings = _only(flip=True, p_mirror=0.5)
  assert settings.mirror_axes == (1,)
  seen = set()
  for seed in range(8):
    _, out_l = _augment(_key(seed), image, label, settings)
    for b in range(2):
      got, own = np.asarray(out_l[b]), np.asarray(label[b])
      seen.add("same" if np.array_equal(got, own) else
               "mirrored" if np.array_equal(got, own[:, ::-1]) else "other")
  assert seen == {"same", "mirrored"}


# --- draws per sample, per key, with the configured probability ----------------------------------

def test_a_transform_happens_with_its_probability():
  image, label = _smooth_batch(b=64, size=8)
  out_i, _ = _augment(_key(12), image, label, _only(p_brightness=0.5))
  changed = np.abs(np.asarray(out_i - image)).max(axis=(1, 2, 3)) > 0
  assert 20 <= changed.sum() <= 44


def test_traces_once_and_draws_per_sample_and_per_key():
  # Every transform at p = 1 (elastic and both mirrors included): the heaviest trace there is.
  settings = _only(**{f"p_{name}": 1.0 for name in INTENSITY + ("rotate", "scale", "elastic")},
                   elastic=True, mirror_axes=(0, 1), p_mirror=0.5)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(key, image, label):
    return augment.augment_batch(key, image, label, settings)

  image, label = _smooth_batch(channels=3)
  image = jnp.broadcast_to(image[:1], image.shape)                 # four copies of one sample
  label = jnp.broadcast_to(label[:1], label.shape)
  try:
    outputs = [run(_key(seed), image, label) for seed in (10, 11, 12)]
  finally:
    chex.clear_trace_counter()
  for out_i, out_l in outputs:
    assert out_i.shape == image.shape and out_i.dtype == image.dtype
    assert out_l.shape == label.shape and out_l.dtype == label.dtype
    assert np.isfinite(np.asarray(out_i)).all()
    assert len({np.asarray(out_l[i]).tobytes() for i in range(4)}) == 4      # per sample
    assert len({float(out_i[i].mean()) for i in range(4)}) == 4
  assert not np.allclose(outputs[0][0], outputs[1][0], atol=1e-3)          # per key


# --- partners -------------------------------------------------------------------------------------

def test_partners_share_their_slices_motion_but_not_its_intensity():
  image, label = _smooth_batch(b=3, size=16)                         # positive images
  other, _ = _smooth_batch(b=3, size=16, seed=1)
  # Candidate 0 of each slice is the slice itself, candidate 1 another image.
  partners = jnp.stack([image, other], axis=1)                       # [B, k=2, H, W, C]
  settings = _only(p_rotate=1.0, p_scale=1.0, flip=True, p_mirror=0.5, p_brightness=1.0)
  key = _key(5)
  moved_partners = np.asarray(_partners(key, partners, settings))
  assert moved_partners.shape == partners.shape
  for k, own in enumerate((image, other)):
    moved, _ = _augment(key, own, label, settings)
    assert not np.allclose(moved, own, atol=1e-2)                    # something did move
    # The same rotation, zoom and mirror with another brightness factor: a constant ratio per
    # sample, and not 1.
    ratio = moved_partners[:, k] / np.asarray(moved)
    assert np.all(ratio.max(axis=(1, 2, 3)) - ratio.min(axis=(1, 2, 3)) < 1e-4)
    assert not np.allclose(ratio, 1.0, atol=1e-3)


# --- config ---------------------------------------------------------------------------------------

def test_defaults_are_nnunets():
  aug = common.get_base_config().data.augment
  assert (aug.p_rotate, aug.p_scale, tuple(aug.scale)) == (0.2, 0.2, (0.7, 1.4))
  assert (aug.p_noise, tuple(aug.noise_std), aug.p_blur, tuple(aug.blur_sigma)) == (
      0.1, (0.0, 0.1), 0.2, (0.5, 1.0))
  assert (aug.p_brightness, aug.p_contrast, aug.p_lowres, aug.p_gamma, aug.p_gamma_inverted) == (
      0.15, 0.15, 0.25, 0.3, 0.1)
  assert not aug.elastic and tuple(aug.mirror_axes) == () and not aug.flip


@pytest.mark.parametrize("key,value", [
    ("p_noise", 1.5), ("p_gamma", -0.1), ("blur_sigma", (0.0, 1.0)), ("scale", (1.4, 0.7)),
    ("mirror_axes", (2,)), ("mirror_axes", (1, 1)), ("lowres_zoom", (0.5, 1.5)),
    ("gamma", (0.7,)), ("noise_std", (-0.1, 0.1)),
])
def test_a_bad_augment_value_names_its_key(key, value):
  config = common.get_base_config()
  config.data.augment[key] = value
  with pytest.raises(config_schema.ConfigError, match=rf"'data\.augment\.{key}'") as error:
    config_schema.validate(config)
  assert "\n" not in str(error.value)
