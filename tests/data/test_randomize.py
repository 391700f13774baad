"""Intensity randomisation (GIN, IPA, SLAug's global and local location-scale): the label untouched,
the shape kept, the identity at zero strength, draws per sample and per step, one trace, monotone
remaps when asked, and only labelled samples changed."""

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
from unpaired_seg.data import randomize

NUM_CLASSES = 4
KINDS = {"gin": dict(p_gin=1.0), "ipa": dict(p_gin=1.0, p_ipa=1.0),
         "global": dict(p_global=1.0), "local": dict(p_local=1.0)}


def _key(seed):
  return rng_lib.prng_key(seed)


def _batch(b=4, size=32, channels=1, seed=0):
  """Images with smooth structure [b, size, size, channels] (air at the border) and labels."""
  rng = np.random.default_rng(seed)
  image = scipy.ndimage.gaussian_filter(rng.normal(size=(b, size, size, channels)), (0, 2, 2, 0))
  image = 2.0 + image / np.abs(image).max()
  image[:, :3] = -1.0                                       # the darkest rows: air
  label = np.zeros((b, size, size), np.int32)
  label[:, 6:14, 5:12], label[:, 16:24, 18:28], label[:, 25:30, 4:10] = 1, 2, 3
  return jnp.asarray(image, jnp.float32), jnp.asarray(label)


def _settings(**overrides):
  """The default augment section with nnU-Net's transforms off and `overrides` in `intensity`."""
  aug = common.get_base_config().data.augment
  aug.update({k: 0.0 for k in aug if k.startswith("p_")})
  aug.intensity.update(overrides)
  return augment.Settings.from_config(aug)


@pytest.fixture(scope="module")
def runs():
  """Every kind at p = 1 through `augment_batch` (nnU-Net's transforms off), in one jitted function
  (one compile serves the module), for two step keys: {seed: (images [4 kinds, ...], labels)}."""

  @jax.jit
  @chex.assert_max_traces(n=1)
  def run(key, image, label, labelled):
    outs = [augment.augment_batch(jax.random.fold_in(key, i), image, label, _settings(**kw),
                                  labelled, NUM_CLASSES) for i, kw in enumerate(KINDS.values())]
    return jnp.stack([o[0] for o in outs]), jnp.stack([o[1] for o in outs])

  image, label = _batch()
  try:
    return {seed: jax.tree.map(np.asarray, run(_key(seed), image, label, LABELLED))
            for seed in (1, 2)}
  finally:
    chex.clear_trace_counter()


LABELLED = jnp.array([1.0, 0.0, 1.0, 1.0])


def test_defaults_are_off_and_the_identity():
  s = _settings()
  assert not s.randomize.active
  image, label = _batch()
  out_i, out_l = jax.jit(augment.augment_batch, static_argnums=(3, 5))(
      _key(0), image, label, s, jnp.ones(4), NUM_CLASSES)
  np.testing.assert_array_equal(out_i, image)
  np.testing.assert_array_equal(out_l, label)


def test_each_kind_changes_labelled_images_only_keeps_shapes_and_labels(runs):
  image, label = map(np.asarray, _batch())
  images, labels = runs[1]
  for out, out_l, kind in zip(images, labels, KINDS):
    assert out.shape == image.shape and np.isfinite(out).all(), kind
    np.testing.assert_array_equal(out_l, label, err_msg=kind)               # label untouched
    np.testing.assert_array_equal(out[1], image[1], err_msg=kind)           # unlabelled: as it was
    for i in (0, 2, 3):
      assert np.abs(out[i] - image[i]).mean() > 1e-3, (kind, i)
    assert len({out[i].tobytes() for i in (0, 2, 3)}) == 3, kind           # drawn per sample


def test_traced_once_and_drawn_per_step(runs):
  for kind, a, b in zip(KINDS, runs[1][0], runs[2][0]):   # the fixture traced its function once
    assert not np.allclose(a[0], b[0]), kind


def test_gin_at_zero_mixing_weight_is_the_identity_and_keeps_the_norm():
  image, _ = _batch(channels=3)
  s = randomize.RandomizeSettings(p_gin=1.0)
  gin = jax.jit(randomize.gin, static_argnums=2)
  np.testing.assert_allclose(gin(_key(3), image, s, jnp.zeros(4)), image,
                             rtol=1e-6, atol=1e-6)
  out = gin(_key(3), image, s, jax.random.uniform(_key(4), (4,)))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(out).reshape(4, -1), axis=1),
                             np.linalg.norm(np.asarray(image).reshape(4, -1), axis=1), rtol=1e-5)


def test_gin_layer_is_a_per_sample_convolution():
  """Each sample convolved with its own kernel, 1x1 where asked (scipy reference)."""
  x = jax.random.normal(_key(4), (3, 8, 8, 1))
  kernel = jax.random.normal(_key(5), (3, 3, 3, 1, 1))
  bias = jax.random.normal(_key(6), (3, 1))
  small = jnp.array([True, False, False])
  out = np.asarray(jax.jit(randomize._random_conv)(x, kernel, bias, small))
  for i in range(3):
    k = np.asarray(kernel[i, ..., 0, 0]) * (np.pad([[1.0]], 1) if small[i] else 1.0)
    # A conv layer is a correlation: scipy.ndimage.correlate, zeros outside.
    ref = scipy.ndimage.correlate(np.asarray(x[i, ..., 0]), k, mode="constant") + float(bias[i, 0])
    np.testing.assert_allclose(out[i, ..., 0], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", [randomize.INCREASING, randomize.INVERTED,
                                  randomize.NON_MONOTONE])
def test_bezier_remaps_are_monotone_when_asked_and_keep_the_range(kind):
  v = jnp.linspace(0.0, 1.0, 201)
  controls = jax.random.uniform(_key(6), (64, 2, 2))
  out = np.asarray(jax.vmap(lambda c: randomize.remap(v, c, kind))(controls))
  assert out.min() >= 0.0 and out.max() <= 1.0
  start, end = (1.0, 0.0) if kind == randomize.INVERTED else (0.0, 1.0)
  np.testing.assert_allclose(out[:, 0], start, atol=1e-6)
  np.testing.assert_allclose(out[:, -1], end, atol=1e-6)
  steps = np.diff(out, axis=1)
  if kind == randomize.INCREASING:
    assert (steps >= -1e-6).all()
  elif kind == randomize.INVERTED:
    assert (steps <= 1e-6).all()
  else:   # a good share of the curves rise and fall
    assert ((steps.min(axis=1) < -1e-3) & (steps.max(axis=1) > 1e-3)).sum() >= 16


def test_location_scale_matches_its_formula():
  v = jnp.array([0.0, 0.25, 0.5, 1.0])
  out = randomize.location_scale(jnp.array([0.5, 0.2]), v, 0.1, 0.8)
  # scale 1.05, shift 0.1 (N(0, 0.5) draw of 0.2 -> 0.1, inside [-0.1, 0.2]), clipped to [0, 1].
  np.testing.assert_allclose(out, np.clip(np.asarray(v) * 1.05 + 0.1, 0, 1), rtol=1e-6)
  clipped = randomize.location_scale(jnp.array([5.0, 5.0]), v, 0.1, 0.8)
  np.testing.assert_allclose(clipped, np.clip(np.asarray(v) * 1.1 + 0.2, 0, 1), rtol=1e-6)


def test_local_keeps_air_and_remaps_each_region_alone(runs):
  image, label = map(np.asarray, _batch())
  out = runs[1][0][list(KINDS).index("local")]
  np.testing.assert_array_equal(out[:, :3], image[:, :3])                # air kept
  # Monotone curves (p_nonmonotone = 0) per region: within a region the order of intensities is
  # kept or reversed, and the background, always inverted, reverses it.
  for b in (0, 2, 3):
    for k in range(NUM_CLASSES):
      region = (label[b] == k) & (image[b, ..., 0] > -1.0)
      x, y = image[b, ..., 0][region], out[b, ..., 0][region]
      steps = np.diff(y[np.argsort(x)])
      assert (steps >= -1e-5).all() or (steps <= 1e-5).all(), (b, k)
      if k == 0:
        assert (steps <= 1e-5).all()


def test_a_bad_or_unknown_intensity_key_names_itself():
  config = common.get_base_config()
  config.data.augment.intensity.p_gin = 1.5
  with pytest.raises(config_schema.ConfigError, match="data.augment.intensity.p_gin"):
    config_schema.validate(config)
  with pytest.raises(ValueError, match="data.augment.intensity.p_gn"):
    randomize.RandomizeSettings.from_config({"p_gn": 1.0})
