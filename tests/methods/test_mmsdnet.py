"""MMSDNet/DAFNet plug-in: each update lowers its own loss, one trace, SWA, the transformer's
options, zero-shot, inference and the test-time extras.

One tiny DAFNet (image discriminators included) on the session's tiny paired phantom
(conftest.py): its jitted step is compiled once for the module, and the states of its first six
steps are shared by the tests that train. A method that differs from it only in its loss
settings has the same networks, so it starts from the same initial state. Host-side pieces
(pairing, configs) are in test_mmsdnet_host.py.

  python -m pytest -q tests/methods/test_mmsdnet.py
"""

import json
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unpaired_seg import config_schema, methods, rng
from unpaired_seg.methods.mmsdnet import evaluation as mmsdnet_eval
from unpaired_seg.methods.mmsdnet import generator_loss as generator_lib
from unpaired_seg.methods.mmsdnet import networks, terms
from unpaired_seg.ops import similarity, tps
from tests.method_steps import traced_once_step

STEPS = 6
# Every generator term but the transformer's own off.
NO_TERMS = dict(kl=0.0, sup=0.0, adv_mask=0.0, rec=0.0, adv_image=0.0, z_rec=0.0)


@pytest.fixture(scope="module")
def setup(mmsdnet_phantom):
  config, data = mmsdnet_phantom.config, mmsdnet_phantom.data
  method = methods.create(config, num_classes=len(data.class_names), modalities=data.modalities)
  batch = method.host_batch(data, 0)
  state = method.init(rng.prng_key(0), batch)
  step = traced_once_step(method)
  return types.SimpleNamespace(config=config, data=data, method=method, batch=batch,
                               state=state, step=step, swa_start=config.mmsdnet.swa_start,
                               stn_start=config.mmsdnet.transformer.start)


@pytest.fixture(scope="module")
def trained(setup):
  """states[i]: the state after i steps on the fixed batch (states[0] the initial one);
  metrics[i]: the metrics of step i."""
  states, metrics = [setup.state], []
  for _ in range(STEPS):
    state, m = setup.step(states[-1], setup.batch)
    states.append(state)
    metrics.append(jax.device_get(m))
  return types.SimpleNamespace(states=states, metrics=metrics)


def _variant(setup, weights=None, **transformer):
  """The module's method with other loss weights and transformer options (same networks)."""
  config = setup.config.copy_and_resolve_references()
  config.mmsdnet.weights.update(weights or {})
  config.mmsdnet.transformer.update(transformer)
  return methods.create(config, num_classes=len(setup.data.class_names),
                        modalities=setup.data.modalities)


def _generator(setup):
  return setup.state.params["generator"], setup.state.stats["generator"]


def _copy(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


def test_generator_step_lowers_its_loss_with_finite_gradients_in_one_trace(setup, trained):
  for metrics in trained.metrics:
    assert np.isfinite(float(metrics["generator_grad_norm"]))
    assert float(metrics["generator_grad_norm"]) > 0
    assert all(np.isfinite(float(v)) for v in metrics.values())
  losses = [float(m["generator_loss"]) for m in trained.metrics]
  assert losses[-1] < losses[0], losses
  state = trained.states[-1]
  assert int(state.step) == STEPS
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
    tx = networks.generator_optimizer(rate, stn_rate)
    # Jitted: op-by-op, the update of each of the generator's leaves dispatches its own ops.
    updates = jax.jit(lambda g, p, tx=tx: tx.update(g, tx.init(p), p)[0])(grads, params)
    # Adam's first step is the rate itself for a constant gradient.
    for collection, tree in updates.items():
      for module, sub in (tree.items() if collection == "params" else [(collection, tree)]):
        expected = stn_rate if (module == "transformer" and stn_rate) else rate
        for leaf in jax.tree.leaves(sub):
          np.testing.assert_allclose(np.asarray(leaf), -expected, rtol=1e-4, err_msg=module)


def _own_and_partner_anatomies(method, params, stats, batch):
  """One anatomy pass per modality over its slices and the partners it gives the other modality,
  as in training (batch norm normalises with the statistics of that pass)."""
  own, partner = {}, {}
  for m, other in (("mr", "ct"), ("ct", "mr")):
    images = batch[m]["image"]
    stacked = jnp.concatenate([images, batch[other]["partner_image"][:, 0]])
    factors = method.apply_generator(params, stats, "anatomy", stacked, m, train=True)[0]
    own[m], partner[other] = factors[:len(images)], factors[len(images):]
  return own, partner


@pytest.fixture(scope="module")
def anatomies(setup):
  """(own, partner) anatomies of the initial state on the fixed batch, as the tests' reference."""
  # Jitted: op-by-op dispatch of two U-Net passes costs more than compiling them.
  return jax.jit(lambda p, st, b: _own_and_partner_anatomies(setup.method, p, st, b))(
      *_generator(setup), setup.batch)


def test_the_anatomy_alignment_term_is_the_soft_dice_of_the_partner_anatomies(setup, anatomies):
  method = _variant(setup, NO_TERMS, align_weight=1.0, align_target="anatomy")
  params, stats = _generator(setup)
  loss, (_, metrics, _) = jax.jit(method.generator_loss)(
      params, stats, setup.state.params, setup.state.stats, setup.batch, rng.prng_key(1))
  # Untrained, the warp is the identity: the term is 1 - soft Dice of each slice's anatomy and
  # its partner's, pooled over channels; it is the whole loss here.
  own, partner = anatomies
  dice = similarity.soft_dice_per_sample(jnp.concatenate([own["mr"], own["ct"]]),
                                         jnp.concatenate([partner["mr"], partner["ct"]]))
  np.testing.assert_allclose(float(metrics["align"]), 1.0 - float(jnp.mean(dice)), rtol=1e-5)
  np.testing.assert_allclose(float(loss), float(metrics["align"]), rtol=1e-6)


def _numpy_class_dice(a, b, smooth=1e-6):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return ((2 * np.sum(a * b, axis=(1, 2)) + smooth)
          / (np.sum(a, axis=(1, 2)) + np.sum(b, axis=(1, 2)) + smooth))


def _adam_steps(loss_fn, params, count: int, learning_rate: float = 1e-2):
  """`count` jitted Adam steps on `loss_fn`: (the values, the first step's gradients)."""
  tx = optax.adam(learning_rate)

  @jax.jit
  def step(p, o):
    value, g = jax.value_and_grad(loss_fn)(p)
    updates, o = tx.update(g, o, p)
    return optax.apply_updates(p, updates), o, value, g

  opt, values, first = tx.init(params), [], None
  for _ in range(count):
    params, opt, value, grads = step(params, opt)
    values.append(float(value))
    first = grads if first is None else first
  return values, first


def _split_transformer_grads(grads):
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  stn = [g for path, g in flat if "transformer" in jax.tree_util.keystr(path)]
  rest = [g for path, g in flat if "transformer" not in jax.tree_util.keystr(path)]
  return stn, rest


@pytest.mark.parametrize("target", ["anatomy", "masks"])
def test_the_alignment_term_trains_only_the_transformer_and_falls(setup, anatomies, target):
  method = _variant(setup, NO_TERMS, align_weight=1.0, align_target=target)
  params, stats = _generator(setup)
  own, partner = anatomies
  cand = {"mr": partner["mr"], "ct": partner["ct"]}          # candidates aligned onto mr / ct
  fixed = jnp.concatenate([own["mr"], own["ct"]])
  # CT unlabelled: its target is the segmentor's prediction (any soft mask), MR's its label.
  shape = setup.batch["ct"]["label"].shape + (len(setup.data.class_names),)
  probs = {("mr", "own"): jnp.zeros(shape),
           ("ct", "own"): jax.nn.softmax(jax.random.normal(rng.prng_key(2), shape))}
  y = {m: jnp.asarray(setup.batch[m]["label"]) for m in ("mr", "ct")}
  labelled = {"mr": jnp.ones(shape[0]), "ct": jnp.zeros(shape[0])}
  batch = {m: {"label": y[m], "labelled": labelled[m]} for m in ("mr", "ct")}

  def loss_fn(p):
    return generator_lib.alignment_loss(method, p, stats, cand, fixed, probs, batch, None)

  values, grads = _adam_steps(loss_fn, params, 8)
  if target == "masks":
    # Independent reference at the identity warp: candidates' softmax masks (one segmentor pass)
    # against MR's one-hot labels and CT's given soft masks, per organ, background left out.
    moving = jnp.concatenate([cand["mr"], cand["ct"]])
    logits = jax.jit(lambda p, x: method.apply_generator(p, stats, "segment", x, "mr",
                                                         train=True)[0])(params, moving)
    masks = np.asarray(jax.nn.softmax(logits, -1))[..., 1:]
    targets = np.concatenate([np.eye(shape[-1])[np.asarray(y["mr"])],
                              np.asarray(probs[("ct", "own")])])[..., 1:]
    np.testing.assert_allclose(values[0], 1.0 - np.mean(_numpy_class_dice(masks, targets)),
                               rtol=1e-5)
  stn, rest = _split_transformer_grads(grads)
  assert rest and all(float(jnp.abs(g).max()) == 0.0 for g in rest)
  assert any(float(jnp.abs(g).max()) > 0 for g in stn)
  assert np.all(np.isfinite(values)) and values[-1] < values[0], values


def _with_offsets(params, kernel, bias):
  """`params` with the transformer's last layer (its control-point offsets) replaced."""
  out = jax.tree.map(lambda x: x, params)
  out["params"]["transformer"]["localisation"]["offsets"] = {"kernel": kernel, "bias": bias}
  return out


def test_the_mean_offset_term_penalises_the_offsets_every_pair_shares(setup, anatomies):
  method = _variant(setup, NO_TERMS, align_weight=0.0, mean_offset_weight=2.0, trained_by="all")
  params, stats = _generator(setup)
  # Hand case: a zero kernel in the last layer gives every pair the bias as its offsets, so the
  # batch's mean field is the bias in both directions and the term is mean(bias^2).
  bias = 0.01 * np.arange(50, dtype=np.float32) - 0.2
  layer = params["params"]["transformer"]["localisation"]["offsets"]
  shared = _with_offsets(params, jnp.zeros_like(layer["kernel"]), jnp.asarray(bias))
  loss, (_, metrics, _) = jax.jit(method.generator_loss)(
      shared, stats, setup.state.params, setup.state.stats, setup.batch, rng.prng_key(1))
  np.testing.assert_allclose(float(metrics["mean_offset"]), np.mean(bias ** 2), rtol=1e-5)
  np.testing.assert_allclose(float(loss), 2.0 * np.mean(bias ** 2), rtol=1e-5)

  own, partner = anatomies
  cand = {"mr": partner["mr"], "ct": partner["ct"]}
  fixed = terms.Stack([own["mr"], own["ct"]])

  def loss_fn(p, active=None):
    return generator_lib.mean_offset_loss(method, p, stats, cand, fixed, active)

  # Random weights: the reference averages each direction's offsets over its pairs in numpy.
  rand = _with_offsets(params, 0.05 * jax.random.normal(rng.prng_key(3), layer["kernel"].shape),
                       jnp.zeros_like(layer["bias"]))
  offsets = np.asarray(jax.jit(lambda p, x, f: method.apply_generator(
      p, stats, "displacements", x, f)[0])(rand, jnp.concatenate([cand["mr"], cand["ct"]]),
                                           fixed.value))
  n = own["mr"].shape[0]
  reference = np.mean([np.mean(offsets[:n], 0) ** 2, np.mean(offsets[n:], 0) ** 2])
  assert reference > 0
  values, grads = _adam_steps(loss_fn, rand, 5)
  np.testing.assert_allclose(values[0], reference, rtol=1e-5)
  assert float(jax.jit(loss_fn)(rand, jnp.asarray(False))) == 0.0  # before transformer.start
  assert all(float(jnp.abs(g).max()) == 0.0 for g in _split_transformer_grads(grads)[1])
  assert values[-1] < values[0], values


def _transformer_and_encoder_grads(method, state, batch):
  """The generator loss' gradients of the transformer and of the anatomy encoders' last layer
  (which every term's gradient to the encoders passes): (transformer's, encoder head's)."""
  params = state.params["generator"]

  def loss(part):
    tree = {**params["params"], "transformer": part["transformer"],
            "anatomy_encoder": {**params["params"]["anatomy_encoder"], "head": part["head"]}}
    return method.generator_loss({**params, "params": tree}, state.stats["generator"],
                                 state.params, state.stats, batch, rng.prng_key(1))[0]

  # Jitted: op-by-op dispatch costs more than compiling. Only these parameters' gradients: the
  # others' would add most of the backward pass to the program.
  grads = jax.jit(jax.grad(loss))({"transformer": params["params"]["transformer"],
                                   "head": params["params"]["anatomy_encoder"]["head"]})
  return grads["transformer"], grads["head"]


def test_stn_trained_by_align_leaves_the_transformer_to_the_registration_term(setup, anatomies):
  weight = 2.0
  full = _variant(setup, trained_by="align", align_target="masks", align_weight=weight)
  stn_full, encoder = _transformer_and_encoder_grads(full, setup.state, setup.batch)
  # The registration term alone, from the same anatomies (the generator's pass over each
  # modality's slices and partners): every slice is labelled, so its targets are the labels.
  assert all(np.all(setup.batch[m]["labelled"] == 1) for m in setup.data.modalities)
  own, partner = anatomies
  params, stats = _generator(setup)
  probs = {(m, "own"): jnp.zeros(setup.batch[m]["label"].shape + (full.num_classes,))
           for m in setup.data.modalities}
  grads_align = jax.jit(jax.grad(lambda p: weight * generator_lib.alignment_loss(
      full, p, stats, partner, jnp.concatenate([own["mr"], own["ct"]]), probs, setup.batch,
      None)))(params)
  stn_align = grads_align["params"]["transformer"]
  # Every other term is in the loss (the encoders get their gradients) but adds nothing to the
  # transformer's: it gets exactly the registration term's.
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(stn_align))
  chex.assert_trees_all_close(stn_full, stn_align, rtol=1e-5, atol=1e-8)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(encoder))
  # With the warp's gradient cut (straight-through) the transformer is the term's alone too, even
  # when every loss may train it.
  detached = _variant(setup, trained_by="all", warp_gradient="identity", align_weight=weight)
  stn_detached, encoder = _transformer_and_encoder_grads(detached, setup.state, setup.batch)
  chex.assert_trees_all_close(stn_detached, stn_align, rtol=1e-5, atol=1e-8)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(encoder))
  with pytest.raises(config_schema.ConfigError, match="mmsdnet.transformer.trained_by"):
    _variant(setup, trained_by="align", align_weight=0.0)
  with pytest.raises(config_schema.ConfigError, match="mmsdnet.transformer.warp_gradient"):
    _variant(setup, trained_by="all", warp_gradient="identity", align_weight=0.0)


def test_straight_through_warp_is_the_warp_forward_and_the_identity_backward():
  moving = jax.random.uniform(jax.random.PRNGKey(0), (2, 9, 9, 3))
  offsets = 0.05 * jax.random.normal(jax.random.PRNGKey(1), (2, 25, 2))
  weight = jax.random.normal(jax.random.PRNGKey(2), moving.shape)

  def loss(image, d):
    return jnp.sum(weight * terms.straight_through_warp(image, tps.thin_plate_spline(image, d)))

  warped = tps.thin_plate_spline(moving, offsets)
  assert float(jnp.max(jnp.abs(warped - moving))) > 1e-2     # the warp does move the image
  np.testing.assert_allclose(np.asarray(terms.straight_through_warp(moving, warped)),
                             np.asarray(warped), atol=1e-6)
  grad_image, grad_offsets = jax.grad(loss, argnums=(0, 1))(moving, offsets)
  np.testing.assert_allclose(np.asarray(grad_image), np.asarray(weight), atol=1e-6)
  assert float(jnp.max(jnp.abs(grad_offsets))) == 0.0


def test_the_transformer_stays_the_identity_and_untrained_before_stn_start(setup, trained):
  assert setup.stn_start == 3
  history = [_copy(st.params["generator"]["params"]["transformer"]) for st in trained.states]
  # Steps 0, 1, 2 leave it as initialised; steps 3, 4 and 5 move it.
  for before, after in zip(history[:3], history[1:4]):
    chex.assert_trees_all_equal(before, after)
  for before, after in zip(history[3:], history[4:]):
    assert any(not np.array_equal(a, b) for a, b in
               zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_swa_is_the_running_mean_of_the_raw_weights_after_the_start(setup, trained):
  states, start = trained.states[1:], setup.swa_start
  raw_params = [_copy(st.params["generator"]) for st in states]
  raw_stats = [_copy(st.stats["generator"]) for st in states]
  state, metrics = states[-1], trained.metrics[-1]
  # Steps 3 to 6 are after swa_start = 2.
  expected = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *raw_params[start:])
  chex.assert_trees_all_close(_copy(state.swa_params), expected, rtol=1e-5, atol=1e-6)
  expected_stats = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *raw_stats[start:])
  chex.assert_trees_all_close(_copy(state.swa_stats), expected_stats, rtol=1e-5, atol=1e-6)
  assert int(state.swa_count) == STEPS - start
  assert float(metrics["swa_count"]) == STEPS - start
  # Training keeps the raw weights; they differ from the average.
  assert any(not np.allclose(a, b) for a, b in
             zip(jax.tree.leaves(state.swa_params), jax.tree.leaves(raw_params[-1])))


def test_unlabelled_target_slices_have_zero_supervised_loss_and_their_labels_are_unused(
    setup, trained):
  batch = jax.tree.map(np.array, setup.batch)
  batch["ct"]["labelled"] = np.zeros_like(batch["ct"]["labelled"])
  other = jax.tree.map(np.array, batch)
  other["ct"]["label"] = (other["ct"]["label"] + 1) % len(setup.data.class_names)
  # From the first step that warps (transformer.start), so every term takes part.
  start = trained.states[setup.stn_start]
  state_a, metrics_a = setup.step(start, batch)
  state_b, metrics_b = setup.step(start, other)
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

  # Jitted (the reference and the method apart): op-by-op dispatch costs more than compiling.
  @jax.jit
  def reference(params, stats, x, partner):
    s_mr = method.apply_generator(params, stats, "anatomy", x, "mr")[0]
    s_ct = method.apply_generator(params, stats, "anatomy", partner[:, 0], "ct")[0]
    own = method.apply_generator(params, stats, "segment", s_mr, "mr")[0]
    return s_mr, s_ct, own

  s_mr, s_ct, own = reference(state.swa_params, state.swa_stats, x, partner)
  assert set(np.unique(np.asarray(s_mr))) <= {0.0, 1.0}
  # Single input: the image's own anatomy through the segmentor.
  single, multi = jax.jit(lambda st, x, p: (method.predict(st, x, "mr"),
                                            method.predict_multi(st, x, "mr", p)))(
      state, x, partner)
  np.testing.assert_allclose(np.asarray(single), np.asarray(own), atol=1e-5)
  # Multi input: with the identity warp, the element-wise maximum of the two anatomies.
  fused = np.maximum(np.asarray(s_mr), np.asarray(s_ct))
  logits = jax.jit(lambda p, st, s: method.apply_generator(p, st, "segment", s, "mr")[0])(
      state.swa_params, state.swa_stats, jnp.asarray(fused))
  np.testing.assert_allclose(np.asarray(multi), np.asarray(jax.nn.softmax(logits, -1)),
                             atol=1e-5)
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


def test_extra_evaluations_hand_the_analysis_files_to_the_trainer(setup, tmp_path):
  eval_config = setup.config.eval
  settings = {"surface_tolerance_mm": eval_config.surface_tolerance_mm,
              "hd95_variant": eval_config.hd95_variant, "assd_variant": eval_config.assd_variant}
  extra = setup.method.extra_evaluations(setup.state, setup.data, config=setup.config,
                                         workdir=tmp_path, settings=settings, checkpoint_step=0)
  assert not any(tmp_path.iterdir())                  # the trainer writes the files, not the method
  assert set(extra.summary) == {"multi_input", "alignment", "disentanglement"}
  json.dumps(extra.summary)
  for m in setup.data.modalities:
    block = extra.summary["multi_input"][m]
    assert block["candidates"] == 1 and block["partner_modality"] != m
    assert 0.0 <= block["mean"]["dice"] <= 1.0 and block["per_case"]
  assert set(extra.files) == {"disentanglement.json", "traversal.png"}
  assert json.loads(extra.files["disentanglement.json"]) == extra.summary["disentanglement"]
  assert extra.summary["disentanglement"]["samples"] > 0
  assert extra.files["traversal.png"][:8] == b"\x89PNG\r\n\x1a\n"

