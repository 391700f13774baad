"""Schedules, optimisers and the weights' moving average of the supervised methods.

  python -m pytest -q tests/test_optim.py
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from unpaired_seg import config_schema, methods, optim, rng
from unpaired_seg import bookkeeping
from unpaired_seg.methods import supervised
from tests.method_steps import traced_once_step, two_modality_batch


def _train_config(**overrides):
  t = common.get_base_config(tiny=True).train
  t.update(overrides)
  return t


def _tree(*shapes, seed=0):
  r = np.random.default_rng(seed)
  return {f"w{i}": jnp.asarray(r.standard_normal(s), jnp.float32) for i, s in enumerate(shapes)}


# ------------------------------------------------------------------------------------------------
# Schedules.
# ------------------------------------------------------------------------------------------------

def test_poly_schedule_is_nnunets_formula_after_a_linear_warm_up():
  lr, steps, warmup = 1e-2, 100, 4
  schedule = optim.learning_rate_schedule(_train_config(
      learning_rate=lr, steps=steps, lr_schedule="poly", lr_warmup_steps=warmup))
  for count in range(warmup):          # the ramp: lr (count + 1) / (W + 1), never 0
    np.testing.assert_allclose(float(schedule(count)), lr * (count + 1) / (warmup + 1), rtol=1e-6)
  for count in (warmup, warmup + 1, 50, steps - 1):
    expect = lr * (1 - (count - warmup) / (steps - warmup)) ** 0.9
    np.testing.assert_allclose(float(schedule(count)), expect, rtol=1e-5)
  assert float(schedule(steps - 1)) > 0 and float(schedule(steps)) == 0.0
  plain = optim.learning_rate_schedule(_train_config(
      learning_rate=lr, steps=steps, lr_schedule="poly", lr_poly_exponent=2.0))
  np.testing.assert_allclose(float(plain(30)), lr * 0.7 ** 2, rtol=1e-5)
  # The old import path still works, with the whole config as before.
  old = supervised.learning_rate_schedule(common.get_base_config(tiny=True))
  assert float(old(0)) == pytest.approx(2e-3)


def test_exponential_is_the_default_and_a_warm_up_longer_than_the_run_is_refused():
  t = _train_config(learning_rate=1e-3, lr_decay=dict(rate=0.5, every=10))
  assert t.lr_schedule == "exponential" and t.optimizer == "adam" and t.ema_decay == 0
  np.testing.assert_allclose(float(optim.learning_rate_schedule(t)(20)), 1e-3 * 0.25, rtol=1e-6)
  with pytest.raises(ValueError, match=r"train\.lr_warmup_steps"):
    optim.learning_rate_schedule(_train_config(lr_warmup_steps=8, steps=8))


# ------------------------------------------------------------------------------------------------
# Optimisers.
# ------------------------------------------------------------------------------------------------

def test_sgd_is_nesterov_as_pytorch_writes_it():
  """v = mu v + g; p -= lr (g + mu v), checked over two updates against numpy."""
  lr, mu = 0.1, 0.99
  t = _train_config(optimizer="sgd", momentum=mu)
  tx = optim.make_optimizer(t, optax.constant_schedule(lr))
  params = _tree((3, 2), (4,))
  grads = [_tree((3, 2), (4,), seed=1), _tree((3, 2), (4,), seed=2)]
  state = tx.init(params)
  p_ref = {k: np.asarray(v, np.float64) for k, v in params.items()}
  v_ref = {k: np.zeros_like(v) for k, v in p_ref.items()}
  for g in grads:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    for k in p_ref:
      gk = np.asarray(g[k], np.float64)
      v_ref[k] = mu * v_ref[k] + gk
      p_ref[k] = p_ref[k] - lr * (gk + mu * v_ref[k])
      np.testing.assert_allclose(np.asarray(params[k]), p_ref[k], rtol=1e-5, atol=1e-6)


def test_clipping_caps_the_global_norm_and_is_off_by_default():
  params = _tree((3, 2), (4,))
  grads = jax.tree.map(lambda x: 100.0 * x, _tree((3, 2), (4,), seed=1))
  # SGD without momentum at lr 1: the update is minus the (clipped) gradient.
  tx = optim.make_optimizer(_train_config(optimizer="sgd", momentum=0.0, grad_clip=12.0),
                            optax.constant_schedule(1.0))
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(optax.tree.norm(grads)) > 12
  np.testing.assert_allclose(float(optax.tree.norm(updates)), 12.0, rtol=1e-5)
  # Off: the state is optax.adam's own, as before (checkpoints and tests index opt_state[0].mu).
  default = optim.make_optimizer(_train_config(), optax.constant_schedule(1e-3))
  assert isinstance(default.init(params)[0], optax.ScaleByAdamState)


def test_adamw_decays_kernels_only():
  """With zero gradients Adam's step is 0, so only the decoupled decay p -= lr wd p is left."""
  lr, wd = 0.1, 0.5
  tx = optim.make_optimizer(_train_config(optimizer="adamw", adamw_weight_decay=wd),
                            optax.constant_schedule(lr))
  params = _tree((3, 3, 1, 2), (2,))      # a conv kernel and a bias
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  np.testing.assert_allclose(np.asarray(new["w0"]), np.asarray(params["w0"]) * (1 - lr * wd),
                             rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(new["w1"]), np.asarray(params["w1"]))


@pytest.mark.parametrize("key,value", [
    ("optimizer", "rmsprop"), ("lr_schedule", "cosine"), ("momentum", 1.0), ("grad_clip", -1.0),
    ("ema_decay", 1.0), ("lr_warmup_steps", -1), ("lr_poly_exponent", 0.0),
    ("adamw_weight_decay", -0.1)])
def test_bad_values_name_the_key(key, value):
  config = common.get_base_config(tiny=True)
  config.train[key] = value
  with pytest.raises(config_schema.ConfigError, match=rf"'train\.{key}'"):
    config_schema.validate(config, methods.REGISTRY)


# ------------------------------------------------------------------------------------------------
# The moving average in the supervised methods.
# ------------------------------------------------------------------------------------------------

def _numpy_average(values, d):
  """sum_i d**(n-i) v_i / sum_i d**(n-i), i = 1..n: the bias-corrected EMA, in float64."""
  n = len(values)
  weights = np.array([d ** (n - i) for i in range(1, n + 1)])
  return sum(w * np.asarray(v, np.float64) for w, v in zip(weights, values)) / weights.sum()


DECAY = 0.9


@pytest.fixture(scope="module")
def sgd_poly_ema_run():
  """Joint, tiny: SGD (Nesterov) + poly + EMA over a few steps of one batch, traced once."""
  config = common.get_base_config(tiny=True)
  config.method = "joint"
  config.train.update(optimizer="sgd", lr_schedule="poly", learning_rate=3e-2, steps=8,
                      ema_decay=DECAY, grad_clip=12.0)
  config_schema.validate(config, methods.REGISTRY)
  method = methods.create(config, num_classes=5, modalities=("mr", "ct"))
  batch = two_modality_batch()
  state = method.init(rng.prng_key(0), batch)
  step = traced_once_step(method)
  states, history = [state], []
  for _ in range(config.train.steps):
    state, metrics = step(state, batch)
    states.append(jax.device_get(state))
    history.append(jax.device_get(metrics))
  return method, batch, states, history


def test_sgd_poly_ema_trains_with_a_falling_loss(sgd_poly_ema_run):
  _, _, states, history = sgd_poly_ema_run
  assert isinstance(states[-1], supervised.SupervisedEMAState)
  assert int(states[-1].step) == len(history)
  for m in history:
    assert np.isfinite(m["grad_norm"]) and m["grad_norm"] > 0
  losses = [float(m["loss"]) for m in history]
  assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses


def test_ema_is_the_bias_corrected_average_of_the_raw_weights(sgd_poly_ema_run):
  _, _, states, _ = sgd_poly_ema_run
  for n in (1, 3, len(states) - 1):
    trained = states[1:n + 1]
    chex.assert_trees_all_close(
        states[n].ema_params,
        jax.tree.map(lambda *v: _numpy_average(v, DECAY), *[s.params for s in trained]),
        rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(
        states[n].ema_stats,
        jax.tree.map(lambda *v: _numpy_average(v, DECAY), *[s.stats for s in trained]),
        rtol=1e-5, atol=1e-6)
  assert not all(np.allclose(e, p) for e, p in zip(jax.tree.leaves(states[-1].ema_params),
                                                   jax.tree.leaves(states[-1].params)))


def test_predict_uses_the_ema_weights_when_on_and_the_raw_ones_when_off(sgd_poly_ema_run):
  method, batch, states, _ = sgd_poly_ema_run
  state = states[-1]
  image = batch["ct"]["image"]
  apply = jax.jit(lambda p, s, x: method.apply(p, s, x, "ct", train=False)[0])
  on = jax.jit(lambda s, x: method.predict(s, x, "ct"))(state, image)
  np.testing.assert_array_equal(on, apply(state.ema_params, state.ema_stats, image))
  assert not np.allclose(on, apply(state.params, state.stats, image))
  off_config = common.get_base_config(tiny=True)
  off_method = methods.create(off_config, num_classes=5, modalities=("mr", "ct"))
  raw = supervised.SupervisedState(step=state.step, params=state.params, stats=state.stats,
                                   opt_state=off_method.init(rng.prng_key(0), batch).opt_state)
  off = jax.jit(lambda s, x: off_method.predict(s, x, "ct"))(raw, image)
  np.testing.assert_allclose(off, apply(state.params, state.stats, image), rtol=1e-6, atol=1e-6)


def test_the_ema_state_is_saved_and_restored_by_the_trainers_checkpoints(sgd_poly_ema_run,
                                                                         tmp_path):
  method, batch, states, _ = sgd_poly_ema_run
  checkpoints = bookkeeping.Checkpoints(tmp_path, keep=1)
  checkpoints.save_latest(8, states[-1], force=True)
  checkpoints.wait()
  restored, step = checkpoints.restore("latest", method.init(rng.prng_key(0), batch))
  assert step == 8 and isinstance(restored, supervised.SupervisedEMAState)
  for a, b in zip(jax.tree.leaves(states[-1]), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A state built without EMA cannot take it; the message names the keys that shape the state.
  plain = methods.create(common.get_base_config(tiny=True), 5, ("mr", "ct"))
  with pytest.raises(ValueError, match=r"train\.ema_decay"):
    checkpoints.restore("latest", plain.init(rng.prng_key(0), batch))
  checkpoints.close()


def test_dualstream_alternate_keeps_the_idle_modalitys_averages_bit_for_bit():
  """Idle leaves' averages untouched; own leaves average their own steps' values only."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "dualstream.py"
  spec = importlib.util.spec_from_file_location("configs.dualstream", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("tiny,variant=v4")
  config.train.ema_decay = DECAY
  method = methods.create(config, num_classes=5, modalities=("mr", "ct"))
  batch = two_modality_batch()
  state = method.init(rng.prng_key(0), batch)

  # Both variants' train_step in one executable, picked by the traced step: one compile instead
  # of the trainer's two (test_shared_kernels checks the two equal this switch).
  @jax.jit
  def step(state, key):
    branches = [lambda s, m=m: method.train_step(s, batch, key, m)[0] for m in method.modalities]
    return jax.lax.switch(state.step % len(branches), branches, state)

  own_values = {m: [] for m in method.modalities}
  for i in range(4):
    active = method.variant_of_step(i)
    idle = method.modalities[1 - method.modalities.index(active)]
    before = jax.device_get(state)
    state = step(state, rng.prng_key(i))
    after = jax.device_get(state)
    keep = method.modality_mask(before.params, idle)
    assert any(jax.tree.leaves(keep))
    for a, b, k in zip(jax.tree.leaves(before.ema_params), jax.tree.leaves(after.ema_params),
                       jax.tree.leaves(keep)):
      if k:
        np.testing.assert_array_equal(a, b)
    idle_stats = [jax.tree.leaves(s.ema_stats[f"stats_{idle}"]) for s in (before, after)]
    assert idle_stats[0]
    for a, b in zip(*idle_stats):
      np.testing.assert_array_equal(a, b)
    own_values[active].append(after)
  # A modality's own leaves: the bias-corrected average of their values after its own steps.
  for m, values in own_values.items():
    own = method.modality_mask(values[-1].params, m)
    expect = jax.tree.map(lambda *v: _numpy_average(v, DECAY), *[s.params for s in values])
    for e, a, k in zip(jax.tree.leaves(expect), jax.tree.leaves(values[-1].ema_params),
                       jax.tree.leaves(own)):
      if k:
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)
