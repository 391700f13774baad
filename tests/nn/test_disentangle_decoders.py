"""Tests of the decoders of unpaired_seg.nn.disentangle (FiLM, SPADE) and the pair weighting
against slow numpy re-implementations (tests/nn/disentangle_reference.py).

  python -m pytest -q tests/nn/test_disentangle_decoders.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unpaired_seg.nn import disentangle as dis
from tests.nn.disentangle_reference import (_key, _normal, _onehot_factor, _init, _shapes,
    _output_shape, _apply, _finite, _conv, _leaky, _relu, _dense, _softmax, _numpy_init)


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
