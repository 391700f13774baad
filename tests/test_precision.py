"""train.compute_dtype='bfloat16': the networks compute in bfloat16, everything that accumulates in
float32; a tiny joint config trains with finite, falling losses, and every state leaf stays float32."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, dafnet
from unpaired_seg import methods, rng
from unpaired_seg.data import loader
from unpaired_seg.nn.norms import ModalityNorm
from unpaired_seg.ops import precision
from tests.method_steps import traced_once_step, two_modality_batch as _batch


def test_cast_floating_casts_floating_leaves_only():
  tree = {"w": jnp.ones((2,), jnp.float32), "n": jnp.arange(3), "b": jnp.array([True]),
          "name": "mr"}
  out = precision.cast_floating(tree, jnp.bfloat16)
  assert out["w"].dtype == jnp.bfloat16
  assert out["n"].dtype == tree["n"].dtype and out["b"].dtype == jnp.bool_
  assert out["name"] == "mr"
  assert precision.to_float32(out)["w"].dtype == jnp.float32


def test_an_unknown_compute_dtype_names_the_config_key():
  with pytest.raises(ValueError, match="train.compute_dtype"):
    precision.compute_dtype("float16")


def test_batch_norm_of_bfloat16_input_keeps_float32_statistics():
  x = jax.random.normal(rng.prng_key(0), (4, 8, 8, 3)) * 3.0 + 5.0
  norm = ModalityNorm(("mr",))
  variables = norm.init(rng.prng_key(1), x, "mr", train=False)
  y32, upd32 = norm.apply(variables, x, "mr", train=True, mutable=["stats_mr"])
  y16, upd16 = norm.apply(variables, x.astype(jnp.bfloat16), "mr", train=True,
                          mutable=["stats_mr"])
  assert y16.dtype == jnp.bfloat16 and y32.dtype == jnp.float32
  for leaf in jax.tree.leaves(upd16):
    assert leaf.dtype == jnp.float32
  # Only the input's rounding to bfloat16 (8 bits of mantissa) separates the two.
  np.testing.assert_allclose(np.asarray(y16, np.float32), y32, atol=0.05)
  chex.assert_trees_all_close(upd16, upd32, rtol=1e-2)


def _joint(dtype):
  config = common.get_base_config(tiny=True)
  config.method = "joint"
  config.train.learning_rate = 1e-2
  config.train.compute_dtype = dtype
  return methods.create(config, num_classes=5, modalities=("mr", "ct"))


def test_joint_in_bfloat16_trains_with_float32_state_and_one_trace():
  method, batch = _joint("bfloat16"), _batch()
  state = method.init(rng.prng_key(0), batch)
  step = traced_once_step(method)
  losses = []
  for _ in range(20):
    state, metrics = step(state, batch)
    assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.75 * losses[0], losses
  # Parameters, Adam moments and running statistics stay float32: the optimiser updates the
  # float32 copy, never a rounded one.
  for leaf in jax.tree.leaves((state.params, state.stats, state.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  logits = method.predict(state, batch["mr"]["image"], "mr")
  assert logits.dtype == jnp.float32


def test_bfloat16_logits_are_the_float32_logits_to_bfloat16_precision():
  batch = _batch()
  f32, b16 = _joint("float32"), _joint("bfloat16")
  state = f32.init(rng.prng_key(0), batch)
  image = batch["ct"]["image"]
  a = np.asarray(jax.jit(lambda s: f32.predict(s, image, "ct"))(state))
  b = np.asarray(jax.jit(lambda s: b16.predict(s, image, "ct"))(state))
  assert not np.array_equal(a, b)   # the bfloat16 path really ran
  assert np.max(np.abs(a - b)) < 0.05 * np.max(np.abs(a)) + 0.05


def test_mmsdnet_networks_compute_in_bfloat16_and_return_float32(tmp_path):
  config = dafnet.get_config("tiny")
  config.data.root = str(tmp_path / "paired")
  data = loader.load_data(config, tmp_path / "work")
  out = {}
  for dtype in ("float32", "bfloat16"):
    config.train.compute_dtype = dtype
    method = methods.create(config, num_classes=len(data.class_names),
                            modalities=data.modalities)
    batch = method.host_batch(data, 0)
    state = method.init(rng.prng_key(0), batch) if dtype == "float32" else state
    image = batch["mr"]["image"]
    out[dtype] = np.asarray(jax.jit(lambda s, m=method: m.predict(s, image, "mr"))(state))
  assert out["bfloat16"].dtype == np.float32 and np.all(np.isfinite(out["bfloat16"]))
  assert not np.array_equal(out["float32"], out["bfloat16"])
  # The anatomy factor is binarised: a rounding near its threshold flips a channel at a few
  # pixels (and the untrained logits are near ties), so the comparison is on the mean difference.
  diff = np.abs(out["float32"] - out["bfloat16"])
  assert diff.mean() < 0.02 * np.abs(out["float32"]).mean() + 0.01, diff.mean()
