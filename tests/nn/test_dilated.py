"""UMMKD's dilated residual network: pixel shuffle, unit shortcut, dilation, padding, gradients."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unpaired_seg import rng
from unpaired_seg.nn.dilated import (DilatedResNet, LeakyResidualUnit, ShuffleHead, dilated_blocks,
                                     pixel_shuffle)
from unpaired_seg.nn.sharing import NormSpec, Sharing

CHILOPOD = Sharing(("mr", "ct"), (), True)
TINY_WIDTHS = (4, 4, 8, 8, 8, 8, 8)


def _init(module, *args, **kwargs):
  """Jitted init: one small compile instead of many eager ones."""
  return jax.jit(functools.partial(module.init, **kwargs))(rng.prng_key(0), *args)


def _apply(module, variables, *args, **kwargs):
  return jax.jit(functools.partial(module.apply, **kwargs))(variables, *args)


def _shuffle_loop_2d(x, r):
  b, h, w, cr = x.shape
  c = cr // (r * r)
  out = np.zeros((b, h * r, w * r, c), x.dtype)
  for n in range(b):
    for row in range(h * r):
      for col in range(w * r):
        for k in range(c):
          i, j = row % r, col % r
          out[n, row, col, k] = x[n, row // r, col // r, k * r * r + i * r + j]
  return out


def _shuffle_loop_3d(x, r):
  b, d, h, w, cr = x.shape
  c = cr // r ** 3
  out = np.zeros((b, d * r, h * r, w * r, c), x.dtype)
  for idx in np.ndindex(out.shape):
    n, z, y, xx, k = idx
    offset = ((z % r) * r + y % r) * r + xx % r
    out[idx] = x[n, z // r, y // r, xx // r, k * r ** 3 + offset]
  return out


@pytest.mark.parametrize("r,c", [(2, 3), (3, 2), (1, 4)])
def test_pixel_shuffle_2d_matches_a_loop(r, c):
  x = np.random.default_rng(0).standard_normal((2, 3, 4, c * r * r)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(pixel_shuffle(jnp.asarray(x), r)),
                                _shuffle_loop_2d(x, r))


def test_pixel_shuffle_3d_matches_a_loop():
  x = np.random.default_rng(1).standard_normal((1, 2, 3, 2, 2 * 8)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(pixel_shuffle(jnp.asarray(x), 2)),
                                _shuffle_loop_3d(x, 2))


def test_pixel_shuffle_by_hand():
  # One pixel, four channels, r = 2: channels 0..3 fill the 2x2 block row by row.
  x = jnp.arange(4.0).reshape(1, 1, 1, 4)
  np.testing.assert_array_equal(pixel_shuffle(x, 2)[0, :, :, 0], [[0.0, 1.0], [2.0, 3.0]])
  with pytest.raises(ValueError, match="not a multiple of r\\^2 = 4"):
    pixel_shuffle(jnp.zeros((1, 2, 2, 6)), 2)


def test_block_names():
  assert dilated_blocks() == ("init", "enc0", "enc1", "enc2", "enc3", "enc4", "enc5", "enc6",
                              "bottleneck", "dec1", "dec0", "head")
  assert dilated_blocks(2) == ("init", "enc0", "enc1", "bottleneck", "dec1", "dec0", "head")


def test_residual_unit_shortcut_pads_channels_by_hand():
  unit = LeakyResidualUnit(features=4, norm=NormSpec("batch"), norm_groups=("mr",))
  x = np.arange(18, dtype=np.float32).reshape(1, 3, 3, 2) - 9.0
  v = _init(unit, x, group="mr", train=False)
  assert set(v["params"]) == {"conv0", "conv1"}               # no shortcut conv, no bias
  assert all("bias" not in p for p in v["params"].values())
  v = {**v, "params": jax.tree.map(jnp.zeros_like, v["params"])}
  y = np.asarray(_apply(unit, v, x, group="mr", train=False))
  expected = np.zeros((1, 3, 3, 4), np.float32)
  expected[..., 1:3] = x                                      # 2 new channels: one each side
  np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize("dilation", [1, 2])
def test_dilation_spreads_the_kernel_taps(dilation):
  """conv0 keeps only its top-left tap, conv1 only its centre: an impulse echoes `dilation` away."""
  unit = LeakyResidualUnit(features=1, norm=NormSpec("none"), norm_groups=("mr",),
                           dilation=dilation)
  x = np.zeros((1, 9, 9, 1), np.float32)
  x[0, 3, 3, 0] = 1.0
  v = _init(unit, x, group="mr", train=False)
  top_left = np.zeros((3, 3, 1, 1), np.float32)
  top_left[0, 0] = 1.0
  centre = np.zeros((3, 3, 1, 1), np.float32)
  centre[1, 1] = 1.0
  v = {**v, "params": {"conv0": {"kernel": top_left}, "conv1": {"kernel": centre}}}
  y = np.asarray(_apply(unit, v, x, group="mr", train=False))[0, ..., 0]
  expected = np.zeros((9, 9), np.float32)
  expected[3, 3] = 1.0                                        # the shortcut
  expected[3 + dilation, 3 + dilation] = 1.0                  # the branch reads `dilation` up-left
  np.testing.assert_array_equal(y, expected)


def _symmetric_index(i, n):
  """TF 'SYMMETRIC' padding: -1 -> 0, -2 -> 1, n -> n - 1, n + 1 -> n - 2."""
  if i < 0:
    return -i - 1
  if i >= n:
    return 2 * n - i - 1
  return i


def test_head_is_a_5x5_conv_with_symmetric_padding():
  head = ShuffleHead(num_classes=1)
  x = np.random.default_rng(2).standard_normal((1, 4, 5, 2)).astype(np.float32)
  v = _init(head, x)
  kernel = np.asarray(v["params"]["conv"]["kernel"])
  assert kernel.shape == (5, 5, 2, 1) and "bias" not in v["params"]["conv"]
  y = np.asarray(_apply(head, v, x))
  expected = np.zeros((4, 5), np.float32)
  for row in range(4):
    for col in range(5):
      for a in range(5):
        for b in range(5):
          src = x[0, _symmetric_index(row + a - 2, 4), _symmetric_index(col + b - 2, 5)]
          expected[row, col] += src @ kernel[a, b, :, 0]
  np.testing.assert_allclose(y[0, ..., 0], expected, rtol=1e-5, atol=1e-5)


def test_ummkd_layout():
  """Stages of (1, 1, 2, 2, 2, 2, 2) units, two dilated units, conv to r^2 x head, 5x5 head."""
  model = DilatedResNet(num_classes=3, sharing=CHILOPOD, widths=TINY_WIDTHS, head_channels=2)
  x = jnp.zeros((2, 32, 32, 3))
  variables = jax.eval_shape(functools.partial(model.init, modality="mr", train=False),
                             rng.prng_key(0), x)
  p = variables["params"]
  assert set(p) == set(dilated_blocks())
  assert p["init"]["kernel"].shape == (3, 3, 3, 4)                   # 3 adjacent slices in
  for i, units in enumerate((1, 1, 2, 2, 2, 2, 2)):
    assert set(p[f"enc{i}"]) == {f"unit{u}" for u in range(units)}
    assert p[f"enc{i}"]["unit0"]["conv1"]["kernel"].shape == (3, 3) + (TINY_WIDTHS[i],) * 2
  assert set(p["bottleneck"]) == {"unit0", "unit1"}
  assert p["bottleneck"]["unit1"]["conv0"]["kernel"].shape == (3, 3, 8, 8)
  assert set(p["dec1"]) == {"conv0", "conv1"}
  assert p["dec0"]["conv"]["kernel"].shape == (3, 3, 8, 8 * 8 * 2)   # r^2 * head_channels
  assert p["head"]["conv"]["kernel"].shape == (5, 5, 2, 3)
  paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(p)]
  assert len(paths) > 20 and not any("bias" in path for path in paths)   # no conv bias at all
  out = jax.eval_shape(functools.partial(model.apply, modality="ct", train=False), variables, x)
  assert out.shape == (2, 32, 32, 3)


def test_forward_and_backward_on_2_5d_input():
  model = DilatedResNet(num_classes=3, sharing=CHILOPOD, widths=(4, 8, 8), units=(1, 1, 2),
                        head_channels=2, norm=NormSpec("batch", epsilon=1e-3), dropout_rate=0.25)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 32, 32, 3)), jnp.float32)
  variables = jax.jit(functools.partial(model.init, modality="mr", train=False))(
      rng.prng_key(0), x)
  params = {k: v for k, v in variables.items() if not k.startswith("stats_")}
  stats = {k: v for k, v in variables.items() if k.startswith("stats_")}

  def loss_fn(params, key):
    logits, upd = model.apply({**params, **stats}, x, modality="ct", train=True,
                              mutable=["stats_ct"], rngs={"dropout": key})
    return jnp.mean(jnp.square(logits - 1.0)), (logits, upd)

  value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, (logits, upd)), grads = value_and_grad(params, rng.prng_key(1))
  assert logits.shape == (2, 32, 32, 3)
  assert np.isfinite(float(loss)) and set(upd) == {"stats_ct"}
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads["params"]))
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads["norm_ct"]))
  assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(grads["norm_mr"]))
  # Dropout draws from the 'dropout' stream: another key, another loss; the same key, the same.
  assert float(value_and_grad(params, rng.prng_key(2))[0][0]) != float(loss)
  assert float(value_and_grad(params, rng.prng_key(1))[0][0]) == float(loss)


def test_default_head_channels_and_dropout_needs_an_rng():
  model = DilatedResNet(num_classes=2, sharing=CHILOPOD, widths=(2, 2, 4), units=(1, 1, 1),
                        norm=NormSpec("instance"))
  x = jnp.zeros((1, 8, 8, 3))
  init = functools.partial(model.init, modality="mr", train=False)
  v = jax.eval_shape(init, rng.prng_key(0), x)
  assert v["params"]["dec0"]["conv"]["kernel"].shape == (3, 3, 4, 64 * 8 * 2)  # 8 * classes
  with pytest.raises(flax.errors.InvalidRngError):
    jax.eval_shape(functools.partial(model.apply, modality="mr", train=True), v, x)
  # Without dropout (or not training) no rng is needed.
  out = jax.eval_shape(functools.partial(model.apply, modality="mr", train=False), v, x)
  assert out.shape == (1, 8, 8, 2)


def test_3d_variant_runs():
  model = DilatedResNet(num_classes=2, sharing=CHILOPOD, widths=(2, 2, 2), units=(1, 1, 1),
                        ndim=3, head_channels=1, norm=NormSpec("instance"), dropout_rate=0.0)
  x = jnp.zeros((1, 8, 8, 8, 3))
  v = jax.eval_shape(functools.partial(model.init, modality="mr", train=False),
                     rng.prng_key(0), x)
  assert v["params"]["dec0"]["conv"]["kernel"].shape == (3, 3, 3, 2, 8 ** 3)
  out = jax.eval_shape(functools.partial(model.apply, modality="ct", train=True), v, x)
  assert out.shape == (1, 8, 8, 8, 2)


def test_bad_settings_are_named():
  x = jnp.zeros((1, 16, 16, 3))

  def init(model, x=x):
    return jax.eval_shape(functools.partial(model.init, modality="mr", train=False),
                          rng.prng_key(0), x)

  with pytest.raises(ValueError, match="divisible by 8"):
    init(DilatedResNet(2, CHILOPOD, widths=(2, 2, 2), units=(1, 1, 1)), jnp.zeros((1, 12, 16, 3)))
  with pytest.raises(ValueError, match="units has 2 entries, widths 3"):
    init(DilatedResNet(2, CHILOPOD, widths=(2, 2, 2), units=(1, 1)))
  with pytest.raises(ValueError, match="widths must not decrease"):
    init(DilatedResNet(2, CHILOPOD, widths=(4, 2, 2), units=(1, 1, 1)))
  with pytest.raises(ValueError, match="ndim=2"):
    init(DilatedResNet(2, CHILOPOD, widths=(2, 2, 2), units=(1, 1, 1)), jnp.zeros((16, 16, 3)))
