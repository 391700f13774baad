"""Tests of unpaired_seg.nn.disentangle against slow numpy re-implementations of each network.

  python -m pytest -q tests/nn/test_disentangle.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unpaired_seg.nn import disentangle as dis
from unpaired_seg.nn.unet import unet_blocks

MODALITIES = ("mr", "ct")
EPS = 1e-3  # Keras' batch norm epsilon, the encoder's default


def _key(seed):
  """A PRNG key whose random-bit generator compiles much faster on CPU than threefry's."""
  return jax.random.key(seed, impl="rbg")


def _normal(seed, shape, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape) * scale, jnp.float32)


def _onehot_factor(seed, shape):
  """A random binary one-hot factor [B, H, W, C]."""
  labels = np.random.default_rng(seed).integers(0, shape[-1], size=shape[:-1])
  return jnp.asarray(np.eye(shape[-1])[labels], jnp.float32)


def _init(module, rng, *arrays, **static):
  """`module.init` under jit (op-by-op eager init compiles every op and is slow on CPU)."""
  return jax.jit(lambda r, *a: module.init(r, *a, **static))(rng, *arrays)


def _shapes(module, rngs, *arrays, **static):
  """The variables `module.init` would create, as shapes, without compiling or running it."""
  return jax.eval_shape(lambda r, *a: module.init(r, *a, **static), rngs, *arrays)


def _output_shape(module, rngs, *arrays, **static):
  """The output shape of `module` at init, without compiling or running it."""
  out = jax.eval_shape(lambda r, *a: module.init_with_output(r, *a, **static)[0], rngs, *arrays)
  return jax.tree.map(lambda a: a.shape, out)


def _apply(module, variables, *arrays, **static):
  """`module.apply` under jit, keyword arguments static."""
  return jax.jit(lambda v, *a: module.apply(v, *a, **static))(variables, *arrays)


def _finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


# ------------------------------------------------------------------------------------------------
# Slow numpy references (float64, explicit loops over kernel offsets).
# ------------------------------------------------------------------------------------------------


def _conv(x, kernel, bias=None, stride=1, padding="SAME"):
  """Cross-correlation of [B, H, W, C] with [kh, kw, C, F]; SAME for odd kernels at stride 1."""
  x = np.asarray(x, np.float64)
  kernel = np.asarray(kernel, np.float64)
  kh, kw = kernel.shape[:2]
  if padding == "SAME":
    x = np.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  out_h = (x.shape[1] - kh) // stride + 1
  out_w = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
      out += patch @ kernel[i, j]
  if bias is not None:
    out += np.asarray(bias, np.float64)
  return out


def _leaky(x, slope):
  return np.where(x >= 0, x, slope * x)


def _relu(x):
  return np.maximum(x, 0.0)


def _dense(x, p):
  return np.asarray(x, np.float64) @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"])


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _batch_norm_eval(x, norm, stats, eps=EPS):
  return ((x - np.asarray(stats["mean"])) / np.sqrt(np.asarray(stats["var"]) + eps)
          * np.asarray(norm["scale"]) + np.asarray(norm["bias"]))


def _conv_norm_block(x, params, norm, stats, prefix=("conv0", "norm0", "conv1", "norm1")):
  for conv, nrm in (prefix[:2], prefix[2:]):
    x = _relu(_batch_norm_eval(_conv(x, params[conv]["kernel"]), norm[nrm], stats[nrm]))
  return x


def _max_pool(x):
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _upsample(x):
  return x.repeat(2, axis=1).repeat(2, axis=2)


def _anatomy_reference(variables, x, modality, variant, depth, group="shared"):
  """The U-Net in eval mode from the variables, block names resolved by hand."""
  per_modality = {"dafnet": lambda b: b.startswith("enc"), "mmsdnet": lambda b: True}[variant]
  name = lambda b: f"{b}_{modality}" if per_modality(b) else b
  params = variables["params"]
  norm = variables[f"norm_{group}"]
  stats = variables[f"stats_{group}"]
  x = np.asarray(x, np.float64)
  skips = []
  for level in range(depth):
    b = name(f"enc{level}")
    x = _conv_norm_block(x, params[b], norm[b], stats[b])
    skips.append(x)
    x = _max_pool(x)
  b = name("bottleneck")
  x = _conv_norm_block(x, params[b], norm[b], stats[b])
  for level in reversed(range(depth)):
    b = name(f"dec{level}")
    x = _conv(_upsample(x), params[b]["up_conv"]["kernel"])
    x = _batch_norm_eval(x, norm[b]["up_norm"], stats[b]["up_norm"])
    x = np.concatenate([x, skips[level]], axis=-1)
    x = _conv_norm_block(x, params[b]["conv"], norm[b]["conv"], stats[b]["conv"])
  b = name("head")
  return _softmax(_conv(x, params[b]["conv"]["kernel"], params[b]["conv"]["bias"]))


def _numpy_init(module, rngs, *arrays, seed=0, **static):
  """Variables with the structure and shapes `module.init` gives, filled from numpy.

  Skips compiling the random initialisers (slow on CPU), and gives every bias, norm scale and
  running statistic a non-trivial value, so a reference that ignored one would disagree.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == "kernel":
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif name in ("scale", "var"):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:  # bias, mean
      value = rng.normal(0.0, 0.2, leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, _shapes(module, rngs, *arrays, **static))


# ------------------------------------------------------------------------------------------------
# Anatomy encoder.
# ------------------------------------------------------------------------------------------------


def _encoder(variant="dafnet", **kwargs):
  kwargs = {"features": 2, "depth": 2, **kwargs}
  return dis.AnatomyEncoder(MODALITIES, variant=variant, **kwargs)


def test_dafnet_encoding_path_is_per_modality_and_the_rest_shared():
  enc = _encoder("dafnet", depth=3)
  v = _shapes(enc, _key(0), jnp.zeros((1, 16, 16, 1)), modality="ct", train=False)
  blocks = unet_blocks(3)
  expected = {f"{b}_{m}" for b in blocks if b.startswith("enc") for m in MODALITIES}
  expected |= {b for b in blocks if not b.startswith("enc")}
  assert set(v["params"]) == expected
  assert set(v) == {"params", "norm_shared", "stats_shared"}
  # Widths double down the encoding path; the bottleneck is features * 2^depth.
  assert v["params"]["enc2_mr"]["conv0"]["kernel"].shape == (3, 3, 4, 8)
  assert v["params"]["bottleneck"]["conv1"]["kernel"].shape == (3, 3, 16, 16)
  assert v["params"]["head"]["conv"]["kernel"].shape == (1, 1, 2, 8)
  assert (jax.tree.structure(v["params"]["enc1_mr"])
          == jax.tree.structure(v["params"]["enc1_ct"]))


def test_mmsdnet_is_two_separate_unets_and_norms_can_be_per_modality():
  enc = _encoder("mmsdnet", norm_per_modality=True)
  v = _shapes(enc, _key(0), jnp.zeros((1, 8, 8, 1)), modality="mr", train=False)
  assert set(v["params"]) == {f"{b}_{m}" for b in unet_blocks(2) for m in MODALITIES}
  assert set(v) == {"params", "norm_mr", "norm_ct", "stats_mr", "stats_ct"}
  assert jax.tree.structure(v["stats_mr"]) == jax.tree.structure(v["stats_ct"])


@pytest.mark.parametrize("variant", ["dafnet", "mmsdnet"])
def test_anatomy_encoder_matches_numpy_reference(variant):
  enc = _encoder(variant)
  x = _normal(1, (2, 8, 8, 1))
  v = _numpy_init(enc, _key(2), x, seed=3, modality="mr", train=False)
  apply = jax.jit(lambda v, x, m: enc.apply(v, x, modality=m, train=False,
                                             mutable=["intermediates"]), static_argnums=2)
  outputs = {}
  for modality in MODALITIES:
    s, inter = apply(v, x, modality)
    probabilities = np.asarray(inter["intermediates"]["probabilities"][0])
    expected = _anatomy_reference(v, x, modality, variant, depth=2)
    np.testing.assert_allclose(probabilities, expected, rtol=2e-4, atol=2e-5)
    # Forward: the one-hot of the arg-max wherever the reference's top two are not a near tie.
    top2 = np.sort(expected, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 1e-4
    np.testing.assert_array_equal(np.asarray(s)[clear],
                                  np.eye(8)[expected.argmax(-1)][clear])
    outputs[modality] = probabilities
  # The two modalities go through different encoding paths.
  assert not np.allclose(outputs["mr"], outputs["ct"])


def test_anatomy_factor_is_binary_and_sized_like_the_input():
  for size in (32, 64):
    x = jnp.zeros((2, size, size, 1))
    assert _output_shape(_encoder(), _key(0), x, modality="ct", train=False) == (2, size, size, 8)
  x = _normal(4, (2, 32, 32, 1))
  v = _numpy_init(_encoder("dafnet"), _key(5), x, modality="mr", train=False)
  for mode in ("onehot_argmax", "round"):
    enc = _encoder("dafnet", binarize=mode)  # the same parameters, another binarisation
    s, inter = _apply(enc, v, x, modality="mr", train=True,
                      mutable=("stats_shared", "intermediates"))
    s = np.asarray(s)
    assert set(np.unique(s)) <= {0.0, 1.0}
    probabilities = np.asarray(inter["intermediates"]["probabilities"][0])
    if mode == "onehot_argmax":
      np.testing.assert_array_equal(s.sum(-1), 1.0)
    else:
      np.testing.assert_array_equal(s, (probabilities > 0.5).astype(np.float32))


def test_anatomy_training_pass_updates_only_its_modality_and_gradients_flow():
  enc = _encoder("dafnet", norm_per_modality=True)
  x = _normal(6, (2, 8, 8, 1))
  v = _numpy_init(enc, _key(7), x, modality="mr", train=False)
  with pytest.raises(Exception, match="stats_ct"):
    _apply(enc, v, x, modality="ct", train=True, mutable=("stats_mr",))
  w = _normal(8, (2, 8, 8, 8))

  def loss(params):
    s, updates = enc.apply({**v, "params": params}, x, modality="mr", train=True,
                           mutable=["stats_mr"])
    return jnp.sum(w * s), updates

  grads, upd = jax.jit(jax.grad(loss, has_aux=True))(v["params"])
  assert set(upd) == {"stats_mr"}
  assert not np.allclose(upd["stats_mr"]["bottleneck"]["norm0"]["mean"],
                         v["stats_mr"]["bottleneck"]["norm0"]["mean"])
  assert _finite(grads)
  # Straight-through: the binary output still trains the MR path and the shared blocks ...
  for block in ("enc0_mr", "bottleneck", "head"):
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads[block])) > 0
  # ... and never the CT encoding path.
  assert all(float(jnp.max(jnp.abs(g))) == 0 for g in jax.tree.leaves(grads["enc0_ct"]))


def test_anatomy_encoder_rejects_bad_settings():
  x = jnp.zeros((1, 10, 10, 1))
  with pytest.raises(ValueError, match="divisible by 4"):
    _encoder().init(_key(0), x, modality="mr", train=False)
  x = jnp.zeros((1, 8, 8, 1))
  with pytest.raises(ValueError, match="variant"):
    _encoder("sdnet").init(_key(0), x, modality="mr", train=False)
  with pytest.raises(ValueError, match="binarize"):
    _encoder(binarize="sigmoid").init(_key(0), x, modality="mr", train=False)
  with pytest.raises(ValueError, match="modality 'us'"):
    _encoder().init(_key(0), x, modality="us", train=False)


# ------------------------------------------------------------------------------------------------
# Modality encoder.
# ------------------------------------------------------------------------------------------------


def _modality_reference(params, s, x):
  h = np.concatenate([np.asarray(s, np.float64), np.asarray(x, np.float64)], axis=-1)
  for i in range(4):
    p = params[f"conv{i}"]
    h = _leaky(_conv(h, p["kernel"], p["bias"], stride=2, padding="VALID"), 0.3)
  h = _leaky(_dense(h.reshape(h.shape[0], -1), params["dense"]), 0.3)
  return _dense(h, params["mean"]), _dense(h, params["logvar"])


@pytest.mark.parametrize("size, flat", [(31, 1), (32, 1), (64, 3), (192, 11)])
def test_modality_encoder_flatten_size_follows_input(size, flat):
  enc = dis.ModalityEncoder(features=2)
  s = jnp.zeros((2, size, size, 8))
  x = jnp.zeros((2, size, size, 1))
  # 32 -> 15 -> 7 -> 3 -> 1, 64 -> 31 -> 15 -> 7 -> 3, 192 -> 95 -> 47 -> 23 -> 11 (VALID,
  # stride 2), with 8 f = 16 channels.
  v = _shapes(enc, {"params": _key(0)}, s, x, sample=False)
  assert v["params"]["dense"]["kernel"].shape == (flat * flat * 16, 32)
  assert _output_shape(enc, {"params": _key(0)}, s, x, sample=False) == ((2, 8),) * 3


def test_modality_encoder_matches_reference_with_finite_gradients():
  enc = dis.ModalityEncoder(features=2)
  s = _onehot_factor(0, (2, 64, 64, 8))
  x = _normal(1, (2, 64, 64, 1))
  v = _numpy_init(enc, {"params": _key(2)}, s, x, sample=False)
  z, mean, logvar = _apply(enc, v, s, x, sample=False)
  np.testing.assert_array_equal(np.asarray(z), np.asarray(mean))
  ref_mean, ref_logvar = _modality_reference(v["params"], s, x)
  np.testing.assert_allclose(mean, ref_mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(logvar, ref_logvar, rtol=1e-4, atol=1e-5)

  def loss(params):
    z, mean, logvar = enc.apply({"params": params}, s, x, rngs={"sample": _key(1)})
    return jnp.sum(z ** 2) + jnp.sum(logvar)

  assert _finite(jax.jit(jax.grad(loss))(v["params"]))


def test_modality_encoder_samples_with_standard_deviation_exp_half_logvar():
  enc = dis.ModalityEncoder(z_dim=4096, features=2, hidden=4)
  s = _onehot_factor(3, (1, 32, 32, 8))
  x = _normal(4, (1, 32, 32, 1))
  v = _numpy_init(enc, {"params": _key(5)}, s, x, sample=False)
  params = jax.tree.map(lambda a: a, v["params"])
  # logvar = log 9 everywhere: z - mean must have standard deviation 3 (exp(logvar) would give 9).
  params["logvar"] = {"kernel": jnp.zeros_like(params["logvar"]["kernel"]),
                      "bias": jnp.full_like(params["logvar"]["bias"], np.log(9.0))}
  apply = jax.jit(lambda key: enc.apply({"params": params}, s, x, rngs={"sample": key}))
  z, mean, logvar = apply(_key(6))
  eps = np.asarray((z - mean) / 3.0).ravel()
  assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1.0) < 0.05
  np.testing.assert_array_equal(np.asarray(apply(_key(6))[0]), np.asarray(z))
  assert not np.allclose(apply(_key(7))[0], z)
  with pytest.raises(Exception, match="sample"):
    _apply(enc, {"params": params}, s, x)


def test_modality_encoder_bad_input_is_named():
  enc = dis.ModalityEncoder(features=2)
  s = jnp.zeros((2, 32, 32, 8))
  x = jnp.zeros((2, 32, 32, 1))
  with pytest.raises(ValueError, match=">= 31"):
    enc.init({"params": _key(0)}, s[:, :30, :30], x[:, :30, :30], sample=False)
  with pytest.raises(ValueError, match="`image`"):
    enc.init({"params": _key(0)}, s, x[:, :16], sample=False)


# ------------------------------------------------------------------------------------------------
# Segmentor.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_segmentor_returns_logits_matching_reference(size):
  seg = dis.Segmentor(num_classes=5, modalities=MODALITIES, features=3)
  s = _onehot_factor(10, (2, size, size, 8))
  v = _numpy_init(seg, _key(0), s, seed=11, modality="mr", train=False)
  assert set(v["params"]) == {"body", "head"}
  logits = _apply(seg, v, s, modality="ct", train=False)
  assert logits.shape == (2, size, size, 5)
  p = v["params"]
  h = _conv_norm_block(s, p["body"], v["norm_shared"]["body"], v["stats_shared"]["body"])
  expected = _conv(h, p["head"]["conv"]["kernel"], p["head"]["conv"]["bias"])
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_segmentor_per_modality_norms_and_blocks():
  seg = dis.Segmentor(num_classes=3, modalities=MODALITIES, features=2, norm_per_modality=True,
                      per_modality_blocks=("head",))
  s = _onehot_factor(12, (2, 8, 8, 8))
  v = _numpy_init(seg, _key(0), s, modality="mr", train=False)
  assert set(v["params"]) == {"body", "head_mr", "head_ct"}
  assert set(v) == {"params", "norm_mr", "norm_ct", "stats_mr", "stats_ct"}
  y, upd = _apply(seg, v, s, modality="ct", train=True, mutable=("stats_ct",))
  assert set(upd) == {"stats_ct"} and _finite(y)


# ------------------------------------------------------------------------------------------------
# FiLM decoder.
# ------------------------------------------------------------------------------------------------


def _film_reference(params, s, z, slope=0.3):
  z = np.asarray(z, np.float64)
  x = _leaky(_conv(s, params["conv_in"]["kernel"], params["conv_in"]["bias"]), slope)
  for i in range(4):
    p = params[f"film{i}"]
    a = _leaky(_conv(x, p["conv0"]["kernel"], p["conv0"]["bias"]), slope)
    b = _conv(a, p["conv1"]["kernel"], p["conv1"]["bias"])
    gamma = _leaky(_dense(z, p["gamma"]), slope)[:, None, None, :]
    beta = _leaky(_dense(z, p["beta"]), slope)[:, None, None, :]
    x = a + _leaky(b * gamma + beta, slope)
  return np.tanh(_conv(x, params["conv_out"]["kernel"], params["conv_out"]["bias"]))


@pytest.mark.parametrize("size", [32, 64])
def test_film_decoder_matches_reference(size):
  dec = dis.FiLMDecoder()
  s = _onehot_factor(13, (2, size, size, 8))
  z = _normal(14, (2, 8))
  params = _numpy_init(dec, _key(0), s, z, seed=size)["params"]
  y = jax.jit(dec.apply)({"params": params}, s, z)
  assert y.shape == (2, size, size, 1)
  np.testing.assert_allclose(y, _film_reference(params, s, z), rtol=1e-4, atol=1e-5)


def test_film_output_depends_on_z_and_gradients_are_finite():
  dec = dis.FiLMDecoder(features=4)
  s = jnp.tile(_onehot_factor(15, (1, 16, 16, 8)), (2, 1, 1, 1))
  z = _normal(16, (1, 8))
  z = jnp.concatenate([z, z + 1.0])  # two samples that differ in z only
  v = _init(dec, _key(1), s, z)  # the module's own (Keras-style) initialisers

  def loss(params, z):
    y = dec.apply({"params": params}, s, z)
    return jnp.sum(y ** 2), y

  grads, y = jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(v["params"], z)
  assert float(jnp.max(jnp.abs(y[1] - y[0]))) > 1e-4
  assert float(jnp.max(jnp.abs(y))) <= 1.0
  assert _finite(grads) and float(jnp.max(jnp.abs(grads[1]))) > 0
  with pytest.raises(ValueError, match="`z`"):
    dec.apply(v, s, z[:1])


# ------------------------------------------------------------------------------------------------
# SPADE.
# ------------------------------------------------------------------------------------------------


def test_resize_nearest_takes_floor_of_scaled_index():
  x = jnp.arange(16.0).reshape(1, 4, 4, 1)
  # 4 -> 2: rows/cols 0 and 2 (top-left of each 2x2 block); 4 -> 3: floor(i * 4 / 3) = 0, 1, 2.
  np.testing.assert_array_equal(np.asarray(dis.resize_nearest(x, 2, 2))[0, ..., 0],
                                [[0, 2], [8, 10]])
  np.testing.assert_array_equal(np.asarray(dis.resize_nearest(x, 3, 2))[0, ..., 0],
                                [[0, 2], [4, 6], [8, 10]])
  np.testing.assert_array_equal(np.asarray(dis.upsample_nearest(x[:, :2, :2]))[0, ..., 0],
                                [[0, 0, 1, 1], [0, 0, 1, 1], [4, 4, 5, 5], [4, 4, 5, 5]])


def _spade_reference(params, x, s, eps=1e-3):
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=(1, 2), keepdims=True)
  var = x.var(axis=(1, 2), keepdims=True)
  normalised = (x - mean) / np.sqrt(var + eps)
  s = np.asarray(s)
  fh, fw = s.shape[1] // x.shape[1], s.shape[2] // x.shape[2]
  s = s[:, ::fh, ::fw]  # integer factors: the top-left pixel of each block
  a = _relu(_conv(s, params["shared"]["kernel"], params["shared"]["bias"]))
  gamma = _conv(a, params["gamma"]["kernel"], params["gamma"]["bias"])
  beta = _conv(a, params["beta"]["kernel"], params["beta"]["bias"])
  return normalised * (1.0 + gamma) + beta


def test_spade_op_matches_reference():
  op = dis.SPADE(hidden=5)
  x = _normal(17, (2, 4, 4, 3), scale=2.0) + 1.0
  s = _onehot_factor(18, (2, 16, 16, 8))
  params = _numpy_init(op, _key(0), x, s)["params"]
  np.testing.assert_allclose(_apply(op, {"params": params}, x, s), _spade_reference(params, x, s),
                             rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size, num_upsamples, start", [(32, 4, 2), (64, 5, 2), (192, 5, 6)])
def test_spade_decoder_shapes_and_widths(size, num_upsamples, start):
  dec = dis.SPADEDecoder(features=2, hidden=4, num_upsamples=num_upsamples)
  s = jnp.zeros((1, size, size, 8))
  z = jnp.zeros((1, 8))
  v = _shapes(dec, _key(0), s, z)
  assert _output_shape(dec, _key(0), s, z) == (1, size, size, 1)
  assert v["params"]["project"]["kernel"].shape == (8, start * start * 16)
  widths = [v["params"][f"block{i}"]["conv1"]["kernel"].shape[-1]
            for i in range(num_upsamples + 1)]
  # The authors' 128, 128, 128, 64, 32, 16 at f = 16, n = 5; one 8 f block fewer at n = 4.
  assert widths == [16, 16, 16, 8, 4, 2][5 - num_upsamples:]
  # Learned shortcuts exactly where the width changes.
  assert [("conv_shortcut" in v["params"][f"block{i}"]) for i in range(num_upsamples + 1)] == [
      a != b for a, b in zip([16] + widths[:-1], widths)]


def _spade_block_reference(params, x, s, slope=0.2):
  lrelu = lambda v: _leaky(v, slope)
  y = lrelu(_spade_reference(params["spade0"], x, s))
  y = _conv(y, params["conv0"]["kernel"], params["conv0"]["bias"])
  y = lrelu(_spade_reference(params["spade1"], y, s))
  y = _conv(y, params["conv1"]["kernel"], params["conv1"]["bias"])
  if "conv_shortcut" not in params:
    return np.asarray(x, np.float64) + y
  shortcut = _spade_reference(params["spade_shortcut"], x, s)
  return _conv(shortcut, params["conv_shortcut"]["kernel"]) + y


@pytest.mark.parametrize("fin, fout", [(4, 4), (4, 2)])
def test_spade_block_matches_reference(fin, fout):
  block = dis.SPADEBlock(fout, hidden=3)
  x = _normal(21, (2, 4, 4, fin), scale=2.0)
  s = _onehot_factor(22, (2, 8, 8, 8))
  params = _numpy_init(block, _key(0), x, s)["params"]
  assert ("conv_shortcut" in params) == (fin != fout)
  assert params["conv0"]["kernel"].shape[-1] == min(fin, fout)
  np.testing.assert_allclose(_apply(block, {"params": params}, x, s),
                             _spade_block_reference(params, x, s), rtol=1e-4, atol=1e-4)


def test_spade_decoder_runs_depends_on_z_and_has_finite_gradients():
  # A short decoder (1 up-sampling, 8 x 8) keeps the backward compile small; the authors'
  # 5-up-sampling layout is checked above through shapes.
  dec = dis.SPADEDecoder(features=2, hidden=4, num_upsamples=1)
  s = jnp.tile(_onehot_factor(19, (1, 8, 8, 8)), (2, 1, 1, 1))
  z = _normal(20, (1, 8))
  z = jnp.concatenate([z, z + 1.0])  # two samples that differ in z only
  v = _numpy_init(dec, _key(0), s, z)

  def loss(params):
    y = dec.apply({"params": params}, s, z)
    return jnp.sum(y ** 2), y

  grads, y = jax.jit(jax.grad(loss, has_aux=True))(v["params"])
  assert y.shape == (2, 8, 8, 1) and float(jnp.max(jnp.abs(y))) <= 1.0
  assert float(jnp.max(jnp.abs(y[1] - y[0]))) > 1e-4
  assert _finite(grads) and float(jnp.max(jnp.abs(grads["project"]["kernel"]))) > 0


def test_spade_decoder_size_constraints():
  dec = dis.SPADEDecoder(features=2, hidden=4)
  with pytest.raises(ValueError, match="divisible by 32"):
    dec.init(_key(0), jnp.zeros((1, 48, 48, 8)), jnp.zeros((1, 8)))
  # 32 x 32 with 5 up-samplings starts at 1 x 1, which instance norm zeroes: z would be lost.
  with pytest.raises(ValueError, match="1 x 1 start map"):
    dec.init(_key(0), jnp.zeros((1, 32, 32, 8)), jnp.zeros((1, 8)))


# ------------------------------------------------------------------------------------------------
# Pair weighting.
# ------------------------------------------------------------------------------------------------


def test_pair_weighting_matches_reference():
  net = dis.PairWeighting()
  scores = jnp.asarray(np.random.default_rng(21).uniform(size=(4, 3)), jnp.float32)
  v = _numpy_init(net, _key(0), scores)
  params = v["params"]
  weights = net.apply({"params": params}, scores)
  assert params["hidden"]["kernel"].shape == (3, 5)
  expected = _softmax(_dense(_relu(_dense(scores, params["hidden"])), params["logits"]))
  np.testing.assert_allclose(weights, expected, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="scores"):
    net.apply(v, scores[0])
