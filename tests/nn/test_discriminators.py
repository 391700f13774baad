"""Tests of unpaired_seg.nn.discriminators: shapes, the mask input, spectral norm, soft penalty.

  python -m pytest -q tests/nn/test_discriminators.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unpaired_seg.nn import discriminators as D


def _key(seed):
  """A PRNG key whose random-bit generator compiles much faster on CPU than threefry's."""
  return jax.random.key(seed, impl="rbg")


def _normal(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _finite(tree):
  return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


def _numpy_init(module, x, seed=0):
  """Variables with the structure and shapes `module.init` gives, filled from numpy.

  Skips compiling the random initialisers, which dominates these tests' time on CPU.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    if path[-1].key == "kernel":
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    elif path[-1].key == "bias":
      value = rng.normal(0.0, 0.1, leaf.shape)
    else:  # the power-iteration vector u
      value = rng.normal(size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, jax.eval_shape(module.init, _key(0), x))


def _output_shape(module, x):
  return jax.eval_shape(lambda r, x: module.init_with_output(r, x)[0], _key(0), x).shape


# ------------------------------------------------------------------------------------------------
# Shapes and inputs.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, padding", [(64, "VALID"), (46, "VALID"), (192, "VALID"),
                                           (32, "SAME")])
def test_output_is_one_score_per_sample(size, padding):
  for spectral in D.SPECTRAL_MODES:
    disc = D.Discriminator(features=2, spectral=spectral, padding=padding)
    assert _output_shape(disc, jnp.zeros((3, size, size, 1))) == (3, 1)
  # VALID: 64 -> 31 -> 14 -> 6 -> 3, 46 -> 22 -> 10 -> 4 -> 1, 192 -> 95 -> 46 -> 22 -> 19;
  # SAME: 32 -> 16 -> 8 -> 4 -> 4.
  expected = {64: 3, 46: 1, 192: 19, 32: 4}[size]
  assert D.discriminator_output_size(size, padding) == expected
  shapes = jax.eval_shape(D.Discriminator(features=2, padding=padding).init, _key(0),
                          jnp.zeros((3, size, size, 1)))
  assert shapes["params"]["dense"]["kernel"].shape == (expected * expected * 16, 1)
  assert [shapes["params"][f"conv{i}"]["kernel"].shape[-1] for i in range(4)] == [2, 4, 8, 16]


def test_too_small_input_and_bad_settings_are_named():
  x = jnp.zeros((1, 45, 45, 1))
  with pytest.raises(ValueError, match=">= 46"):
    D.Discriminator(features=2).init(_key(0), x)
  with pytest.raises(ValueError, match=">= 46"):
    D.Discriminator(features=2).init(_key(0), jnp.zeros((1, 32, 32, 1)))
  with pytest.raises(ValueError, match="spectral"):
    D.Discriminator(features=2, spectral="weight").init(_key(0), jnp.zeros((1, 64, 64, 1)))
  with pytest.raises(ValueError, match="padding"):
    D.Discriminator(features=2, padding="same").init(_key(0), jnp.zeros((1, 64, 64, 1)))
  with pytest.raises(ValueError, match="exclude_background"):
    D.Discriminator(features=2, exclude_background=True).init(_key(0), jnp.zeros((1, 64, 64, 1)))


def test_mask_discriminator_ignores_the_background_channel():
  disc = D.Discriminator(features=2, exclude_background=True)
  masks = jax.nn.softmax(_normal(0, (2, 48, 48, 4)), axis=-1)
  variables = jax.jit(disc.init)(_key(1), masks)  # the module's own initialisers
  assert variables["params"]["conv0"]["kernel"].shape == (4, 4, 3, 2)
  apply = jax.jit(disc.apply)
  scores = apply(variables, masks)
  np.testing.assert_array_equal(np.asarray(apply(variables, masks.at[..., 0].set(7.0))),
                                np.asarray(scores))
  assert not np.allclose(apply(variables, masks.at[..., 1].set(7.0)), scores)


@pytest.mark.parametrize("spectral", D.SPECTRAL_MODES)
def test_collections_forward_and_backward(spectral):
  disc = D.Discriminator(features=2, spectral=spectral)
  x = _normal(2, (2, 48, 48, 1))
  variables = _numpy_init(disc, x, seed=3)
  expected_u = {"paper": {"conv0", "conv1", "conv2", "conv3", "dense"},
                "code": {"conv1", "conv2", "conv3"}, "none": set()}[spectral]
  # Sown penalties never enter the init variables (passed back, they would accumulate).
  assert set(variables) == ({"params", "spectral"} if expected_u else {"params"})
  assert set(variables.get("spectral", {})) == expected_u

  def loss(params):
    scores, updates = disc.apply({**variables, "params": params}, x,
                                 mutable=["spectral", "penalties"])
    return jnp.mean(scores ** 2) + D.collected_penalty(updates), (scores, updates)

  grads, (scores, updates) = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
  assert scores.shape == (2, 1) and _finite(scores) and _finite(grads)
  assert set(updates) == ({"spectral"} if expected_u else set()) | (
      {"penalties"} if spectral == "code" else set())
  for name in expected_u:  # u advanced because 'spectral' was mutable
    assert not np.allclose(updates["spectral"][name]["u"], variables["spectral"][name]["u"])
  # Without 'spectral' mutable the state stays as it was, and nothing is sown.
  _, unchanged = disc.apply(variables, x, mutable=[])
  assert unchanged == {}


def test_spectral_normalisation_makes_every_layer_scale_invariant():
  # W / sigma(W) does not change when W is scaled: with every layer normalised, neither does D.
  x = _normal(4, (2, 46, 46, 2))
  for spectral in D.SPECTRAL_MODES:
    disc = D.Discriminator(features=2, spectral=spectral)
    variables = _numpy_init(disc, x, seed=5)
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, a: a * 10.0 if path[-1].key == "kernel" else a, variables["params"])
    both = jax.tree.map(lambda a, b: jnp.stack([a, b]), variables["params"], scaled)
    scores = jax.jit(jax.vmap(lambda p: disc.apply({**variables, "params": p}, x)))(both)
    if spectral == "paper":
      np.testing.assert_allclose(scores[1], scores[0], rtol=1e-4, atol=1e-6)
    else:
      assert not np.allclose(scores[1], scores[0], rtol=1e-2)


# ------------------------------------------------------------------------------------------------
# Spectral normalisation: the largest singular value of the effective kernel is 1.
# ------------------------------------------------------------------------------------------------


def _effective_conv_kernel(layer, variables, kh, kw, cin):
  """The kernel the layer applies, read off its outputs on one-hot probes (no access to W).

  A kh x kw VALID patch gives one output position, y = sum x * K + b: a one-hot probe at (i, j, c)
  gives K[i, j, c] + b and the zero probe gives b.
  """
  n = kh * kw * cin
  probes = np.concatenate([np.eye(n), np.zeros((1, n))]).reshape(n + 1, kh, kw, cin)
  out = np.asarray(layer.apply(variables, jnp.asarray(probes, jnp.float32)))[:, 0, 0, :]
  return out[:-1] - out[-1]  # [kh * kw * cin, cout]


def _iterate(layer, variables, x, times):
  step = jax.jit(lambda v: layer.apply(v, x, mutable=["spectral"])[1])
  for _ in range(times):
    variables = {**variables, **step(variables)}
  return variables


def test_spectral_conv_has_unit_largest_singular_value_after_power_iterations():
  layer = D.SpectralConv(4, (4, 4), (2, 2))
  x = _normal(6, (2, 8, 8, 3))
  variables = _numpy_init(layer, x, seed=7)
  # Random kernels have close top singular values (slow convergence): iterate generously.
  variables = _iterate(layer, variables, x, 60)
  effective = _effective_conv_kernel(layer, variables, 4, 4, 3)
  top = np.linalg.svd(effective, compute_uv=False)[0]
  assert 1.0 - 1e-3 <= top <= 1.0 + 1e-3
  # It is W divided by one positive number.
  ratio = np.asarray(variables["params"]["kernel"]).reshape(-1, 4) / effective
  np.testing.assert_allclose(ratio, ratio.flat[0], rtol=1e-4)
  assert ratio.flat[0] > 0


def test_spectral_dense_has_unit_largest_singular_value_after_power_iterations():
  layer = D.SpectralDense(5)
  x = _normal(8, (3, 7))
  variables = _numpy_init(layer, x, seed=9)
  # Random kernels have close top singular values (slow convergence): iterate generously.
  variables = _iterate(layer, variables, x, 60)
  apply = jax.jit(layer.apply)
  effective = np.asarray(apply(variables, jnp.eye(7))) - np.asarray(apply(variables,
                                                                          jnp.zeros((1, 7))))
  top = np.linalg.svd(effective, compute_uv=False)[0]
  assert 1.0 - 1e-3 <= top <= 1.0 + 1e-3


def test_power_iteration_converges_to_the_largest_singular_value():
  matrix = _normal(10, (12, 5))
  u = _normal(11, (5,))
  expected = np.linalg.svd(np.asarray(matrix), compute_uv=False)[0]
  _, _, sigma1 = D.power_iteration(matrix, u, 1)
  _, _, sigma50 = D.power_iteration(matrix, u, 50)
  assert float(sigma1) <= expected * (1 + 1e-6)  # an under-estimate, never above
  np.testing.assert_allclose(float(sigma50), expected, rtol=1e-5)
  with pytest.raises(ValueError, match="steps"):
    D.power_iteration(matrix, u, 0)
  with pytest.raises(ValueError, match="`u`"):
    D.power_iteration(matrix, u[:3], 1)


# ------------------------------------------------------------------------------------------------
# The authors' soft penalty.
# ------------------------------------------------------------------------------------------------


def test_soft_penalty_hand_computed_value_and_gradient():
  # W = [[2, 1], [1, 2]] (a 1x1 conv kernel) has singular values 3 and 1, the top one along
  # (1, 1) / sqrt 2: starting there, sigma = 3 exactly. W / sigma - W = -2/3 W, so the penalty
  # is 10 * mean(2/3 * (2, 1, 1, 2)) = 10.
  kernel = jnp.asarray([[2.0, 1.0], [1.0, 2.0]]).reshape(1, 1, 2, 2)
  u = jnp.asarray([1.0, 1.0]) / np.sqrt(2.0)
  penalty, new_u = D.soft_spectral_penalty(kernel, u)
  np.testing.assert_allclose(float(penalty), 10.0, rtol=1e-6)
  np.testing.assert_allclose(new_u, u, rtol=1e-6)
  # The target is a constant: d/dW 10 * mean|c - W| = -10/4 sign(c - W) = 2.5 everywhere here.
  grad = jax.grad(lambda k: D.soft_spectral_penalty(k, u)[0])(kernel)
  np.testing.assert_allclose(np.asarray(grad).reshape(2, 2), 2.5, rtol=1e-6)


def _numpy_penalty(kernel, u, iterations=3, weight=10.0):
  """Reference in float64 with explicit loops over the matrix entries."""
  w = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
  rows, cols = w.shape
  u = np.asarray(u, np.float64)
  for _ in range(iterations):
    v = np.array([sum(w[i, j] * u[j] for j in range(cols)) for i in range(rows)])
    v /= np.sqrt(np.sum(v ** 2))
    u = np.array([sum(w[i, j] * v[i] for i in range(rows)) for j in range(cols)])
    u /= np.sqrt(np.sum(u ** 2))
  sigma = sum(v[i] * w[i, j] * u[j] for i in range(rows) for j in range(cols))
  return weight * np.mean(np.abs(w / sigma - w)), u, sigma


def test_soft_penalty_matches_numpy_reference():
  kernel = _normal(12, (4, 4, 2, 3))
  u = _normal(13, (3,))
  penalty, new_u = D.soft_spectral_penalty(kernel, u)
  expected, expected_u, sigma = _numpy_penalty(kernel, u)
  np.testing.assert_allclose(float(penalty), expected, rtol=1e-5)
  np.testing.assert_allclose(new_u, expected_u, rtol=1e-5, atol=1e-6)
  # Only the second W carries a gradient: d/dW = -(10 / n) sign(W / sigma - W). A target that
  # was not stopped would add terms through W / sigma.
  grad = jax.grad(lambda k: D.soft_spectral_penalty(k, u)[0])(kernel)
  w = np.asarray(kernel, np.float64)
  np.testing.assert_allclose(grad, -10.0 / w.size * np.sign(w / sigma - w), rtol=1e-5)


def test_code_discriminator_sows_the_penalty_of_its_three_block_convs():
  disc = D.Discriminator(features=2, spectral="code")
  x = _normal(14, (2, 48, 48, 1))
  variables = _numpy_init(disc, x, seed=15)
  _, updates = jax.jit(lambda v: disc.apply(v, x, mutable=["spectral", "penalties"]))(variables)
  assert set(updates["penalties"]) == {"conv1", "conv2", "conv3"}
  expected = 0.0
  for name in ("conv1", "conv2", "conv3"):
    value, u, _ = _numpy_penalty(variables["params"][name]["kernel"],
                                 variables["spectral"][name]["u"])
    expected += value
    np.testing.assert_allclose(updates["spectral"][name]["u"], u, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(D.collected_penalty(updates)), expected, rtol=1e-5)
  assert float(D.collected_penalty({"spectral": updates["spectral"]})) == 0.0
