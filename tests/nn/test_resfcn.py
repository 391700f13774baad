"""The DLTK-style residual FCN: shortcut by hand, upscore interpolation, 2D/3D gradients, errors."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unpaired_seg import rng
from unpaired_seg.nn.resfcn import ResFCN, ResidualUnit, Upscore, pad_channels, resfcn_blocks
from unpaired_seg.nn.sharing import NormSpec, Sharing

MODALITIES = ("mr", "ct")
CHILOPOD = Sharing(MODALITIES, (), True)


def _init(module, *args, **kwargs):
  """Jitted init: one small compile instead of many eager ones."""
  return jax.jit(functools.partial(module.init, **kwargs))(rng.prng_key(0), *args)


def _apply(module, variables, *args, **kwargs):
  return jax.jit(functools.partial(module.apply, **kwargs))(variables, *args)


def test_block_names():
  assert resfcn_blocks(5) == ("init", "enc1", "enc2", "enc3", "enc4", "dec3", "dec2", "dec1",
                              "dec0", "head")
  with pytest.raises(ValueError, match="at least 2 scales"):
    resfcn_blocks(1)


def test_pad_channels_splits_the_zeros_floor_before_ceil_after():
  x = np.arange(6, dtype=np.float32).reshape(1, 3, 2) + 1.0   # [B, W, C=2]
  y = np.asarray(pad_channels(jnp.asarray(x), 5))             # 3 new channels: 1 before, 2 after
  assert y.shape == (1, 3, 5)
  np.testing.assert_array_equal(y[0, :, 0], [0, 0, 0])
  np.testing.assert_array_equal(y[0, :, 1], [1, 3, 5])
  np.testing.assert_array_equal(y[0, :, 2], [2, 4, 6])
  np.testing.assert_array_equal(y[0, :, 3:], np.zeros((3, 2)))
  with pytest.raises(ValueError, match="cannot pad 2 channels down to 1"):
    pad_channels(jnp.asarray(x), 1)


def _zero_kernels(params):
  return jax.tree.map(jnp.zeros_like, params)


def test_downsampling_unit_shortcut_is_max_pool_plus_channel_padding_by_hand():
  """With the residual branch zeroed, the unit returns its shortcut alone."""
  unit = ResidualUnit(features=4, strides=(2, 2), norm=NormSpec("batch"), norm_groups=("mr",))
  x = np.array([[1, 5, -2, 0],
                [3, 2, 7, 1],
                [0, -1, 4, 4],
                [2, 9, 3, -5]], np.float32)
  x = np.stack([x, -x], axis=-1)[None]                     # [1, 4, 4, 2]
  v = _init(unit, x, group="mr", train=False)
  # The strided conv has kernel 2 x stride = 4 per axis.
  assert v["params"]["conv0"]["kernel"].shape == (4, 4, 2, 4)
  assert v["params"]["conv1"]["kernel"].shape == (3, 3, 4, 4)
  v = {**v, "params": _zero_kernels(v["params"])}
  y = np.asarray(_apply(unit, v, x, group="mr", train=False))
  # 2x2 max pool of channel 0 and of channel 1 (= -x), worked out by hand.
  pooled0 = np.array([[5, 7], [9, 4]], np.float32)
  pooled1 = np.array([[-1, 2], [1, 5]], np.float32)
  assert y.shape == (1, 2, 2, 4)
  np.testing.assert_array_equal(y[0, ..., 0], np.zeros((2, 2)))
  np.testing.assert_array_equal(y[0, ..., 1], pooled0)
  np.testing.assert_array_equal(y[0, ..., 2], pooled1)
  np.testing.assert_array_equal(y[0, ..., 3], np.zeros((2, 2)))


def _conv_loop(x, kernel, stride, pad_before):
  """Direct cross-correlation of one sample [H, W, Cin] with zero padding, by loops."""
  kh, kw, cin, cout = kernel.shape
  h, w, _ = x.shape
  oh, ow = -(-h // stride), -(-w // stride)
  out = np.zeros((oh, ow, cout))
  for i in range(oh):
    for j in range(ow):
      for a in range(kh):
        for b in range(kw):
          r, c = i * stride + a - pad_before, j * stride + b - pad_before
          if 0 <= r < h and 0 <= c < w:
            out[i, j] += x[r, c] @ kernel[a, b]
  return out


def _instance_norm(x, eps=1e-5):
  return (x - x.mean(axis=(0, 1))) / np.sqrt(x.var(axis=(0, 1)) + eps)


def test_downsampling_unit_matches_a_numpy_reference():
  unit = ResidualUnit(features=3, strides=(2, 2), norm=NormSpec("instance"), norm_groups=("mr",))
  x = np.random.default_rng(4).standard_normal((1, 6, 6, 2)).astype(np.float32)
  v = _init(unit, x, group="mr", train=False)
  k0 = np.asarray(v["params"]["conv0"]["kernel"], np.float64)     # [4, 4, 2, 3]
  k1 = np.asarray(v["params"]["conv1"]["kernel"], np.float64)     # [3, 3, 3, 3]
  y = np.asarray(_apply(unit, v, x, group="mr", train=False))[0]
  # Kernel 4, stride 2 on 6 samples: 3 outputs, 'SAME' pads 4 - 2 = 2 in all, 1 before.
  branch = _conv_loop(np.maximum(_instance_norm(x[0]), 0), k0, stride=2, pad_before=1)
  branch = _conv_loop(np.maximum(_instance_norm(branch), 0), k1, stride=1, pad_before=1)
  pooled = x[0].reshape(3, 2, 3, 2, 2).max(axis=(1, 3))          # 2x2 max pool, [3, 3, 2]
  shortcut = np.concatenate([pooled, np.zeros((3, 3, 1))], axis=-1)   # 1 new channel, after
  np.testing.assert_allclose(y, branch + shortcut, rtol=1e-4, atol=1e-4)


def test_unit_adds_branch_to_identity_and_projects_fewer_channels():
  x = np.random.default_rng(1).standard_normal((2, 4, 4, 3)).astype(np.float32)
  same = ResidualUnit(3, (1, 1), NormSpec("instance"), ("mr",))
  v = _init(same, x, group="mr", train=False)
  y = _apply(same, v, x, group="mr", train=False)
  branch_off = _apply(same, {**v, "params": _zero_kernels(v["params"])}, x, group="mr",
                      train=False)
  np.testing.assert_allclose(branch_off, x, atol=1e-6)     # identity shortcut
  assert not np.allclose(y, x, atol=1e-3)                  # the branch does contribute
  fewer = ResidualUnit(2, (1, 1), NormSpec("instance"), ("mr",))
  v = jax.eval_shape(functools.partial(fewer.init, group="mr", train=False), rng.prng_key(0), x)
  assert v["params"]["shortcut_conv"]["kernel"].shape == (3, 3, 3, 2)


def test_upscore_interpolates_linearly_and_adds_the_normed_skip():
  up = Upscore(features=1, norm=NormSpec("batch"), norm_groups=("mr",))
  coarse = np.array([0.0, 4.0], np.float32).reshape(1, 1, 2, 1) * np.ones((1, 2, 1, 1))
  skip = np.ones((1, 4, 4, 3), np.float32)
  v = _init(up, coarse, skip, group="mr", train=False)
  assert "filter_conversion" not in v["params"]          # channels already match
  v = {**v, "params": _zero_kernels(v["params"])}
  y = np.asarray(_apply(up, v, coarse, skip, group="mr", train=False))
  # Half-pixel linear interpolation of [0, 4] to 4 samples, edges clamped: [0, 1, 3, 4].
  np.testing.assert_allclose(y[0, :, :, 0], np.tile([0.0, 1.0, 3.0, 4.0], (4, 1)), atol=1e-6)
  # The skip branch: a zero 1x1 conv through the eval norm gives the norm bias, here 0.5.
  v["norm_mr"] = {"skip_norm": {"scale": jnp.ones(1), "bias": jnp.full(1, 0.5)}}
  y = np.asarray(_apply(up, v, coarse, skip, group="mr", train=False))
  np.testing.assert_allclose(y[0, 0, :, 0], [0.5, 1.5, 3.5, 4.5], atol=1e-6)
  wide = Upscore(features=2, norm=NormSpec("batch"), norm_groups=("mr",))
  v = jax.eval_shape(functools.partial(wide.init, group="mr", train=False), rng.prng_key(0),
                     np.ones((1, 2, 2, 5)), skip)
  assert v["params"]["filter_conversion"]["kernel"].shape == (1, 1, 5, 2)


def _forward_backward(model, x, modality="ct"):
  init = jax.jit(functools.partial(model.init, modality="mr", train=False))
  variables = init(rng.prng_key(0), x)
  params = {k: v for k, v in variables.items() if not k.startswith("stats_")}
  stats = {k: v for k, v in variables.items() if k.startswith("stats_")}

  def loss_fn(params):
    logits, upd = model.apply({**params, **stats}, x, modality=modality, train=True,
                              mutable=[f"stats_{modality}"])
    return jnp.mean(jnp.square(logits - 1.0)), (logits, upd)

  value_and_grad = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  (loss, (logits, upd)), grads = value_and_grad(params)
  return variables, loss, logits, upd, grads


@pytest.mark.parametrize("ndim,shape,filters", [(2, (2, 16, 16, 1), (4, 6, 8)),
                                                (3, (2, 16, 16, 8, 1), (4, 6))])
def test_forward_and_backward_2d_and_3d(ndim, shape, filters):
  model = ResFCN(num_classes=3, sharing=CHILOPOD, filters=filters, units_per_scale=1,
                 strides=(1,) + (2,) * (len(filters) - 1), ndim=ndim, norm=NormSpec("batch"))
  x = jnp.asarray(np.random.default_rng(2).standard_normal(shape), jnp.float32)
  variables, loss, logits, upd, grads = _forward_backward(model, x)
  assert logits.shape == shape[:-1] + (3,)
  assert np.isfinite(float(loss))
  flat = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in flat)
  # Every kernel of a CT pass gets gradient; the MR norm parameters get none.
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads["params"]))
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads["norm_ct"]))
  assert all(float(jnp.abs(g).sum()) == 0 for g in jax.tree.leaves(grads["norm_mr"]))
  assert set(upd) == {"stats_ct"}
  # The strided unit has the 2 x stride kernel; the decoder works in score space (classes).
  p = variables["params"]
  assert p["enc1"]["unit0"]["conv0"]["kernel"].shape == (4,) * ndim + (4, 6)
  deepest = f"dec{len(filters) - 2}"
  assert p[deepest]["filter_conversion"]["kernel"].shape == (1,) * ndim + (filters[-1], 3)
  assert p["dec0"]["skip_conv"]["kernel"].shape == (1,) * ndim + (4, 3)


def test_units_per_scale_and_anisotropic_strides_in_3d():
  model = ResFCN(num_classes=2, sharing=CHILOPOD, filters=(2, 4), strides=(1, (2, 2, 1)), ndim=3)
  x = jnp.zeros((1, 4, 4, 3, 1))
  v = jax.eval_shape(functools.partial(model.init, modality="mr", train=False),
                     rng.prng_key(0), x)
  enc1 = v["params"]["enc1"]
  assert set(enc1) == {"unit0", "unit1", "unit2"}                 # DualStream: 3 per scale
  # Only the first unit strides, with a kernel of 2 x stride where the stride is 2.
  assert enc1["unit0"]["conv0"]["kernel"].shape == (4, 4, 3, 2, 4)
  assert enc1["unit1"]["conv0"]["kernel"].shape == (3, 3, 3, 4, 4)
  assert enc1["unit2"]["conv0"]["kernel"].shape == (3, 3, 3, 4, 4)
  out = jax.eval_shape(functools.partial(model.apply, modality="mr", train=False), v, x)
  assert out.shape == (1, 4, 4, 3, 2)


def test_dropout_on_residual_branches_needs_and_uses_the_dropout_rng():
  model = ResFCN(num_classes=2, sharing=CHILOPOD, filters=(2, 4), units_per_scale=1,
                 strides=(1, 2), norm=NormSpec("instance"), dropout=0.5)
  x = np.random.default_rng(0).standard_normal((1, 8, 8, 1)).astype(np.float32)
  v = _init(model, x, modality="mr", train=False)
  apply = jax.jit(functools.partial(model.apply, v, x, modality="mr", train=True))
  a = apply(rngs={"dropout": rng.prng_key(3)})
  b = apply(rngs={"dropout": rng.prng_key(4)})
  np.testing.assert_array_equal(a, apply(rngs={"dropout": rng.prng_key(3)}))
  assert not np.allclose(a, b)
  with pytest.raises(flax.errors.InvalidRngError):
    apply()


def test_bad_inputs_are_named():
  x = jnp.zeros((1, 12, 12, 1))
  model = ResFCN(num_classes=2, sharing=CHILOPOD, filters=(2, 4, 4), strides=(1, 2, 2))
  with pytest.raises(ValueError, match="divisible by"):
    model.init(rng.prng_key(0), jnp.zeros((1, 10, 12, 1)), modality="mr", train=False)
  bad = ResFCN(num_classes=2, sharing=CHILOPOD, filters=(2, 4, 4), strides=(1, 2))
  with pytest.raises(ValueError, match="strides has 2 entries, filters 3"):
    bad.init(rng.prng_key(0), x, modality="mr", train=False)
  bad = ResFCN(num_classes=2, sharing=CHILOPOD, filters=(2, 4), strides=(2, 2))
  with pytest.raises(ValueError, match=r"strides\[0\]"):
    bad.init(rng.prng_key(0), x, modality="mr", train=False)
  with pytest.raises(ValueError, match="'us'"):
    model.init(rng.prng_key(0), x, modality="us", train=False)
