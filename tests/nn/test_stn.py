"""Tests of unpaired_seg.nn.stn: identity at init, gradients, the warp's wiring, max fusion.

  python -m pytest -q tests/nn/test_stn.py
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unpaired_seg.nn import stn


def _key(seed):
  """A PRNG key whose random-bit generator compiles much faster on CPU than threefry's."""
  return jax.random.key(seed, impl="rbg")


def _factor(seed, shape):
  """A smooth random soft factor [B, H, W, C] in [0, 1] (smooth, so a warp changes it gently)."""
  rng = np.random.default_rng(seed)
  b, h, w, c = shape
  rows = np.linspace(0, 1, h)[None, :, None, None]
  cols = np.linspace(0, 1, w)[None, None, :, None]
  phase = rng.uniform(0, 2 * np.pi, (b, 1, 1, c))
  return jnp.asarray(0.5 + 0.5 * np.sin(3 * rows + 5 * cols + phase), jnp.float32)


def _finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("size, last", [(32, 1), (64, 9)])
def test_initial_transformer_is_the_identity(size, last):
  transformer = stn.SpatialTransformer(features=4, hidden=8)
  moving = _factor(0, (2, size, size, 8))
  fixed = _factor(1, (2, size, size, 8))
  variables = jax.jit(transformer.init)(_key(2), moving, fixed)
  # 32 -> 28 -> 14 -> 10 -> 5 -> 1 and 64 -> 60 -> 30 -> 26 -> 13 -> 9 (VALID 5x5, pool 2).
  assert stn.localisation_output_size(size) == last
  params = variables["params"]["localisation"]
  assert params["hidden"]["kernel"].shape == (last * last * 4, 8)
  assert params["offsets"]["kernel"].shape == (8, 50)
  np.testing.assert_array_equal(params["offsets"]["kernel"], 0.0)
  np.testing.assert_array_equal(params["offsets"]["bias"], 0.0)
  warped, displacements = jax.jit(transformer.apply)(variables, moving, fixed)
  assert displacements.shape == (2, 25, 2)
  np.testing.assert_array_equal(np.asarray(displacements), 0.0)
  assert warped.shape == moving.shape
  np.testing.assert_allclose(warped, moving, atol=1e-5)


def test_gradients_reach_the_last_layer_of_the_localisation_net():
  transformer = stn.SpatialTransformer(features=4, hidden=8)
  moving = _factor(3, (2, 32, 32, 3))
  fixed = _factor(4, (2, 32, 32, 3))
  variables = jax.jit(transformer.init)(_key(5), moving, fixed)
  weights = jnp.asarray(np.random.default_rng(6).normal(size=moving.shape), jnp.float32)

  def loss(params):
    warped, _ = transformer.apply({"params": params}, moving, fixed)
    return jnp.sum(weights * warped)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  assert _finite(grads)
  last = grads["localisation"]["offsets"]
  assert float(jnp.max(jnp.abs(last["kernel"]))) > 0
  assert float(jnp.max(jnp.abs(last["bias"]))) > 0


@pytest.mark.parametrize("axis", [0, 1])
def test_uniform_offset_is_a_translation_along_the_right_axis(axis):
  # Every control point moved by one pixel along `axis` (row = 0, col = 1): output pixel p
  # samples p + 1 along that axis, so the warp shifts the factor by one pixel. This pins the
  # [B, 50] -> [B, 25, 2] (row, col) reshape and the wiring to the TPS.
  size = 32
  transformer = stn.SpatialTransformer(features=2, hidden=4)
  moving = _factor(7, (1, size, size, 2))
  variables = jax.jit(transformer.init)(_key(8), moving, moving)
  bias = np.zeros((25, 2), np.float32)
  bias[:, axis] = 1.0 / (size - 1)
  params = jax.tree.map(lambda a: a, variables["params"])
  params["localisation"]["offsets"]["bias"] = jnp.asarray(bias.reshape(50))
  warped, displacements = jax.jit(transformer.apply)({"params": params}, moving, moving)
  np.testing.assert_allclose(displacements[0], bias, rtol=1e-6)
  m, w = np.asarray(moving[0]), np.asarray(warped[0])
  if axis == 0:
    np.testing.assert_allclose(w[:-1], m[1:], atol=1e-4)
  else:
    np.testing.assert_allclose(w[:, :-1], m[:, 1:], atol=1e-4)


def test_localisation_net_rejects_small_or_mismatched_inputs():
  net = stn.LocalisationNet(features=2, hidden=4)
  with pytest.raises(ValueError, match=">= 32"):
    net.init(_key(0), jnp.zeros((1, 31, 40, 8)), jnp.zeros((1, 31, 40, 8)))
  with pytest.raises(ValueError, match="`moving`.*`fixed`"):
    net.init(_key(0), jnp.zeros((1, 32, 32, 8)), jnp.zeros((2, 32, 32, 8)))
  with pytest.raises(ValueError, match="`moving`"):
    net.init(_key(0), jnp.zeros((32, 32, 8)), jnp.zeros((32, 32, 8)))


def test_max_fusion_of_one_factor_is_the_identity():
  s = _factor(9, (2, 4, 4, 3))
  np.testing.assert_array_equal(np.asarray(stn.max_fusion(s)), np.asarray(s))


def test_max_fusion_is_an_elementwise_max_for_any_number_of_inputs():
  factors = [_factor(10 + i, (2, 5, 4, 3)) * (i + 1) / 4 for i in range(4)]
  for n in (2, 3, 4):
    fused = np.asarray(stn.max_fusion(*factors[:n]))
    # Reference: a loop over the elements.
    stacked = np.stack([np.asarray(f) for f in factors[:n]])
    expected = np.empty_like(fused)
    for index in itertools.product(*(range(d) for d in fused.shape)):
      expected[index] = max(stacked[(k,) + index] for k in range(n))
    np.testing.assert_array_equal(fused, expected)
    # Commutative: every order gives the same result.
    for order in itertools.permutations(range(n)):
      np.testing.assert_array_equal(np.asarray(stn.max_fusion(*(factors[k] for k in order))),
                                    fused)


def test_max_fusion_binary_factors_and_gradient():
  a = jnp.asarray([[0.0, 1.0, 1.0, 0.0]])
  b = jnp.asarray([[0.0, 0.0, 1.0, 1.0]])
  np.testing.assert_array_equal(np.asarray(stn.max_fusion(a, b)), [[0, 1, 1, 1]])
  ga, gb = jax.grad(lambda a, b: jnp.sum(stn.max_fusion(a, b)), argnums=(0, 1))(a, b)
  # The larger input takes the gradient; a tie splits it evenly, in either order.
  np.testing.assert_array_equal(np.asarray(ga), [[0.5, 1.0, 0.5, 0.0]])
  np.testing.assert_array_equal(np.asarray(gb), [[0.5, 0.0, 0.5, 1.0]])


def test_max_fusion_rejects_bad_input():
  with pytest.raises(ValueError, match="at least one"):
    stn.max_fusion()
  with pytest.raises(ValueError, match="factor 1"):
    stn.max_fusion(jnp.zeros((2, 3)), jnp.zeros((3, 2)))
