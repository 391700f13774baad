"""Deep supervision of the U-Net family: extra decoder heads, nnU-Net's weights, labels subsampled."""

import jax
import numpy as np
import pytest

from configs import common
from unpaired_seg import methods, rng
from unpaired_seg.ops import losses
from tests.method_steps import traced_once_step, two_modality_batch


def _method(name="joint", deep=True):
  config = common.get_base_config(tiny=True)
  config.method = name
  config.model.depth = 3            # heads at every decoder level but the coarsest and the finest
  config.model.deep_supervision = deep
  config.train.learning_rate = 1e-2
  return methods.create(config, num_classes=5, modalities=("mr", "ct"))


def test_decoder_heads_exist_only_when_asked_and_are_per_modality_with_their_decoder():
  batch = two_modality_batch()
  # Shapes only: tracing the init is enough to see which variables exist.
  with_ds = jax.eval_shape(_method("x_shaped").init, rng.prng_key(0), batch).params["params"]
  without = jax.eval_shape(_method("x_shaped", deep=False).init, rng.prng_key(0),
                           batch).params["params"]
  heads = sorted(b for b, v in with_ds.items() if "ds_head" in v)
  assert heads == ["dec1_ct", "dec1_mr"]                  # x_shaped: decoders per modality
  assert not any("ds_head" in v for v in without.values())


def test_the_loss_is_nnunets_weighted_sum_over_resolutions():
  method, batch = _method(), two_modality_batch()
  state = method.init(rng.prng_key(0), batch)
  # Jitted: op-by-op dispatch of a network pass is slower than compiling it.
  total, (_, metrics) = jax.jit(method.loss_fn)(state.params, state.stats, batch,
                                                rng.prng_key(1))
  # Independent recomputation from the network's own outputs.
  image = np.concatenate([batch["mr"]["image"], batch["ct"]["image"]])
  logits, _, feats = jax.jit(lambda p, st, x: method.apply(p, st, x, "mr", train=True,
                                                           rng=rng.prng_key(1)))(
      state.params, state.stats, image)
  assert sorted(feats) == ["ds_logits_1"] and feats["ds_logits_1"].shape == (8, 16, 16, 5)
  expected = 0.0
  for i, m in enumerate(("mr", "ct")):
    lab = batch[m]["label"]
    full = losses.dice_ce_loss(logits[4 * i:4 * i + 4], lab)
    half = losses.dice_ce_loss(feats["ds_logits_1"][4 * i:4 * i + 4], lab[:, ::2, ::2])
    want = (1.0 * full + 0.5 * half) / 1.5
    np.testing.assert_allclose(float(metrics[f"seg_{m}"]), float(want), rtol=1e-5)
    expected += want
  np.testing.assert_allclose(float(total), float(expected), rtol=1e-5)


def test_deep_supervision_trains_with_finite_gradients_and_one_trace():
  method, batch = _method(), two_modality_batch()
  state = method.init(rng.prng_key(0), batch)
  head = state.params["params"]["dec1"]["ds_head"]["kernel"]
  step = traced_once_step(method)
  losses_seen = []
  for _ in range(15):
    state, metrics = step(state, batch)
    losses_seen.append(float(metrics["loss"]))
    assert np.isfinite(float(metrics["grad_norm"]))
  # The head is trained: its kernel moved (its gradient is not zero).
  assert float(np.abs(state.params["params"]["dec1"]["ds_head"]["kernel"] - head).max()) > 0
  assert np.isfinite(losses_seen).all() and losses_seen[-1] < 0.75 * losses_seen[0], losses_seen
  # Inference reads the full-resolution head only.
  assert method.predict(state, batch["mr"]["image"], "mr").shape == (4, 32, 32, 5)


def test_deep_supervision_needs_a_unet():
  config = common.get_base_config(tiny=True)
  config.method, config.model.name, config.model.deep_supervision = "joint", "dilated", True
  with pytest.raises(ValueError, match="model.deep_supervision"):
    methods.create(config, num_classes=5, modalities=("mr", "ct"))
