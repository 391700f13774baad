"""The shared-kernel family: KD / CSA / L2 wiring, training regimes, sharing, every config trains.

  python -m pytest -q tests/methods/test_shared_kernels.py
"""

import functools
import importlib.util
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from unpaired_seg import methods, rng
from unpaired_seg.methods import supervised
from unpaired_seg.methods.base import count_parameters
from unpaired_seg.ops import losses

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs"
MODALITIES = ("mr", "ct")


def _load(name: str, arg: str | None = "tiny"):
  path = CONFIG_DIR / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"configs.{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _batch(channels: int = 1, size: int = 4, seed: int = 0, labelled=(1, 1, 1, 1)):
  """Two modalities of different structures and intensities; labels differ per modality."""
  r = np.random.default_rng(seed)
  out = {}
  for i, m in enumerate(MODALITIES):
    label = np.zeros((size, 32, 32), np.int32)
    label[:, 8:20, 6:18] = 1 + i
    label[:, 22:28, 20:30] = 3
    label[1::2, 2:6, 24:30] = 4
    image = label * (1.0 if m == "mr" else -1.0) + 0.3 * r.standard_normal(label.shape)
    image = np.repeat(image[..., None], channels, axis=-1).astype(np.float32)
    out[m] = {"image": image, "label": label, "labelled": np.asarray(labelled, np.float32)}
  return out


def _method(config):
  return methods.create(config, num_classes=5, modalities=MODALITIES)


def _train_logits(method, state, image, modality, key):
  fn = jax.jit(lambda p, s, x, k: method.apply(p, s, x, modality, train=True, rng=k)[0])
  return fn(state.params, state.stats, image, key)


def _numpy_l2(params: dict) -> float:
  """0.5 * sum of squares of every conv kernel and every norm parameter, walked by hand."""
  total = 0.0

  def walk(tree, path):
    nonlocal total
    for k, v in tree.items():
      if isinstance(v, dict):
        walk(v, path + (k,))
      elif path[0].startswith("norm_") or k == "kernel":
        total += 0.5 * float(np.sum(np.asarray(v, np.float64) ** 2))
  walk(jax.device_get(params), ())
  return total


# ------------------------------------------------------------------------------------------------
# Loss wiring: the method's loss is the sum of the op-level terms.
# ------------------------------------------------------------------------------------------------

def test_ummkd_loss_is_seg_plus_half_alpha_kd_plus_eta_l2_on_labelled_samples():
  config = _load("ummkd")
  method = _method(config)
  batch = _batch(labelled=(1, 0, 1, 1))
  state = method.init(rng.prng_key(0), batch)
  key = rng.prng_key(3)
  total, (_, metrics) = jax.jit(method.loss_fn)(state.params, state.stats, batch, key)

  keep = np.flatnonzero(batch["mr"]["labelled"])          # same for both modalities
  logits, labels, seg = {}, {}, 0.0
  for i, m in enumerate(MODALITIES):
    out = _train_logits(method, state, batch[m]["image"], m, jax.random.fold_in(key, i))
    logits[m], labels[m] = out[keep], batch[m]["label"][keep]   # gather, not mask
    weights = losses.batch_class_weights(labels[m], 5)
    seg += float(losses.soft_dice_loss(logits[m], labels[m])
                 + losses.clipped_weighted_cross_entropy(logits[m], labels[m], weights, 0.005))
  kd = float(losses.kd_loss(logits["mr"], labels["mr"], logits["ct"], labels["ct"],
                            temperature=2.0, absent="skip"))
  l2 = _numpy_l2(state.params)
  assert kd > 1e-6 and l2 > 0
  np.testing.assert_allclose(float(metrics["kd"]), kd, rtol=1e-5)
  np.testing.assert_allclose(float(metrics["weight_decay"]), l2, rtol=1e-5)
  np.testing.assert_allclose(float(total), seg + 0.25 * kd + 1e-4 * l2, rtol=1e-5)


def test_kd_is_off_for_chilopod_and_on_for_joint_kd():
  batch = _batch()
  chilopod = _method(_load("chilopod"))
  state = chilopod.init(rng.prng_key(0), batch)
  _, (_, metrics) = jax.eval_shape(chilopod.loss_fn, state.params, state.stats, batch)
  assert "kd" not in metrics and "csa" not in metrics
  joint_kd = _method(_load("joint_kd"))
  assert joint_kd.use_kd and joint_kd.mixed_batch


@pytest.mark.parametrize("name,class_specific", [("csa", True), ("affinity", False)])
def test_csa_loss_is_seg_plus_lambda_affinity_between_the_configured_layers(name, class_specific):
  config = _load(name)
  method = _method(config)
  assert method.csa_layers == ("bottleneck", "dec1")       # tiny U-Net: depth 2
  batch = _batch()
  state = method.init(rng.prng_key(0), batch)
  total, (_, metrics) = jax.jit(method.loss_fn)(state.params, state.stats, batch)

  feats, seg = {}, 0.0
  for m in MODALITIES:
    logits, inter = jax.jit(lambda v, x, m=m: method.network.apply(
        v, x, modality=m, train=True, mutable=["intermediates", f"stats_{m}"]))(
            {**state.params, **state.stats}, batch[m]["image"])
    feats[m] = (inter["intermediates"]["bottleneck_features"][0],
                inter["intermediates"]["dec1_features"][0])
    seg += float(losses.dice_ce_loss(logits, batch[m]["label"]))
  expected = float(losses.csa_loss(feats["mr"], batch["mr"]["label"], feats["ct"],
                                   batch["ct"]["label"], 5, class_specific=class_specific))
  assert expected > 0
  np.testing.assert_allclose(float(metrics["csa"]), expected, rtol=1e-5)
  np.testing.assert_allclose(float(total), seg + 0.5 * expected, rtol=1e-5)


def test_labelled_class_weights_count_only_labelled_samples():
  batch = _batch(labelled=(1, 0, 0, 1))
  labels, labelled = batch["mr"]["label"], batch["mr"]["labelled"]
  got = supervised.labelled_class_weights(jnp.asarray(labels), jnp.asarray(labelled), 5)
  ref = losses.batch_class_weights(jnp.asarray(labels[[0, 3]]), 5)
  np.testing.assert_allclose(got, ref, rtol=1e-6)
  # By hand: samples 0 and 3 have 144 liver pixels each; only sample 3 has spleen (24 pixels).
  np.testing.assert_allclose(got[1], 1 - 288 / 2048, rtol=1e-6)
  np.testing.assert_allclose(got[4], 1 - 24 / 2048, rtol=1e-6)
  every = supervised.labelled_class_weights(jnp.asarray(labels), jnp.ones(4), 5)
  np.testing.assert_allclose(every, losses.batch_class_weights(jnp.asarray(labels), 5), rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Sharing: parameter counts as in the papers.
# ------------------------------------------------------------------------------------------------

def test_parameter_counts_follow_the_papers_ratios():
  batch = _batch()
  counts = {}
  for name in ("individual", "joint", "chilopod", "y_shaped", "x_shaped"):
    method = _method(_load(name))
    # Shapes suffice to count: no compilation.
    counts[name] = method.parameter_counts(jax.eval_shape(method.init, rng.prng_key(0), batch))
  kernels = {k: v["params"] for k, v in counts.items()}
  assert kernels["individual"] == 2 * kernels["joint"]
  # Chilopod: Joint's kernels, only the norm parameters doubled (one set per modality).
  assert kernels["chilopod"] == kernels["joint"]
  assert counts["chilopod"]["norm_mr"] == counts["chilopod"]["norm_ct"] == \
      counts["joint"]["norm_shared"]
  assert counts["chilopod"]["trainable_total"] - counts["joint"]["trainable_total"] == \
      counts["joint"]["norm_shared"]
  assert kernels["joint"] < kernels["y_shaped"] < kernels["x_shaped"] < kernels["individual"]
  total = {k: v["trainable_total"] for k, v in counts.items()}
  assert 1.9 < total["individual"] / total["joint"] <= 2.0


# ------------------------------------------------------------------------------------------------
# Every config trains: loss falls, finite gradients, one trace.
# ------------------------------------------------------------------------------------------------

# individual and joint train in test_supervised.py; dualstream v2 and v4 step in the
# alternate-regime tests below (v4 there with its loss checked to fall).
TRAINABLE = [("joint_kd", "tiny"), ("y_shaped", "tiny"), ("x_shaped", "tiny"),
             ("chilopod", "tiny"), ("ummkd", "tiny"), ("ummkd", "tiny,net=dilated"),
             ("affinity", "tiny"), ("csa", "tiny"), ("dualstream", "tiny,variant=v1"),
             ("dualstream", "tiny,variant=v3")]


@pytest.mark.parametrize("name,arg", TRAINABLE, ids=[f"{n}:{a}" for n, a in TRAINABLE])
def test_config_trains_on_a_fixed_batch(name, arg):
  config = _load(name, arg)
  config.train.learning_rate = 1e-2
  method = _method(config)
  batch = _batch(channels=2 * config.data.context_slices + 1)
  state = method.init(rng.prng_key(0), batch)
  chex.clear_trace_counter()
  jitted = _jitted_steps(method)

  steps = 12
  history = []
  for i in range(steps):
    state, metrics = jitted[method.variant_of_step(i)](state, batch, rng.prng_key(i))
    norm = float(metrics["grad_norm"])
    assert np.isfinite(norm) and norm > 0, (i, norm)
    history.append(float(metrics["loss"]))
  assert int(state.step) == steps
  assert all(np.isfinite(history))
  if config.train.regime == "alternate":   # one modality per step: compare like with like
    first = history[0] + history[1]
    last = history[-2] + history[-1]
  else:
    first, last = history[0], history[-1]
  assert last < 0.9 * first, history


# ------------------------------------------------------------------------------------------------
# Regimes and per-modality isolation.
# ------------------------------------------------------------------------------------------------

def _jitted_steps(method) -> dict:
  """One jitted step per variant (the alternate regime: per modality), each traced once.

  chex counts the traces of one Python function: the variants share `step`, so together they may
  trace once each.
  """
  variants = method.step_variants()
  chex.clear_trace_counter()

  @chex.assert_max_traces(n=len(variants))
  def step(state, batch, key, variant):
    return method.train_step(state, batch, key, variant)
  jitted = jax.jit(step, static_argnums=3)
  return {v: functools.partial(jitted, variant=v) for v in variants}


def _switch_reference_step(method, state, batch, key):
  """The alternate regime as one executable: `lax.switch` on the traced step picks the modality.

  The implementation the per-modality compiled steps replaced, kept as the reference they must
  reproduce bit for bit.
  """
  def branch(m):
    return lambda operands: method._alternate_update(*operands, m)
  index = state.step % len(method.modalities)
  params, stats, opt_state, grads, metrics = jax.lax.switch(
      index, [branch(m) for m in method.modalities], (state, batch, key))
  metrics["grad_norm"] = optax.tree.norm(grads)
  return state.replace(step=state.step + 1, params=params, stats=stats,
                       opt_state=opt_state), metrics


@pytest.mark.parametrize("variant", ["v2", "v4"])
def test_per_modality_steps_equal_the_switch_in_one_executable(variant):
  """Same updates as the switch; the idle modality's own leaves bit for bit untouched in both.

  The two are different XLA programs, fused differently, so a trained leaf may differ in its last
  bit (seen: 1e-10 on a 2e-3 Adam moment); what the idle modality keeps is exact in both.
  """
  method = _method(_load("dualstream", f"tiny,variant={variant}"))
  batch = _batch()
  state = method.init(rng.prng_key(0), batch)
  reference = jax.jit(functools.partial(_switch_reference_step, method))
  jitted = _jitted_steps(method)
  ours = state
  for i in range(4):
    key = rng.prng_key(i)
    state, ref_metrics = reference(state, batch, key)
    before = ours
    ours, metrics = jitted[method.variant_of_step(i)](ours, batch, key)
    assert int(metrics["active_modality"]) == i % 2
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ours)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    for k in ref_metrics:
      np.testing.assert_allclose(np.asarray(ref_metrics[k]), np.asarray(metrics[k]), rtol=1e-5)
    idle = method.modalities[1 - i % 2]
    keep = method.modality_mask(before.params, idle)
    for a, b, k in zip(jax.tree.leaves(before.params), jax.tree.leaves(ours.params),
                       jax.tree.leaves(keep)):
      if k:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(jax.tree.leaves(keep))
    for a, b in zip(jax.tree.leaves(before.stats[f"stats_{idle}"]),
                    jax.tree.leaves(ours.stats[f"stats_{idle}"])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_alternate_step_without_a_modality_is_refused():
  method = _method(_load("dualstream", "tiny,variant=v2"))
  batch = _batch()
  state = method.init(rng.prng_key(0), batch)
  with pytest.raises(ValueError, match="variant_of_step"):
    jax.eval_shape(lambda s: method.train_step(s, batch, rng.prng_key(0)), state)


def _changed(before, after) -> bool:
  return any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before),
                                                      jax.tree.leaves(after)))


def test_alternate_regime_updates_only_the_active_modalitys_own_variables():
  config = _load("dualstream", "tiny,variant=v4")
  config.train.learning_rate = 1e-2
  method = _method(config)
  assert method.sharing.per_modality_blocks and method.regime == "alternate"
  batch = _batch()
  state = method.init(rng.prng_key(0), batch)
  chex.clear_trace_counter()
  jitted = _jitted_steps(method)
  blocks = {m: [k for k in state.params["params"] if k.endswith(f"_{m}")] for m in MODALITIES}
  shared = [k for k in state.params["params"] if not k.endswith(("_mr", "_ct"))]
  assert blocks["mr"] and blocks["ct"] and shared
  history = []
  for i in range(12):
    active, idle = MODALITIES[i % 2], MODALITIES[1 - i % 2]
    new, metrics = jitted[method.variant_of_step(i)](state, batch, rng.prng_key(i))
    history.append(float(metrics["loss"]))
    assert int(metrics["active_modality"]) == i % 2
    assert float(metrics[f"seg_{idle}"]) == 0.0 and float(metrics[f"seg_{active}"]) > 0
    p0, p1 = state.params, new.params
    mu0, mu1 = state.opt_state[0].mu, new.opt_state[0].mu
    nu0, nu1 = state.opt_state[0].nu, new.opt_state[0].nu
    for b in blocks[idle]:
      assert not _changed(p0["params"][b], p1["params"][b]), (i, b)
      assert not _changed(mu0["params"][b], mu1["params"][b]), (i, b)
      assert not _changed(nu0["params"][b], nu1["params"][b]), (i, b)
    for b in blocks[active]:
      assert _changed(p0["params"][b], p1["params"][b]), (i, b)
    assert not _changed(p0[f"norm_{idle}"], p1[f"norm_{idle}"])
    assert not _changed(mu0[f"norm_{idle}"], mu1[f"norm_{idle}"])
    assert _changed(p0[f"norm_{active}"], p1[f"norm_{active}"])
    assert not _changed(state.stats[f"stats_{idle}"], new.stats[f"stats_{idle}"])
    assert _changed(state.stats[f"stats_{active}"], new.stats[f"stats_{active}"])
    assert all(_changed(p0["params"][b], p1["params"][b]) for b in shared)
    state = new
  assert history[-2] + history[-1] < 0.9 * (history[0] + history[1]), history


def test_alternate_step_is_a_function_of_the_step_and_traces_once():
  """Resuming at step 1 from a copy of step 1's state gives step 2's state bit for bit."""
  method = _method(_load("dualstream", "tiny,variant=v2"))
  batch = _batch()
  state0 = method.init(rng.prng_key(0), batch)
  chex.clear_trace_counter()
  jitted = _jitted_steps(method)

  def step(state, batch):
    variant = method.variant_of_step(int(state.step))
    return jitted[variant](state, batch, jax.random.fold_in(rng.prng_key(0), state.step))

  s1, _ = step(state0, batch)
  s2, _ = step(s1, batch)
  resumed = jax.tree.map(lambda x: np.array(x), jax.device_get(s1))
  r2, _ = step(jax.tree.map(jnp.asarray, resumed), batch)
  for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(r2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_mixed_regime_keeps_per_modality_statistics_isolated():
  method = _method(_load("chilopod"))
  batch = _batch()
  state = method.init(rng.prng_key(0), batch)
  _, stats_mr, _ = jax.jit(lambda p, s, x: method.apply(p, s, x, "mr", train=True))(
      state.params, state.stats, batch["mr"]["image"])
  assert _changed(state.stats["stats_mr"], stats_mr["stats_mr"])
  assert not _changed(state.stats["stats_ct"], stats_mr["stats_ct"])
  # The MR-only statistics equal the MR statistics after a full (MR + CT) step's forward pass.
  _, (stats_both, _) = jax.jit(method.loss_fn)(state.params, state.stats, batch)
  chex.assert_trees_all_close(stats_both["stats_mr"], stats_mr["stats_mr"])
  assert _changed(state.stats["stats_ct"], stats_both["stats_ct"])


# ------------------------------------------------------------------------------------------------
# Bad settings fail with the key named.
# ------------------------------------------------------------------------------------------------

def test_bad_settings_name_the_config_key():
  config = _load("ummkd")
  config.loss.kd_weight = 0.0
  with pytest.raises(ValueError, match=r"loss\.kd_weight"):
    _method(config)
  config = _load("ummkd")
  config.train.regime = "alternate"
  with pytest.raises(ValueError, match=r"train\.regime"):
    _method(config)
  config = _load("dualstream", "tiny")
  config.model.sharing = "joint"
  with pytest.raises(ValueError, match=r"model\.sharing"):
    _method(config)
  config = _load("affinity")
  config.loss.csa_class_specific = True
  with pytest.raises(ValueError, match=r"loss\.csa_class_specific"):
    _method(config)
  config = _load("csa")
  config.loss.csa_layers = ("bottleneck", "enc0")      # the U-Net sows no encoder features
  method = _method(config)
  batch = _batch()
  state = method.init(rng.prng_key(0), batch)
  with pytest.raises(ValueError, match=r"loss\.csa_layers"):
    jax.eval_shape(method.loss_fn, state.params, state.stats, batch)
