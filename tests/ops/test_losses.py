"""Tests of unpaired_seg.ops.losses: hand-computed values and slow numpy loop references.

The segmentation and label-free losses, and what holds for every loss (jit, gradients, errors);
the cross-modal losses (KD, CSA) are tested in tests/ops/test_cross_modal_losses.py.

  python -m pytest -q tests/ops/test_losses.py
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops.loss_cases import SPATIAL, jl, np_softmax as _np_softmax, random_case as _random_case
from unpaired_seg.ops import losses


# ------------------------------------------------------------------------------------------------
# Slow numpy references: explicit loops over pixels and classes, float64.
# ------------------------------------------------------------------------------------------------


def _pixels(labels):
  """The spatial indices of one sample of [B, *spatial] labels."""
  return list(np.ndindex(labels.shape[1:]))


def ref_soft_dice(logits, labels, weights, include_background, smooth, reduction):
  batch, num_classes = logits.shape[0], logits.shape[-1]
  classes = range(0 if include_background else 1, num_classes)
  if reduction == "batch":
    if sum(weights) == 0:
      return 0.0
    dices = []
    for c in classes:
      inter = p_sum = g_sum = 0.0
      for b in range(batch):
        for idx in _pixels(labels):
          p = _np_softmax(logits[(b,) + idx])[c]
          g = 1.0 if labels[(b,) + idx] == c else 0.0
          inter += weights[b] * p * g
          p_sum += weights[b] * p
          g_sum += weights[b] * g
      dices.append((2 * inter + smooth) / (p_sum + g_sum + smooth))
    return 1.0 - sum(dices) / len(dices)
  total = norm = 0.0
  for b in range(batch):
    dices = []
    for c in classes:
      inter = p_sum = g_sum = 0.0
      for idx in _pixels(labels):
        p = _np_softmax(logits[(b,) + idx])[c]
        g = 1.0 if labels[(b,) + idx] == c else 0.0
        inter, p_sum, g_sum = inter + p * g, p_sum + p, g_sum + g
      dices.append((2 * inter + smooth) / (p_sum + g_sum + smooth))
    total += weights[b] * (1.0 - sum(dices) / len(dices))
    norm += weights[b]
  return total / norm if norm > 0 else 0.0


def ref_pooled_dice(logits, labels, weights, smooth):
  total = norm = 0.0
  for b in range(logits.shape[0]):
    inter = union = 0.0
    for idx in _pixels(labels):
      probs = _np_softmax(logits[(b,) + idx])
      for c in range(1, logits.shape[-1]):
        g = float(labels[(b,) + idx] == c)
        inter += probs[c] * g
        union += probs[c] + g
    total += weights[b] * (1.0 - (2 * inter + smooth) / (union + smooth))
    norm += weights[b]
  return total / norm if norm > 0 else 0.0


def ref_cross_entropy(logits, labels, weights, class_weights):
  total = norm = 0.0
  for b in range(logits.shape[0]):
    for idx in _pixels(labels):
      y = labels[(b,) + idx]
      w = weights[b] * class_weights[y]
      total += -w * math.log(_np_softmax(logits[(b,) + idx])[y])
      norm += w
  return total / norm if norm > 0 else 0.0


def ref_clipped_ce(logits, labels, weights, class_weights, clip):
  """The authors' form: a sum over classes of w_i g_i log(clip(p_i)), mean over pixels."""
  total = norm = 0.0
  for b in range(logits.shape[0]):
    pixels = _pixels(labels)
    sample = 0.0
    for idx in pixels:
      probs = _np_softmax(logits[(b,) + idx])
      for i in range(logits.shape[-1]):
        g = float(labels[(b,) + idx] == i)
        sample += -class_weights[i] * g * math.log(min(max(probs[i], clip), 1.0))
    total += weights[b] * sample / len(pixels)
    norm += weights[b]
  return total / norm if norm > 0 else 0.0


# ------------------------------------------------------------------------------------------------
# The 2x2 hand case: two classes, labels [[0, 1], [1, 1]], p(class 1) = [[.2, .6], [.8, .4]].
# Foreground: intersection .6 + .8 + .4 = 1.8, sum p = 2.0, sum g = 3 -> Dice 3.6 / 5 = 0.72.
# Background: intersection .8, sum p = 2.0, sum g = 1 -> Dice 1.6 / 3.
# ------------------------------------------------------------------------------------------------

HAND_LABELS = np.array([[[0, 1], [1, 1]]], np.int32)  # [1, 2, 2]
HAND_P1 = np.array([[[0.2, 0.6], [0.8, 0.4]]])
HAND_LOGITS = np.log(np.stack([1.0 - HAND_P1, HAND_P1], axis=-1)).astype(np.float32)  # [1, 2, 2, 2]


def test_soft_dice_hand_case():
  loss = jl.soft_dice_loss(HAND_LOGITS, HAND_LABELS, smooth=0.0)
  np.testing.assert_allclose(loss, 1.0 - 0.72, rtol=1e-5)
  loss_bg = jl.soft_dice_loss(HAND_LOGITS, HAND_LABELS, smooth=0.0, include_background=True)
  np.testing.assert_allclose(loss_bg, 1.0 - (0.72 + 1.6 / 3) / 2, rtol=1e-5)
  assert loss.dtype == jnp.float32 and loss.shape == ()
  # No weight and no smoothing: 0 / 0 per class counts as Dice 1, so the loss is 0, not NaN.
  assert float(jl.soft_dice_loss(HAND_LOGITS, HAND_LABELS, smooth=0.0,
                                 sample_weight=jnp.zeros(1))) == 0.0


def test_pooled_dice_hand_case():
  # Two classes: the pooled foreground is the single foreground class.
  loss = jl.pooled_dice_loss(HAND_LOGITS, HAND_LABELS)
  np.testing.assert_allclose(loss, 1.0 - 0.72, rtol=1e-5)


def test_cross_entropy_hand_case():
  # True-class probabilities .8, .6, .8, .4.
  expected = -(math.log(0.8) + math.log(0.6) + math.log(0.8) + math.log(0.4)) / 4
  np.testing.assert_allclose(jl.cross_entropy_loss(HAND_LOGITS, HAND_LABELS), expected,
                             rtol=1e-5)
  # Weights [2, 1]: the background pixel counts twice, the normaliser is 2 + 3.
  weighted = (-2 * math.log(0.8) - math.log(0.6) - math.log(0.8) - math.log(0.4)) / 5
  np.testing.assert_allclose(
      jl.cross_entropy_loss(HAND_LOGITS, HAND_LABELS, class_weights=jnp.array([2.0, 1.0])),
      weighted, rtol=1e-5)


def test_batch_class_weights_hand_case():
  # n = [1, 3, 0] of N = 4.
  np.testing.assert_allclose(jl.batch_class_weights(jnp.asarray(HAND_LABELS), 3),
                             [0.75, 0.25, 1.0], rtol=1e-6)


def test_clipped_weighted_cross_entropy_hand_case():
  p1 = np.array([[[0.2, 0.6], [0.8, 0.001]]])  # the last pixel's 0.001 is clipped to 0.005
  logits = jnp.asarray(np.log(np.stack([1.0 - p1, p1], axis=-1)), jnp.float32)
  labels = jnp.asarray(HAND_LABELS)
  weights = jl.batch_class_weights(labels, 2)  # [0.75, 0.25]
  expected = (-0.75 * math.log(0.8) - 0.25 * math.log(0.6) - 0.25 * math.log(0.8)
              - 0.25 * math.log(0.005)) / 4
  np.testing.assert_allclose(jl.clipped_weighted_cross_entropy(logits, labels, weights),
                             expected, rtol=1e-5)
  # The clipped pixel gets no gradient; the others do.
  grad = jax.jit(jax.grad(losses.clipped_weighted_cross_entropy))(logits, labels, weights)
  np.testing.assert_array_equal(grad[0, 1, 1], 0.0)
  assert np.all(np.abs(grad[0, 0, 0]) > 0)


def test_perfect_logits_give_zero_segmentation_losses():
  _, labels = _random_case(0, spatial=SPATIAL["3d"], num_classes=3)
  logits = 30.0 * jax.nn.one_hot(labels, 3)
  assert float(jl.soft_dice_loss(logits, labels)) < 1e-6
  assert float(jl.soft_dice_loss(logits, labels, include_background=True,
                                 reduction="sample")) < 1e-6
  assert float(jl.pooled_dice_loss(logits, labels)) < 1e-6
  assert float(jl.cross_entropy_loss(logits, labels)) < 1e-6
  # A wrong prediction is far from 0, so the checks above can fail.
  assert float(jl.soft_dice_loss(-logits, labels)) > 0.9


# ------------------------------------------------------------------------------------------------
# Segmentation losses against the loop references.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dims,reduction,include_background", [
    ("2d", "batch", False), ("2d", "batch", True), ("2d", "sample", False), ("2d", "sample", True),
    ("3d", "batch", False), ("3d", "sample", True)])
def test_soft_dice_matches_reference(dims, reduction, include_background):
  logits, labels = _random_case(1, batch=3, spatial=SPATIAL[dims], num_classes=4)
  weights = np.array([1.0, 0.0, 0.5])
  # No weights is the same as unit weights; checked once (each variant compiles).
  first = (dims, reduction, include_background) == ("2d", "batch", False)
  for w in ((None, weights) if first else (weights,)):
    got = jl.soft_dice_loss(logits, labels, sample_weight=w, reduction=reduction,
                            include_background=include_background, smooth=1e-3)
    expected = ref_soft_dice(logits, labels, np.ones(3) if w is None else w, include_background,
                             1e-3, reduction)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_pooled_dice_matches_reference_and_is_not_a_class_mean(dims):
  logits, labels = _random_case(2, batch=3, spatial=SPATIAL[dims], num_classes=4)
  weights = np.array([0.2, 1.0, 0.0])
  got = jl.pooled_dice_loss(logits, labels, sample_weight=weights)
  np.testing.assert_allclose(got, ref_pooled_dice(logits, labels, weights, 1e-12), rtol=1e-5)
  per_class = jl.soft_dice_loss(logits, labels, sample_weight=weights, reduction="sample")
  assert abs(float(got) - float(per_class)) > 1e-3


@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_cross_entropy_matches_reference(dims):
  logits, labels = _random_case(3, batch=3, spatial=SPATIAL[dims], num_classes=3)
  weights = np.array([1.0, 0.25, 0.0])
  class_weights = np.array([0.1, 2.0, 1.0])
  got = jl.cross_entropy_loss(logits, labels, sample_weight=weights, class_weights=class_weights)
  np.testing.assert_allclose(got, ref_cross_entropy(logits, labels, weights, class_weights),
                             rtol=1e-5)
  np.testing.assert_allclose(jl.cross_entropy_loss(logits, labels),
                             ref_cross_entropy(logits, labels, np.ones(3), np.ones(3)), rtol=1e-5)


@pytest.mark.parametrize("dims", ["2d", "3d"])
def test_clipped_weighted_cross_entropy_matches_reference(dims):
  # Large logits so that some true-class probabilities fall below the clip.
  logits, labels = _random_case(4, batch=2, spatial=SPATIAL[dims], num_classes=3, scale=4.0)
  class_weights = np.asarray(jl.batch_class_weights(jnp.asarray(labels), 3), np.float64)
  counts = np.bincount(labels.ravel(), minlength=3)
  np.testing.assert_allclose(class_weights, 1.0 - counts / labels.size, rtol=1e-6)
  true_probs = [_np_softmax(logits[idx])[labels[idx]] for idx in np.ndindex(labels.shape)]
  assert min(true_probs) < 0.005  # the clip is exercised
  for w in (np.ones(2), np.array([0.0, 2.0])):
    got = jl.clipped_weighted_cross_entropy(logits, labels, class_weights, sample_weight=w)
    np.testing.assert_allclose(got, ref_clipped_ce(logits, labels, w, class_weights, 0.005),
                               rtol=1e-5)


def test_dice_ce_loss_combines_the_references():
  logits, labels = _random_case(5, batch=2, num_classes=3)
  weights = np.array([1.0, 0.5])
  class_weights = np.array([0.5, 1.0, 2.0])
  got = jl.dice_ce_loss(logits, labels, sample_weight=weights, dice_weight=0.3, ce_weight=0.7,
                        class_weights=class_weights)
  expected = (0.3 * ref_soft_dice(logits, labels, weights, False, 1e-5, "batch")
              + 0.7 * ref_cross_entropy(logits, labels, weights, class_weights))
  np.testing.assert_allclose(got, expected, rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Sample weights: 0 drops a sample; all zero gives 0 (not NaN) and finite gradients.
# ------------------------------------------------------------------------------------------------

WEIGHTED_LOSSES = {
    "dice_batch": losses.soft_dice_loss,
    "dice_sample": functools.partial(losses.soft_dice_loss, reduction="sample"),
    "pooled_dice": losses.pooled_dice_loss,
    "cross_entropy": functools.partial(losses.cross_entropy_loss,
                                       class_weights=jnp.array([0.5, 1.0, 2.0])),
    "clipped_ce": lambda x, y, **kw: losses.clipped_weighted_cross_entropy(
        x, y, jnp.array([0.5, 1.0, 2.0]), **kw),
    "dice_ce": losses.dice_ce_loss,
    "l1": lambda x, y, **kw: losses.l1_loss(x, jax.nn.one_hot(y, 3), **kw),
}


@jax.jit
def _all_weighted(logits, labels, sample_weight):  # one compilation per shape for all of them
  return {name: fn(logits, labels, sample_weight=sample_weight)
          for name, fn in WEIGHTED_LOSSES.items()}


def test_zero_weight_drops_samples_and_all_zero_gives_zero():
  logits, labels = _random_case(6, batch=3, num_classes=3)
  dropped = _all_weighted(logits, labels, jnp.array([1.0, 0.0, 1.0]))
  subset = _all_weighted(logits[[0, 2]], labels[[0, 2]], jnp.ones(2))
  full = _all_weighted(logits, labels, jnp.ones(3))
  zero = _all_weighted(logits, labels, jnp.zeros(3))
  assert sorted(dropped) == sorted(WEIGHTED_LOSSES)
  for name in WEIGHTED_LOSSES:
    np.testing.assert_allclose(dropped[name], subset[name], rtol=1e-5, err_msg=name)
    assert abs(float(dropped[name]) - float(full[name])) > 1e-4, name
    assert float(zero[name]) == 0.0, name


def test_all_zero_weights_give_finite_zero_gradients():
  logits, labels = _random_case(7, batch=2, num_classes=3)
  zero = jnp.zeros((2,))

  @jax.jit
  def grads(x):  # one compilation for all of them
    return {name: jax.grad(lambda x, fn=fn: fn(x, labels, sample_weight=zero))(x)
            for name, fn in WEIGHTED_LOSSES.items()}

  for name, grad in grads(logits).items():
    assert np.all(np.isfinite(grad)) and np.all(grad == 0.0), name


# ------------------------------------------------------------------------------------------------
# Weight decay, KL, L1, LS-GAN.
# ------------------------------------------------------------------------------------------------


def test_l2_weight_decay_hand_case_and_paths():
  tree = {"params": {"conv": {"kernel": jnp.array([1.0, 2.0]), "bias": jnp.array([3.0])}},
          "norm_ct": {"scale": jnp.array([2.0])}, "layers": [jnp.array([1.0])],
          "step": jnp.array(7, jnp.int32)}
  # 0.5 * (1 + 4 + 9 + 4 + 1); the integer step does not count.
  np.testing.assert_allclose(losses.l2_weight_decay(tree), 9.5, rtol=1e-6)
  np.testing.assert_allclose(jax.jit(losses.l2_weight_decay)(tree), 9.5, rtol=1e-6)
  seen = []
  kernels = losses.l2_weight_decay(tree, include=lambda p: seen.append(p) or p.endswith("kernel"))
  np.testing.assert_allclose(kernels, 2.5, rtol=1e-6)
  assert sorted(seen) == ["layers/0", "norm_ct/scale", "params/conv/bias", "params/conv/kernel"]
  grad = jax.grad(losses.l2_weight_decay)(tree["params"])
  np.testing.assert_allclose(grad["conv"]["kernel"], [1.0, 2.0])


def test_kl_divergence_gaussian_hand_cases():
  zeros = jnp.zeros((3, 8))
  assert float(jl.kl_divergence_gaussian(zeros, zeros)) == 0.0
  # Sample 0: mean [1, 2], logvar [0, ln 2]: 0.5 + (2.5 - ln(2) / 2); sample 1: standard normal.
  mean = jnp.array([[1.0, 2.0], [0.0, 0.0]])
  logvar = jnp.array([[0.0, math.log(2.0)], [0.0, 0.0]])
  np.testing.assert_allclose(jl.kl_divergence_gaussian(mean, logvar),
                             0.5 * (3.0 - math.log(2.0) / 2), rtol=1e-6)


def test_l1_loss_hand_case():
  x = jnp.array([[0.0, 1.0], [2.0, 2.0]])
  y = jnp.array([[1.0, 1.0], [0.0, 0.0]])
  # Per-sample means 0.5 and 2.
  np.testing.assert_allclose(jl.l1_loss(x, y), 1.25, rtol=1e-6)
  np.testing.assert_allclose(jl.l1_loss(x, y, sample_weight=jnp.array([1.0, 3.0])),
                             (0.5 + 6.0) / 4, rtol=1e-6)


def test_lsgan_hand_cases():
  real = jnp.array([0.5, 1.5, 1.0])
  fake = jnp.array([0.5, -1.0])
  # 0.5 * ((.25 + .25 + 0) / 3 + (.25 + 1) / 2)
  np.testing.assert_allclose(jl.lsgan_discriminator_loss(real, fake),
                             0.5 * (0.5 / 3 + 0.625), rtol=1e-6)
  # ((-.5)^2 + (-2)^2) / 2
  np.testing.assert_allclose(jl.lsgan_generator_loss(fake), 2.125, rtol=1e-6)
  assert float(jl.lsgan_discriminator_loss(jnp.ones(4), jnp.zeros(4))) == 0.0
  assert float(jl.lsgan_generator_loss(jnp.ones(4))) == 0.0


# ------------------------------------------------------------------------------------------------
# Every loss: jit-able with finite gradients, in 2D and 3D.
# ------------------------------------------------------------------------------------------------


# The losses of _all_losses whose value depends on both inputs.
TWO_INPUT_LOSSES = ("kd_skip", "kd_uniform", "csa", "affinity", "l2", "kl", "l1", "lsgan_d")


def _all_losses(labels, labels_b, num_classes):
  """(name, fn of (logits, logits_b)) pairs covering every public loss."""
  class_weights = losses.batch_class_weights(labels, num_classes)

  def features(x):  # [B, *S, C] -> two feature maps at different resolutions
    coarse = x[(slice(None),) + (slice(None, None, 2),) * (x.ndim - 2)]
    return x, coarse[..., :2]

  return [
      ("soft_dice", lambda x, xb: losses.soft_dice_loss(x, labels)),
      ("soft_dice_sample", lambda x, xb: losses.soft_dice_loss(x, labels, reduction="sample")),
      ("pooled_dice", lambda x, xb: losses.pooled_dice_loss(x, labels)),
      ("cross_entropy", lambda x, xb: losses.cross_entropy_loss(x, labels)),
      ("clipped_ce",
       lambda x, xb: losses.clipped_weighted_cross_entropy(x, labels, class_weights)),
      ("dice_ce", lambda x, xb: losses.dice_ce_loss(x, labels)),
      ("kd_skip", lambda x, xb: losses.kd_loss(x, labels, xb, labels_b)),
      ("kd_uniform", lambda x, xb: losses.kd_loss(x, labels, xb, labels_b, absent="uniform")),
      ("csa", lambda x, xb: losses.csa_loss(features(x), labels, features(xb), labels_b,
                                            num_classes)),
      ("affinity", lambda x, xb: losses.csa_loss(features(x), labels, features(xb), labels_b,
                                                 num_classes, class_specific=False)),
      ("l2", lambda x, xb: losses.l2_weight_decay({"a": x, "b": xb})),
      ("kl", lambda x, xb: losses.kl_divergence_gaussian(x.reshape(x.shape[0], -1),
                                                         xb[:x.shape[0]].reshape(x.shape[0], -1))),
      ("l1", lambda x, xb: losses.l1_loss(x, xb[:x.shape[0]])),
      ("lsgan_d", lambda x, xb: losses.lsgan_discriminator_loss(x, xb)),
      ("lsgan_g", lambda x, xb: losses.lsgan_generator_loss(x)),
  ]


def test_every_loss_jits_with_finite_gradients():
  # Every loss in 3D, KD also in 2D; the 2D gradients of the other losses are covered by the
  # clipped cross-entropy, zero-weight and CSA gradient tests (each case costs compilation time).
  inputs, named = {}, []
  for dims, only in (("3d", None), ("2d", ("kd_skip",))):
    logits, labels = _random_case(17, batch=2, spatial=SPATIAL[dims], num_classes=3)
    logits_b, labels_b = _random_case(18, batch=3, spatial=SPATIAL[dims], num_classes=3)
    inputs[dims] = (logits, logits_b)
    named += [(f"{name}_{dims}", dims, fn)
              for name, fn in _all_losses(jnp.asarray(labels), jnp.asarray(labels_b), 3)
              if only is None or name in only]

  @jax.jit
  def values_and_grads(inputs):  # one compilation for all of them
    return {name: jax.value_and_grad(fn, argnums=(0, 1))(*inputs[dims])
            for name, dims, fn in named}

  results = values_and_grads(inputs)
  assert len(results) == len(named) == 16
  for name, (value, grads) in results.items():
    assert value.shape == () and value.dtype == jnp.float32, name
    assert np.isfinite(float(value)) and float(value) > 0, name
    assert all(np.all(np.isfinite(g)) for g in grads), name
    assert float(jnp.abs(grads[0]).sum()) > 0, name
    if name.rsplit("_", 1)[0] in TWO_INPUT_LOSSES:  # e.g. KD: no stop-gradient, both learn
      assert float(jnp.abs(grads[1]).sum()) > 0, name


# ------------------------------------------------------------------------------------------------
# Bad input: a ValueError that names the argument.
# ------------------------------------------------------------------------------------------------


def test_bad_input_raises_value_error_naming_the_argument():
  logits, labels = _random_case(19, batch=2, num_classes=3)
  with pytest.raises(ValueError, match="labels"):
    losses.soft_dice_loss(logits, labels.astype(np.float32))
  with pytest.raises(ValueError, match="labels"):
    losses.cross_entropy_loss(logits, labels[:, :-1])
  with pytest.raises(ValueError, match="sample_weight"):
    losses.pooled_dice_loss(logits, labels, sample_weight=jnp.ones(3))
  with pytest.raises(ValueError, match="reduction"):
    losses.soft_dice_loss(logits, labels, reduction="mean")
  with pytest.raises(ValueError, match="include_background"):
    losses.soft_dice_loss(logits[..., :1], labels)
  with pytest.raises(ValueError, match="class_weights"):
    losses.cross_entropy_loss(logits, labels, class_weights=jnp.ones(2))
  with pytest.raises(ValueError, match="class_weights"):
    losses.clipped_weighted_cross_entropy(logits, labels, jnp.ones(4))
  with pytest.raises(ValueError, match="num_classes"):
    losses.class_mean_logits(logits, labels, 4)
  with pytest.raises(ValueError, match="absent"):
    losses.kd_loss(logits, labels, logits, labels, absent="zero")
  with pytest.raises(ValueError, match="temperature"):
    losses.kd_loss(logits, labels, logits, labels, temperature=0.0)
  with pytest.raises(ValueError, match="logits_b"):
    losses.kd_loss(logits, labels, logits[..., :2], labels)
  with pytest.raises(ValueError, match="feats_b"):
    losses.csa_loss((logits, logits), labels, (logits, logits[..., :2]), labels, 3)
  with pytest.raises(ValueError, match="batch"):
    losses.affinity_matrices(logits, logits[:1], labels, 3)
  with pytest.raises(ValueError, match="logvar"):
    losses.kl_divergence_gaussian(jnp.zeros((2, 3)), jnp.zeros((2, 4)))
  with pytest.raises(ValueError, match="`y`"):
    losses.l1_loss(jnp.zeros((2, 3)), jnp.zeros((3, 3)))
