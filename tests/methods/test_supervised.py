"""The individual and joint plug-ins: sharing, loss falls, finite gradients, one trace."""

import jax
import numpy as np
import pytest

from configs import common
from unpaired_seg import methods, rng
from unpaired_seg.methods.base import count_parameters
from tests.method_steps import traced_once_step, two_modality_batch

_batch = two_modality_batch


def _config(method):
  config = common.get_base_config(tiny=True)
  config.method = method
  return config


@pytest.mark.parametrize("name", ["individual", "joint"])
def test_loss_falls_with_finite_gradients_and_one_trace(name):
  config = _config(name)
  config.train.learning_rate = 1e-2
  method = methods.create(config, num_classes=5, modalities=("mr", "ct"))
  batch = _batch()
  state = method.init(rng.prng_key(0), batch)
  step = traced_once_step(method)
  losses = []
  for _ in range(20):
    state, metrics = step(state, batch)
    assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.75 * losses[0], losses
  assert int(state.step) == 20


def test_individual_has_twice_the_kernels_of_joint():
  batch = _batch()
  joint = methods.create(_config("joint"), 5, ("mr", "ct"))
  individual = methods.create(_config("individual"), 5, ("mr", "ct"))
  pj = joint.init(rng.prng_key(0), batch).params
  pi = individual.init(rng.prng_key(0), batch).params
  assert count_parameters(pi["params"]) == 2 * count_parameters(pj["params"])
  assert set(pj) == {"params", "norm_shared"}
  assert set(pi) == {"params", "norm_mr", "norm_ct"}
  assert all(k.endswith(("_mr", "_ct")) for k in pi["params"])
  assert not any(k.endswith(("_mr", "_ct")) for k in pj["params"])


def test_individual_networks_are_independent():
  """A CT-only loss gives zero gradient to every MR kernel and MR norm parameter."""
  method = methods.create(_config("individual"), 5, ("mr", "ct"))
  batch = _batch()
  state = method.init(rng.prng_key(0), batch)
  only_ct = {m: {**b, "labelled": b["labelled"] * (m == "ct")} for m, b in batch.items()}
  grads, _ = jax.grad(method.loss_fn, has_aux=True)(state.params, state.stats, only_ct)
  mr = [v for k, v in grads["params"].items() if k.endswith("_mr")] + [grads["norm_mr"]]
  ct = [v for k, v in grads["params"].items() if k.endswith("_ct")]
  assert all(float(np.abs(x).max()) == 0.0 for x in jax.tree.leaves(mr))
  assert any(float(np.abs(x).max()) > 0.0 for x in jax.tree.leaves(ct))


def test_joint_uses_one_mixed_batch_for_statistics():
  method = methods.create(_config("joint"), 5, ("mr", "ct"))
  batch = _batch()
  state = method.init(rng.prng_key(0), batch)
  _, (stats, _) = method.loss_fn(state.params, state.stats, batch)
  assert set(stats) == {"stats_shared"}
  assert method.mixed_batch


def test_prediction_shape():
  method = methods.create(_config("individual"), 5, ("mr", "ct"))
  batch = _batch()
  state = method.init(rng.prng_key(0), batch)
  logits = method.predict(state, batch["ct"]["image"], "ct")
  assert logits.shape == (4, 32, 32, 5)


def test_per_modality_copies_hold_only_their_own_norm_variables():
  method = methods.create(_config("individual"), 5, ("mr", "ct"))
  params = method.init(rng.prng_key(0), _batch()).params
  assert all(k.endswith("_mr") for k in params["norm_mr"])
  assert all(k.endswith("_ct") for k in params["norm_ct"])
  joint = methods.create(_config("joint"), 5, ("mr", "ct"))
  assert count_parameters(params["norm_mr"]) == count_parameters(
      joint.init(rng.prng_key(0), _batch()).params["norm_shared"])


def test_intermediate_features_can_be_collected():
  method = methods.create(_config("joint"), 5, ("mr", "ct"))
  state = method.init(rng.prng_key(0), _batch())
  _, inter = method.network.apply({**state.params, **state.stats}, _batch()["mr"]["image"],
                                  modality="mr", train=False, mutable=["intermediates"])
  assert {"bottleneck_features", "dec0_features"} <= set(inter["intermediates"])
