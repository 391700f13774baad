"""MMSDNet/DAFNet plug-in: each update lowers its own loss, one trace, SWA, zero-shot, pairing.

One tiny DAFNet (image discriminators included) on a tiny paired phantom; the jitted step is
compiled once for the module and every step test reuses it.
"""

import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import dafnet, mmsdnet
from unpaired_seg import config_schema, methods, rng, train
from unpaired_seg.data import loader
from unpaired_seg.methods import mmsdnet as mmsdnet_lib
from unpaired_seg.methods import mmsdnet_eval
from unpaired_seg.methods import mmsdnet_pairing as pairing_lib
from unpaired_seg.ops import similarity, tps
from tests.method_steps import traced_once_step

SWA_START = 2


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  config = dafnet.get_config("tiny")
  config.data.root = str(tmp_path_factory.mktemp("phantom") / "paired")
  config.mmsdnet.swa_start = SWA_START
  config.mmsdnet.learning_rate.update(generator=3e-3, mask_disc=3e-3, image_disc=3e-3)
  data = loader.load_data(config, tmp_path_factory.mktemp("work"))
  method = methods.create(config, num_classes=len(data.class_names), modalities=data.modalities)
  batch = method.host_batch(data, 0)
  state = method.init(rng.prng_key(0), batch)
  step = traced_once_step(method)
  return types.SimpleNamespace(config=config, data=data, method=method, batch=batch,
                               state=state, step=step)


def _copy(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


def test_generator_step_lowers_its_loss_with_finite_gradients_in_one_trace(setup):
  state, losses = setup.state, []
  for _ in range(6):
    state, metrics = setup.step(state, setup.batch)
    assert np.isfinite(float(metrics["generator_grad_norm"]))
    assert float(metrics["generator_grad_norm"]) > 0
    assert all(np.isfinite(float(v)) for v in metrics.values())
    losses.append(float(metrics["generator_loss"]))
  assert losses[-1] < losses[0], losses
  assert int(state.step) == 6
  # The discriminators moved too (each has its own optimiser in the same step).
  for part in ("mask_disc", "image_disc"):
    before = jax.tree.leaves(setup.state.params[part])
    after = jax.tree.leaves(state.params[part])
    assert any(not np.allclose(a, b) for a, b in zip(before, after)), part


def test_the_spatial_transformer_takes_its_own_learning_rate(setup):
  params = setup.state.params["generator"]
  assert "transformer" in params["params"] and len(params) > 1      # norm collections too
  grads = jax.tree.map(jnp.ones_like, params)
  for rate, stn_rate in ((1e-2, 1e-4), (1e-2, 0.0)):
    tx = mmsdnet_lib.generator_optimizer(rate, stn_rate)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Adam's first step is the rate itself for a constant gradient.
    for collection, tree in updates.items():
      for module, sub in (tree.items() if collection == "params" else [(collection, tree)]):
        expected = stn_rate if (module == "transformer" and stn_rate) else rate
        for leaf in jax.tree.leaves(sub):
          np.testing.assert_allclose(np.asarray(leaf), -expected, rtol=1e-4, err_msg=module)


def _align_method(setup, target):
  config = setup.config.copy_and_resolve_references()
  config.mmsdnet.weights.update(kl=0.0, sup=0.0, adv_mask=0.0, rec=0.0, adv_image=0.0, z_rec=0.0,
                                align=1.0)
  config.mmsdnet.align_target = target
  return methods.create(config, num_classes=len(setup.data.class_names),
                        modalities=setup.data.modalities)


def _own_and_partner_anatomies(method, params, stats, batch):
  """One anatomy pass per modality over its slices and the partners it gives the other modality,
  as in training (batch norm normalises with the statistics of that pass)."""
  own, partner = {}, {}
  for m, other in (("mr", "ct"), ("ct", "mr")):
    images = batch[m]["image"]
    stacked = jnp.concatenate([images, batch[other]["partner_image"][:, 0]])
    factors = method._gen(params, stats, "anatomy", stacked, m, train=True)[0]
    own[m], partner[other] = factors[:len(images)], factors[len(images):]
  return own, partner


def test_the_anatomy_alignment_term_is_the_soft_dice_of_the_partner_anatomies(setup):
  method = _align_method(setup, "anatomy")
  state = method.init(rng.prng_key(0), setup.batch)
  params, stats = state.params["generator"], state.stats["generator"]
  loss, (_, metrics, _) = method.generator_loss(params, stats, state.params, state.stats,
                                                setup.batch, rng.prng_key(1))
  # Untrained, the warp is the identity: the term is 1 - soft Dice of each slice's anatomy and
  # its partner's, pooled over channels; it is the whole loss here.
  own, partner = _own_and_partner_anatomies(method, params, stats, setup.batch)
  dice = similarity.soft_dice_per_sample(jnp.concatenate([own["mr"], own["ct"]]),
                                         jnp.concatenate([partner["mr"], partner["ct"]]))
  np.testing.assert_allclose(float(metrics["align"]), 1.0 - float(jnp.mean(dice)), rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(metrics["align"]), rtol=1e-6)


def _numpy_class_dice(a, b, smooth=1e-6):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return ((2 * np.sum(a * b, axis=(1, 2)) + smooth)
          / (np.sum(a, axis=(1, 2)) + np.sum(b, axis=(1, 2)) + smooth))


@pytest.mark.parametrize("target", ["anatomy", "masks"])
def test_the_alignment_term_trains_only_the_transformer_and_falls(setup, target):
  method = _align_method(setup, target)
  state = method.init(rng.prng_key(0), setup.batch)
  params, stats = state.params["generator"], state.stats["generator"]
  own, partner = _own_and_partner_anatomies(method, params, stats, setup.batch)
  cand = {"mr": partner["mr"], "ct": partner["ct"]}          # candidates aligned onto mr / ct
  fixed = jnp.concatenate([own["mr"], own["ct"]])
  # CT unlabelled: its target is the segmentor's prediction (any soft mask), MR's its label.
  shape = setup.batch["ct"]["label"].shape + (len(setup.data.class_names),)
  probs = {("mr", "own"): jnp.zeros(shape),
           ("ct", "own"): jax.nn.softmax(jax.random.normal(rng.prng_key(2), shape))}
  y = {m: jnp.asarray(setup.batch[m]["label"]) for m in ("mr", "ct")}
  labelled = {"mr": jnp.ones(shape[0]), "ct": jnp.zeros(shape[0])}

  def loss_fn(p):
    return method._alignment_loss(p, stats, cand, fixed, probs, y, labelled, None)

  if target == "masks":
    # Independent reference at the identity warp: candidates' softmax masks (one segmentor pass)
    # against MR's one-hot labels and CT's given soft masks, per organ, background left out.
    moving = jnp.concatenate([cand["mr"], cand["ct"]])
    logits = method._gen(params, stats, "segment", moving, "mr", train=True)[0]
    masks = np.asarray(jax.nn.softmax(logits, -1))[..., 1:]
    targets = np.concatenate([np.eye(shape[-1])[np.asarray(y["mr"])],
                              np.asarray(probs[("ct", "own")])])[..., 1:]
    np.testing.assert_allclose(float(loss_fn(params)),
                               1.0 - np.mean(_numpy_class_dice(masks, targets)), rtol=1e-5)
  grads = jax.grad(loss_fn)(params)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  stn = [g for path, g in flat if "transformer" in jax.tree_util.keystr(path)]
  rest = [g for path, g in flat if "transformer" not in jax.tree_util.keystr(path)]
  assert rest and all(float(jnp.abs(g).max()) == 0.0 for g in rest)
  assert any(float(jnp.abs(g).max()) > 0 for g in stn)
  tx = optax.adam(1e-2)
  opt = tx.init(params)

  @jax.jit
  def adam_step(p, o):
    value, g = jax.value_and_grad(loss_fn)(p)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, value

  values = []
  for _ in range(8):
    params, opt, value = adam_step(params, opt)
    values.append(float(value))
  assert np.all(np.isfinite(values)) and values[-1] < values[0], values


def test_the_mean_offset_term_penalises_the_offsets_every_pair_shares(setup):
  config = setup.config.copy_and_resolve_references()
  config.mmsdnet.weights.update(kl=0.0, sup=0.0, adv_mask=0.0, rec=0.0, adv_image=0.0, z_rec=0.0,
                                align=0.0, mean_offset=2.0)
  config.mmsdnet.stn_trained_by = "all"
  method = methods.create(config, num_classes=len(setup.data.class_names),
                          modalities=setup.data.modalities)
  state = method.init(rng.prng_key(0), setup.batch)
  params, stats = state.params["generator"], state.stats["generator"]
  # Hand case: a zero kernel in the last layer gives every pair the bias as its offsets, so the
  # batch's mean field is the bias in both directions and the term is mean(bias^2).
  bias = 0.01 * np.arange(50, dtype=np.float32) - 0.2
  layer = params["params"]["transformer"]["localisation"]["offsets"]
  shared = jax.tree.map(lambda x: x, params)
  shared["params"]["transformer"]["localisation"]["offsets"] = {
      "kernel": jnp.zeros_like(layer["kernel"]), "bias": jnp.asarray(bias)}
  loss, (_, metrics, _) = method.generator_loss(shared, stats, state.params, state.stats,
                                                setup.batch, rng.prng_key(1))
  np.testing.assert_allclose(float(metrics["mean_offset"]), np.mean(bias ** 2), rtol=1e-5)
  np.testing.assert_allclose(float(loss), 2.0 * np.mean(bias ** 2), rtol=1e-5)

  own, partner = _own_and_partner_anatomies(method, params, stats, setup.batch)
  cand = {"mr": partner["mr"], "ct": partner["ct"]}
  fixed = mmsdnet_lib._Stack([own["mr"], own["ct"]])

  def loss_fn(p, active=None):
    return method._mean_offset_loss(p, stats, cand, fixed, active)

  # Random weights: the reference averages each direction's offsets over its pairs in numpy.
  rand = jax.tree.map(lambda x: x, params)
  rand["params"]["transformer"]["localisation"]["offsets"] = {
      "kernel": 0.05 * jax.random.normal(rng.prng_key(3), layer["kernel"].shape),
      "bias": jnp.zeros_like(layer["bias"])}
  offsets = np.asarray(method._gen(rand, stats, "displacements",
                                   jnp.concatenate([cand["mr"], cand["ct"]]), fixed.value)[0])
  n = own["mr"].shape[0]
  reference = np.mean([np.mean(offsets[:n], 0) ** 2, np.mean(offsets[n:], 0) ** 2])
  assert reference > 0
  np.testing.assert_allclose(float(loss_fn(rand)), reference, rtol=1e-5)
  assert float(loss_fn(rand, jnp.asarray(False))) == 0.0          # before stn_start
  grads = jax.grad(loss_fn)(rand)
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  assert all(float(jnp.abs(g).max()) == 0.0 for path, g in flat
             if "transformer" not in jax.tree_util.keystr(path))
  tx = optax.adam(1e-2)
  opt, values = tx.init(rand), []
  step = jax.jit(lambda p, o: (lambda v, g: (v, *tx.update(g, o, p)))(
      *jax.value_and_grad(loss_fn)(p)))
  for _ in range(5):
    value, updates, opt = step(rand, opt)
    rand = optax.apply_updates(rand, updates)
    values.append(float(value))
  assert values[-1] < values[0], values


def _transformer_grads(method, state, batch):
  # Jitted: op-by-op dispatch of the generator's gradient costs more than compiling it.
  grads = jax.jit(jax.grad(method.generator_loss, has_aux=True))(
      state.params["generator"], state.stats["generator"], state.params, state.stats, batch,
      rng.prng_key(1))[0]
  return grads["params"]["transformer"], grads


def test_stn_trained_by_align_leaves_the_transformer_to_the_registration_term(setup):
  config = setup.config.copy_and_resolve_references()
  config.mmsdnet.update(stn_trained_by="align", align_target="masks")
  config.mmsdnet.weights.align = 2.0
  full = methods.create(config, num_classes=len(setup.data.class_names),
                        modalities=setup.data.modalities)
  state = full.init(rng.prng_key(0), setup.batch)
  only = config.copy_and_resolve_references()
  only.mmsdnet.weights.update(kl=0.0, sup=0.0, adv_mask=0.0, rec=0.0, adv_image=0.0, z_rec=0.0)
  align_only = methods.create(only, num_classes=len(setup.data.class_names),
                              modalities=setup.data.modalities)
  stn_full, grads_full = _transformer_grads(full, state, setup.batch)
  stn_align, _ = _transformer_grads(align_only, state, setup.batch)
  # Every other term is in the loss (the encoders get their gradients) but adds nothing to the
  # transformer's: it gets exactly the registration term's.
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(stn_align))
  chex.assert_trees_all_close(stn_full, stn_align, rtol=1e-5, atol=1e-8)
  encoder = grads_full["params"]["anatomy_encoder"]
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(encoder))
  # With the warp's gradient cut (straight-through) the transformer is the term's alone too, even
  # when every loss may train it.
  detached = config.copy_and_resolve_references()
  detached.mmsdnet.update(stn_trained_by="all", warp_gradient="identity")
  detached = methods.create(detached, num_classes=len(setup.data.class_names),
                            modalities=setup.data.modalities)
  stn_detached, grads_detached = _transformer_grads(detached, state, setup.batch)
  chex.assert_trees_all_close(stn_detached, stn_align, rtol=1e-5, atol=1e-8)
  encoder = grads_detached["params"]["anatomy_encoder"]
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(encoder))
  config.mmsdnet.weights.align = 0.0
  with pytest.raises(config_schema.ConfigError, match="mmsdnet.stn_trained_by"):
    methods.create(config, num_classes=len(setup.data.class_names),
                   modalities=setup.data.modalities)
  config.mmsdnet.update(stn_trained_by="all", warp_gradient="identity")
  with pytest.raises(config_schema.ConfigError, match="mmsdnet.warp_gradient"):
    methods.create(config, num_classes=len(setup.data.class_names),
                   modalities=setup.data.modalities)


def test_straight_through_warp_is_the_warp_forward_and_the_identity_backward():
  moving = jax.random.uniform(jax.random.PRNGKey(0), (2, 9, 9, 3))
  offsets = 0.05 * jax.random.normal(jax.random.PRNGKey(1), (2, 25, 2))
  weight = jax.random.normal(jax.random.PRNGKey(2), moving.shape)

  def loss(image, d):
    return jnp.sum(weight * mmsdnet_lib.straight_through_warp(
        image, tps.thin_plate_spline(image, d)))

  warped = tps.thin_plate_spline(moving, offsets)
  assert float(jnp.max(jnp.abs(warped - moving))) > 1e-2     # the warp does move the image
  np.testing.assert_allclose(
      np.asarray(mmsdnet_lib.straight_through_warp(moving, warped)), np.asarray(warped),
      atol=1e-6)
  grad_image, grad_offsets = jax.grad(loss, argnums=(0, 1))(moving, offsets)
  np.testing.assert_allclose(np.asarray(grad_image), np.asarray(weight), atol=1e-6)
  assert float(jnp.max(jnp.abs(grad_offsets))) == 0.0


def test_the_transformer_stays_the_identity_and_untrained_before_stn_start(setup):
  config = setup.config.copy_and_resolve_references()
  config.mmsdnet.stn_start = 3
  config.mmsdnet.learning_rate.stn = 1e-2
  method = methods.create(config, num_classes=len(setup.data.class_names),
                          modalities=setup.data.modalities)
  state = method.init(rng.prng_key(0), setup.batch)
  step = jax.jit(lambda st, b: method.train_step(st, b, rng.prng_key(1)))

  def transformer(st):
    return _copy(st.params["generator"]["params"]["transformer"])

  history = [transformer(state)]
  for _ in range(5):
    state, _ = step(state, setup.batch)
    history.append(transformer(state))
  # Steps 0, 1, 2 leave it as initialised; steps 3 and 4 move it.
  for before, after in zip(history[:3], history[1:4]):
    chex.assert_trees_all_equal(before, after)
  for before, after in zip(history[3:5], history[4:6]):
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_swa_is_the_running_mean_of_the_raw_weights_after_the_start(setup):
  state, raw_params, raw_stats = setup.state, [], []
  for _ in range(5):
    state, metrics = setup.step(state, setup.batch)
    raw_params.append(_copy(state.params["generator"]))
    raw_stats.append(_copy(state.stats["generator"]))
  # Steps 3, 4 and 5 are after swa_start = 2.
  expected = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *raw_params[SWA_START:])
  chex.assert_trees_all_close(_copy(state.swa_params), expected, rtol=1e-5, atol=1e-6)
  expected_stats = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *raw_stats[SWA_START:])
  chex.assert_trees_all_close(_copy(state.swa_stats), expected_stats, rtol=1e-5, atol=1e-6)
  assert int(state.swa_count) == 5 - SWA_START
  assert float(metrics["swa_count"]) == 5 - SWA_START
  # Training keeps the raw weights; they differ from the average.
  assert any(not np.allclose(a, b) for a, b in
             zip(jax.tree.leaves(state.swa_params), jax.tree.leaves(raw_params[-1])))


def test_unlabelled_target_slices_have_zero_supervised_loss_and_their_labels_are_unused(setup):
  batch = jax.tree.map(np.array, setup.batch)
  batch["ct"]["labelled"] = np.zeros_like(batch["ct"]["labelled"])
  other = jax.tree.map(np.array, batch)
  other["ct"]["label"] = (other["ct"]["label"] + 1) % len(setup.data.class_names)
  state_a, metrics_a = setup.step(setup.state, batch)
  state_b, metrics_b = setup.step(setup.state, other)
  assert float(metrics_a["sup_ct"]) == 0.0
  assert float(metrics_a["sup_mr"]) > 0.0
  # The labels of unlabelled slices change nothing: not the losses, not the update.
  chex.assert_trees_all_close(jax.device_get(metrics_a), jax.device_get(metrics_b))
  chex.assert_trees_all_close(_copy(state_a.params), _copy(state_b.params))


def test_discriminator_steps_lower_their_own_losses(setup):
  method, state, batch = setup.method, setup.state, setup.batch
  real, weight = method.real_masks(jax.tree.map(jnp.asarray, batch))
  fake = jax.nn.softmax(jax.random.normal(jax.random.key(0), real.shape), axis=-1)
  mask_step = jax.jit(method.mask_disc_update)
  losses = []
  for _ in range(8):
    state, loss = mask_step(state, real, weight, fake)
    losses.append(float(loss))
  assert losses[-1] < losses[0], losses

  images = {m: jnp.asarray(batch[m]["image"]) for m in method.modalities}
  fakes = {m: jnp.tanh(jax.random.normal(jax.random.key(i), images[m].shape))
           for i, m in enumerate(method.modalities)}
  image_step = jax.jit(method.image_disc_update)
  losses = []
  for _ in range(8):
    state, loss = image_step(state, images, fakes)
    losses.append(float(loss))
  assert losses[-1] < losses[0], losses


def test_single_and_multi_input_inference(setup):
  method, state = setup.method, setup.state   # untrained: the STN is exactly the identity
  x = jnp.asarray(setup.batch["mr"]["image"])
  partner = jnp.asarray(setup.batch["mr"]["partner_image"])            # [B, 1, H, W, 1] CT
  params, stats = state.swa_params, state.swa_stats
  s_mr = method._gen(params, stats, "anatomy", x, "mr")[0]
  s_ct = method._gen(params, stats, "anatomy", partner[:, 0], "ct")[0]
  assert set(np.unique(np.asarray(s_mr))) <= {0.0, 1.0}
  # Single input: the image's own anatomy through the segmentor.
  own = method._gen(params, stats, "segment", s_mr, "mr")[0]
  np.testing.assert_allclose(np.asarray(method.predict(state, x, "mr")), np.asarray(own),
                             atol=1e-5)
  # Multi input: with the identity warp, the element-wise maximum of the two anatomies.
  fused = np.maximum(np.asarray(s_mr), np.asarray(s_ct))
  expected = jax.nn.softmax(method._gen(params, stats, "segment", jnp.asarray(fused), "mr")[0], -1)
  multi = method.predict_multi(state, x, "mr", partner)
  np.testing.assert_allclose(np.asarray(multi), np.asarray(expected), atol=1e-5)
  np.testing.assert_allclose(np.asarray(multi).sum(-1), 1.0, atol=1e-5)


def _partner_label_counts(data, shift_rows: int):
  """Numpy reference: per modality, (intersection, |partner == c|, |own == c|) of the expert
  partner's label moved up by `shift_rows` (background enters at the bottom) against own."""
  out = {}
  for j, i in (("mr", "ct"), ("ct", "mr")):
    partners = {c.subject: c for c in data.cases["test"][i]}
    counts = np.zeros((len(data.class_names), 3), np.int64)
    for case in data.cases["test"][j]:
      partner = partners[case.subject]
      for z in range(case.num_slices):
        moved = np.zeros_like(partner.label[:, :, 0])
        src = partner.label[:, :, min(z, partner.num_slices - 1)]
        moved[:moved.shape[0] - shift_rows] = src[shift_rows:]
        own = case.label[:, :, z]
        for c in range(len(data.class_names)):
          counts[c] += [np.count_nonzero((moved == c) & (own == c)), np.count_nonzero(moved == c),
                        np.count_nonzero(own == c)]
    out[j] = mmsdnet_eval.pooled_dice(counts, data.class_names)
  return out


def test_alignment_scores_the_transformers_warp_of_the_partner_labels(setup):
  method, state, data = setup.method, setup.state, setup.data
  # Untrained, the transformer is the identity: both rows are the unwarped partner labels'.
  result = mmsdnet_eval.evaluate_alignment(method, state, data, setup.config)
  reference = _partner_label_counts(data, 0)
  for j in ("mr", "ct"):
    assert result[j]["identity"] == result[j]["transformer"] == reference[j]
    assert 0 < result[j]["identity"]["mean"] < 1
    assert result[j]["mean_abs_control_point_offset_px"] == 0.0
  # A transformer that moves every control point 2 pixels down the rows: output row r samples
  # the partner at row r + 2, which a thin-plate spline reproduces exactly.
  height = data.cases["test"]["mr"][0].image.shape[0]
  shifted = jax.tree_util.tree_map_with_path(
      lambda path, v: (jnp.tile(jnp.array([2.0 / (height - 1), 0.0]), v.shape[0] // 2)
                       if "offsets" in jax.tree_util.keystr(path)
                       and jax.tree_util.keystr(path).endswith("['bias']") else v),
      state.swa_params)
  moved = mmsdnet_eval.evaluate_alignment(method, state.replace(swa_params=shifted), data,
                                          setup.config)
  reference = _partner_label_counts(data, 2)
  for j in ("mr", "ct"):
    assert moved[j]["identity"] == result[j]["identity"]
    for name, value in reference[j]["per_class"].items():
      assert moved[j]["transformer"]["per_class"][name] == pytest.approx(value, abs=1e-9), name
    assert moved[j]["mean_abs_control_point_offset_px"] == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------------------------------------
# Pairing (host side, no JAX).
# ------------------------------------------------------------------------------------------------


def _host(data, step, pairing, k=3):
  return pairing_lib.host_batch(data, step, pairing=pairing,
                                k=pairing_lib.num_candidates(pairing, k), window=2, seed=0)


@pytest.mark.parametrize("pairing", pairing_lib.PAIRINGS)
def test_pairing_is_a_pure_function_of_the_step(setup, pairing):
  a, b, c = (_host(setup.data, s, pairing) for s in (3, 3, 4))
  chex.assert_trees_all_equal(a, b)
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


def _check_partner_images(data, batch, j, i):
  for row, (cases, slices) in enumerate(zip(batch[j]["partner_case"], batch[j]["partner_slice"])):
    for n, (c, s) in enumerate(zip(cases, slices)):
      np.testing.assert_array_equal(batch[j]["partner_image"][row, n, ..., 0],
                                    data.cases["train"][i][c].image[:, :, s])


def test_expert_pairs_are_the_same_subject_and_slice(setup):
  data = setup.data
  for step in range(3):
    batch = _host(data, step, "expert")
    for j, i in (("mr", "ct"), ("ct", "mr")):
      assert batch[j]["partner_image"].shape[1] == 1
      for ci, z, pc, ps in zip(batch[j]["case_index"], batch[j]["slice_index"],
                               batch[j]["partner_case"][:, 0], batch[j]["partner_slice"][:, 0]):
        assert data.cases["train"][j][ci].subject == data.cases["train"][i][pc].subject
        assert ps == z
      _check_partner_images(data, batch, j, i)


def test_auto_and_random_candidates_stay_within_two_slices_of_the_expert_pair(setup):
  data = setup.data
  for step in range(4):
    auto = _host(data, step, "auto", k=3)
    shuffled = _host(data, step, "random")
    for j, i in (("mr", "ct"), ("ct", "mr")):
      assert auto[j]["partner_slice"].shape == (len(auto[j]["slice_index"]), 3)
      for z, slices, cases in zip(auto[j]["slice_index"], auto[j]["partner_slice"],
                                  auto[j]["partner_case"]):
        assert z in slices                    # the expert slice is always a candidate
        assert np.all(np.abs(slices - z) <= 2)
        assert len(set(cases)) == 1
      assert np.all(np.abs(shuffled[j]["partner_slice"][:, 0] - shuffled[j]["slice_index"]) <= 2)
      _check_partner_images(data, auto, j, i)


def test_cross_subject_candidates_are_other_subjects_at_the_same_relative_position(setup):
  data = setup.data
  batch = _host(data, 5, "cross_subject", k=2)
  for j, i in (("mr", "ct"), ("ct", "mr")):
    for ci, z, cases, slices in zip(batch[j]["case_index"], batch[j]["slice_index"],
                                    batch[j]["partner_case"], batch[j]["partner_slice"]):
      case = data.cases["train"][j][ci]
      for c, s in zip(cases, slices):
        partner = data.cases["train"][i][c]
        assert partner.subject != case.subject
        assert s == round(z * (partner.num_slices - 1) / (case.num_slices - 1))
  assert pairing_lib.relative_slice(5, 11, 21) == 10
  assert pairing_lib.relative_slice(0, 1, 9) == 0


def test_expert_pairing_on_unpaired_data_is_a_clear_error(setup):
  unpaired = types.SimpleNamespace(**vars(setup.data))
  unpaired.manifest = types.SimpleNamespace(paired=False, name="unpaired_set")
  with pytest.raises(config_schema.ConfigError, match="cross_subject"):
    _host(unpaired, 0, "expert")


# ------------------------------------------------------------------------------------------------
# Configs.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [mmsdnet, dafnet])
@pytest.mark.parametrize("arg", ["", "tiny,decoder=spade,stn=off",
                                 "label_fraction=0,target=ct,pairing=auto",
                                 "tiny,pairing=cross_subject,label_fraction=0.5,target=mr"])
def test_configs_validate_and_follow_their_arguments(module, arg):
  config = module.get_config(arg)
  config_schema.validate(config, methods.REGISTRY)
  args = dict(item.split("=") for item in arg.split(",") if "=" in item)
  section = config.mmsdnet
  assert section.decoder == args.get("decoder", "film")
  assert section.stn == (args.get("stn", "on") == "on")
  # The CPU-sized configs hold the transformer at the identity for 300 of their 1000 steps.
  assert section.stn_start == (0 if "tiny" in arg else 300) < config.train.steps
  assert section.pairing == args.get("pairing", "expert")
  expected_mode = "unpaired" if section.pairing == "cross_subject" else "paired"
  assert config.data.phantom.mode == expected_mode
  if "label_fraction" in args:
    assert config.data.target_modality == args["target"]
    assert config.data.label_fraction == float(args["label_fraction"])
  journal = module is dafnet
  assert section.image_disc == journal
  assert section.weights.rec == (1.0 if journal else 10.0)
  assert section.weights.adv_image == (1.0 if journal else 0.0)
  assert (section.weights.kl, section.weights.sup, section.weights.z_rec) == (0.1, 10.0, 1.0)


def test_misalignment_argument_reaches_the_phantom_and_its_cache_folder(tmp_path, monkeypatch):
  monkeypatch.setenv("UNPAIRED_SEG_CACHE", str(tmp_path))
  assert mmsdnet.get_config("tiny").data.phantom.pair_misalignment == 1.0
  config = mmsdnet.get_config("tiny,misalignment=2.5")
  config_schema.validate(config, methods.REGISTRY)
  assert config.data.phantom.pair_misalignment == 2.5
  manifest = loader.resolve_dataset(config)
  assert manifest.phantom["pair_misalignment"] == 2.5
  assert manifest.root.name.endswith("_misalign2.5")
  with pytest.raises(ValueError, match="misalignment"):
    mmsdnet.get_config("tiny,misalignment=2,pairing=cross_subject")
  config.data.phantom.pair_misalignment = 7.0
  with pytest.raises(config_schema.ConfigError, match="data.phantom.pair_misalignment"):
    config_schema.validate(config, methods.REGISTRY)


def test_an_unknown_section_key_is_named():
  config = mmsdnet.get_config("tiny")
  config.mmsdnet.swa_begin = 3
  with pytest.raises(config_schema.ConfigError, match="mmsdnet.swa_begin"):
    config_schema.validate(config, methods.REGISTRY)


def test_the_trainer_moves_partners_with_their_slice_only_when_asked(setup):
  from unpaired_seg.data import augment as augment_lib
  config = setup.config.copy_and_resolve_references()
  config.data.augment.update(enabled=True, rotate_deg=30.0)
  settings = augment_lib.Settings.from_config(config.data.augment)
  assert setup.method.augment_partners                      # the configs ask for it
  # Each slice's partner is the slice itself: moved with it, it stays equal to it.
  batch = {m: {**b, "partner_image": jnp.asarray(b["image"])[:, None]}
           for m, b in jax.tree.map(jnp.asarray, setup.batch).items()}
  out = {flag: jax.jit(lambda b, f=flag: train.augment_on_device(rng.prng_key(3), b, settings, f))(
      batch) for flag in (True, False)}
  for m in batch:
    moved = np.asarray(out[True][m]["image"])
    assert not np.allclose(moved, batch[m]["image"])      # the slices were rotated
    np.testing.assert_allclose(np.asarray(out[True][m]["partner_image"])[:, 0], moved,
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out[False][m]["partner_image"]),
                                  np.asarray(batch[m]["partner_image"]))


def test_padded_batches_cover_every_index_once_in_batches_of_one_shape():
  batches = list(mmsdnet_eval.padded_batches(5, 2))
  assert batches == [([0, 1], [0, 1]), ([2, 3], [2, 3]), ([4], [4, 4])]
  assert list(mmsdnet_eval.padded_batches(4, 4)) == [([0, 1, 2, 3], [0, 1, 2, 3])]
  assert list(mmsdnet_eval.padded_batches(0, 3)) == []


def test_predict_multi_volume_labels_every_slice_whatever_the_batch_size(setup):
  data = setup.data
  case, partners = data.cases["test"]["mr"][0], data.cases["test"]["ct"]
  partner_index = {c.subject: n for n, c in enumerate(partners)}
  shapes = set()

  def predict(state, images, modality, partner_images):
    # A stand-in model: class 1 where the image is above its slice's mean, else 0.
    shapes.add((images.shape, partner_images.shape))
    above = images[..., 0] > images[..., 0].mean(axis=(1, 2), keepdims=True)
    return np.stack([~above, above], axis=-1).astype(np.float32)

  image = case.image
  expected = (image > image.mean(axis=(0, 1), keepdims=True)).astype(np.uint8)
  for batch_size in (1, 3, case.num_slices + 2):
    shapes.clear()
    labels = mmsdnet_eval.predict_multi_volume(
        predict, None, case, partners, partner_index, modality="mr", partner_modality="ct",
        case_pos=0, pairing="expert", k=1, window=2, batch_size=batch_size)
    np.testing.assert_array_equal(labels, expected)
    h, w = image.shape[:2]
    assert shapes == {((batch_size, h, w, 1), (batch_size, 1, h, w, 1))}  # one shape, padded
