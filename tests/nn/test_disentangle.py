"""Tests of the encoders of unpaired_seg.nn.disentangle (anatomy, modality) and the segmentor
against slow numpy re-implementations (tests/nn/disentangle_reference.py).

  python -m pytest -q tests/nn/test_disentangle.py
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unpaired_seg.nn import disentangle as dis
from unpaired_seg.nn.unet import unet_blocks
from tests.nn.disentangle_reference import (MODALITIES, _key, _normal, _onehot_factor, _shapes,
    _output_shape, _apply, _finite, _conv, _leaky, _dense, _conv_norm_block, _anatomy_reference,
    _numpy_init)

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
