"""Tests of unpaired_seg.ops.losses: hand-computed values and slow numpy loop references.

  python -m pytest -q tests/ops/test_losses.py
"""

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unpaired_seg.ops import losses


class _Jitted:
  """The public losses under `jax.jit`, their non-array arguments static.

  The tests go through these: one compilation per call signature is much cheaper than eager
  op-by-op dispatch, and it is the jitted code that training runs.
  """

  _STATIC = ("include_background", "smooth", "reduction", "num_classes", "clip", "dice_weight",
             "ce_weight", "temperature", "absent", "class_specific", "eps", "include")

  def __getattr__(self, name):
    fn = getattr(losses, name)
    params = inspect.signature(fn).parameters
    jitted = jax.jit(fn, static_argnames=[a for a in self._STATIC if a in params])
    setattr(self, name, jitted)
    return jitted


jl = _Jitted()

# Spatial shapes of the 2D and 3D cases used throughout.
SPATIAL = {"2d": (4, 5), "3d": (3, 4, 2)}


def _random_case(seed, batch=2, spatial=(4, 5), num_classes=3, scale=2.0):
  """Random logits [B, *spatial, C] (float32) and labels [B, *spatial] (int32)."""
  rng = np.random.default_rng(seed)
  logits = (scale * rng.standard_normal((batch, *spatial, num_classes))).astype(np.float32)
  labels = rng.integers(0, num_classes, size=(batch, *spatial)).astype(np.int32)
  return logits, labels


# ------------------------------------------------------------------------------------------------
# Slow numpy references: explicit loops over pixels and classes, float64.
# ------------------------------------------------------------------------------------------------


def _np_softmax(vector):
  """Softmax of one 1-D vector, float64."""
  vector = np.asarray(vector, np.float64)
  shifted = np.exp(vector - vector.max())
  return shifted / shifted.sum()


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


def ref_class_means(logits, labels):
  num_classes = logits.shape[-1]
  means = np.zeros((num_classes, num_classes))
  present = np.zeros(num_classes, bool)
  for c in range(num_classes):
    rows = [logits[idx] for idx in np.ndindex(labels.shape) if labels[idx] == c]
    if rows:
      means[c] = np.mean(np.stack(rows).astype(np.float64), axis=0)
      present[c] = True
  return means, present


def ref_kd(logits_a, labels_a, logits_b, labels_b, temperature, absent):
  means_a, present_a = ref_class_means(logits_a, labels_a)
  means_b, present_b = ref_class_means(logits_b, labels_b)
  terms = []
  for c in range(logits_a.shape[-1]):
    if absent == "skip" and not (present_a[c] and present_b[c]):
      continue
    q_a = _np_softmax(means_a[c] / temperature)
    q_b = _np_softmax(means_b[c] / temperature)
    terms.append(np.sum(q_a * np.log(q_a / q_b)) + np.sum(q_b * np.log(q_b / q_a)))
  return float(np.mean(terms)) if terms else 0.0


def ref_resize_nearest(x, spatial_out):
  """[B, *S, C] -> [B, *spatial_out, C], half-pixel centres, one output pixel at a time."""
  out = np.zeros((x.shape[0], *spatial_out, x.shape[-1]), x.dtype)
  for b in range(x.shape[0]):
    for idx in np.ndindex(tuple(spatial_out)):
      source = tuple(int(np.floor((i + 0.5) * x.shape[1 + d] / spatial_out[d]))
                     for d, i in enumerate(idx))
      out[(b,) + idx] = x[(b,) + source]
  return out


def ref_affinity(feat_l, feat_k, labels, num_classes, class_specific, eps=1e-8):
  feat_l = feat_l.astype(np.float64)
  feat_k = feat_k.astype(np.float64)
  batch, spatial_l, spatial_k = feat_l.shape[0], feat_l.shape[1:-1], feat_k.shape[1:-1]
  rows = num_classes if class_specific else 1
  masks = np.zeros(labels.shape + (rows,))
  for idx in np.ndindex(labels.shape):
    if class_specific:
      masks[idx + (labels[idx],)] = 1.0
    else:
      masks[idx + (0,)] = 1.0
  result = np.zeros((rows, feat_l.shape[-1], feat_k.shape[-1]))
  for c in range(rows):
    mask_l = ref_resize_nearest(masks[..., c:c + 1], spatial_l)
    mask_k = ref_resize_nearest(masks[..., c:c + 1], spatial_k)
    masked_l = feat_l * mask_l
    masked_k = ref_resize_nearest(feat_k * mask_k, spatial_l)  # mask first, then resize
    for b in range(batch):
      area = max(mask_l[b].sum(), 1.0)
      for m in range(feat_l.shape[-1]):
        for n in range(feat_k.shape[-1]):
          u = masked_l[b, ..., m].ravel()
          v = masked_k[b, ..., n].ravel()
          cosine = u @ v / (max(np.linalg.norm(u), eps) * max(np.linalg.norm(v), eps))
          result[c, m, n] += cosine / area / batch
  return result


def ref_csa(feats_a, labels_a, feats_b, labels_b, num_classes, class_specific):
  a = ref_affinity(*feats_a, labels_a, num_classes, class_specific)
  b = ref_affinity(*feats_b, labels_b, num_classes, class_specific)
  total = 0.0
  for c in range(a.shape[0]):
    entry_sum = sum(a[c, m, n] - b[c, m, n] for m in range(a.shape[1]) for n in range(a.shape[2]))
    total += (entry_sum / (a.shape[1] * a.shape[2])) ** 2
  return total / a.shape[0]


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
# Knowledge distillation.
# ------------------------------------------------------------------------------------------------


def test_class_mean_logits_matches_reference():
  logits, labels = _random_case(8, batch=2, num_classes=4)
  labels[labels == 3] = 1  # class 3 absent
  means, present = jl.class_mean_logits(logits, labels, 4)
  ref_means, ref_present = ref_class_means(logits, labels)
  np.testing.assert_allclose(means, ref_means, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(present, ref_present)
  assert not present[3] and np.all(means[3] == 0.0)


def _kd_case(dims):
  """Two modalities with different batch and spatial sizes; class 3 absent from b only."""
  spatial_b = tuple(s + 1 for s in SPATIAL[dims])
  logits_a, labels_a = _random_case(9, batch=2, spatial=SPATIAL[dims], num_classes=4)
  logits_b, labels_b = _random_case(10, batch=3, spatial=spatial_b, num_classes=4)
  labels_a[0, 0] = 3  # make sure a has class 3
  labels_b[labels_b == 3] = 2
  return logits_a, labels_a, logits_b, labels_b


@pytest.mark.parametrize("dims,absent,temperature", [("2d", "skip", 2.0), ("2d", "uniform", 2.0),
                                                     ("3d", "skip", 1.0), ("3d", "uniform", 1.0)])
def test_kd_loss_matches_reference(dims, absent, temperature):
  case = _kd_case(dims)
  got = jl.kd_loss(*case, temperature=temperature, absent=absent)
  np.testing.assert_allclose(got, ref_kd(*case, temperature, absent), rtol=1e-4, atol=1e-7)


def test_kd_loss_absent_modes_differ_and_skip_without_common_class_is_zero():
  case = _kd_case("2d")
  assert abs(float(jl.kd_loss(*case, absent="skip"))
             - float(jl.kd_loss(*case, absent="uniform"))) > 1e-4
  logits_a, labels_a, logits_b, labels_b = case
  only_0 = np.zeros_like(labels_a)
  only_1 = np.ones_like(labels_b)
  assert float(jl.kd_loss(logits_a, only_0, logits_b, only_1, absent="skip")) == 0.0
  uniform = jl.kd_loss(logits_a, only_0, logits_b, only_1, absent="uniform")
  np.testing.assert_allclose(uniform, ref_kd(logits_a, only_0, logits_b, only_1, 2.0, "uniform"),
                             rtol=1e-4)
  assert float(uniform) > 0


@pytest.mark.parametrize("absent", ["skip", "uniform"])
def test_kd_loss_symmetric_and_zero_on_identical_inputs(absent):
  logits_a, labels_a, logits_b, labels_b = _kd_case("2d")
  ab = jl.kd_loss(logits_a, labels_a, logits_b, labels_b, absent=absent)
  ba = jl.kd_loss(logits_b, labels_b, logits_a, labels_a, absent=absent)
  np.testing.assert_allclose(ab, ba, rtol=1e-6)
  assert float(ab) > 0
  same = jl.kd_loss(logits_a, labels_a, logits_a, labels_a, absent=absent)
  assert abs(float(same)) < 1e-7
  # That both modalities get gradients is checked in test_every_loss_jits_with_finite_gradients.


# ------------------------------------------------------------------------------------------------
# Class-specific affinity.
# ------------------------------------------------------------------------------------------------


def test_resize_nearest_matches_reference_and_jax_image():
  x = np.arange(2 * 5 * 3 * 2, dtype=np.float32).reshape(2, 5, 3, 2)
  for shape in [(2, 2), (7, 4), (3, 3), (5, 1)]:
    got = losses._resize_nearest(jnp.asarray(x), shape)
    np.testing.assert_array_equal(got, ref_resize_nearest(x, shape))
    np.testing.assert_array_equal(got, jax.image.resize(x, (2, *shape, 2), "nearest"))


def test_affinity_hand_case():
  # One sample, 2x1 positions all of class 1. Layer l: [1, 2]; layer k: [2, 4] and [1, -1].
  feat_l = jnp.array([1.0, 2.0]).reshape(1, 2, 1, 1)
  feat_k = jnp.array([[2.0, 1.0], [4.0, -1.0]]).reshape(1, 2, 1, 2)
  labels = jnp.ones((1, 2, 1), jnp.int32)
  # Class 1: cosines 1 and -1 / sqrt(10), divided by the area 2; class 0 is absent: zeros.
  expected = np.array([[[0.0, 0.0]], [[0.5, -0.5 / math.sqrt(10.0)]]])
  np.testing.assert_allclose(jl.affinity_matrices(feat_l, feat_k, labels, 2), expected,
                             rtol=1e-6)
  np.testing.assert_allclose(
      jl.affinity_matrices(feat_l, feat_k, labels, 2, class_specific=False), expected[1:],
      rtol=1e-6)


def _affinity_case(seed, dims, batch=2):
  """feat_l at the label size / 2 with 3 channels; feat_k smaller, with 2 channels."""
  rng = np.random.default_rng(seed)
  label_spatial = {"2d": (8, 6), "3d": (4, 6, 4)}[dims]
  spatial_l = tuple(s // 2 for s in label_spatial)
  spatial_k = tuple(max(s // 4, 1) for s in label_spatial)
  feat_l = rng.standard_normal((batch, *spatial_l, 3)).astype(np.float32)
  feat_k = rng.standard_normal((batch, *spatial_k, 2)).astype(np.float32)
  labels = rng.integers(0, 3, size=(batch, *label_spatial)).astype(np.int32)
  labels[0][labels[0] == 2] = 1  # class 2 absent from sample 0; class 3 absent everywhere
  return feat_l, feat_k, labels


@pytest.mark.parametrize("dims", ["2d", "3d"])
@pytest.mark.parametrize("class_specific", [True, False])
def test_affinity_matches_reference(dims, class_specific):
  feat_l, feat_k, labels = _affinity_case(11, dims)
  got = jl.affinity_matrices(feat_l, feat_k, labels, 4, class_specific=class_specific)
  expected = ref_affinity(feat_l, feat_k, labels, 4, class_specific)
  assert got.shape == ((4, 3, 2) if class_specific else (1, 3, 2))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  if class_specific:
    np.testing.assert_array_equal(got[3], 0.0)  # absent from the batch


@pytest.mark.parametrize("dims,class_specific", [("2d", True), ("2d", False), ("3d", True)])
def test_csa_loss_matches_reference_and_is_zero_for_equal_inputs(dims, class_specific):
  feat_la, feat_ka, labels_a = _affinity_case(12, dims, batch=2)
  feat_lb, feat_kb, labels_b = _affinity_case(13, dims, batch=3)
  feat_lb = feat_lb + 0.5  # a shift, so that the mean affinities differ
  got = jl.csa_loss((feat_la, feat_ka), labels_a, (feat_lb, feat_kb), labels_b, 4,
                        class_specific=class_specific)
  expected = ref_csa((feat_la, feat_ka), labels_a, (feat_lb, feat_kb), labels_b, 4,
                     class_specific)
  assert expected > 0
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-12)
  same = jl.csa_loss((feat_la, feat_ka), labels_a, (feat_la, feat_ka), labels_a, 4,
                         class_specific=class_specific)
  assert float(same) == 0.0


def test_csa_loss_gradients_reach_both_modalities_and_stay_finite_at_zero_norms():
  feat_la, feat_ka, labels_a = _affinity_case(14, "2d")
  feat_lb, feat_kb, labels_b = _affinity_case(15, "2d")
  feat_kb[..., 1] = 0.0  # a channel with zero norm everywhere: the eps guard of the cosine

  def loss(fa, fb):
    return losses.csa_loss(fa, labels_a, fb, labels_b, 4)

  grad_a, grad_b = jax.jit(jax.grad(loss, argnums=(0, 1)))((feat_la, feat_ka), (feat_lb, feat_kb))
  for grad in jax.tree_util.tree_leaves((grad_a, grad_b)):
    assert np.all(np.isfinite(grad)) and float(jnp.abs(grad).sum()) > 0


@pytest.mark.parametrize("class_specific", [False, True])
def test_csa_loss_stays_bounded_under_jitted_value_and_grad_with_dead_relu_channels(
    class_specific):
  # A network's layers: a quarter of the first layer's channels are dead ReLUs (exactly zero),
  # the second layer feeds on the first. The plain affinity's eps-guarded cosine once returned
  # 1e20..inf here under jit(value_and_grad) while jit alone gave 1e-21 (NaN training on the
  # real data); the loss is the square of a mean of cosines / area, so it can never exceed 4.
  rng = np.random.default_rng(3)
  x = np.abs(rng.normal(size=(8, 6, 6, 16))).astype(np.float32)
  w1 = rng.normal(size=(16, 128)).astype(np.float32)
  w1[:, :32] = -np.abs(w1[:, :32])
  w2 = rng.normal(size=(128, 64)).astype(np.float32)
  labels = rng.integers(0, 5, size=(8, 64, 64))

  def loss(w1, w2):
    feat_la = jax.nn.relu(x @ w1)
    feat_lb = jax.nn.relu((1.3 * x) @ w1)
    return losses.csa_loss((feat_la, jax.nn.relu(feat_la @ w2)), labels,
                           (feat_lb, jax.nn.relu(feat_lb @ w2)), labels, 5,
                           class_specific=class_specific)

  value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(w1, w2)
  w1_np, w2_np = np.asarray(w1, np.float64), np.asarray(w2, np.float64)
  feat_a = np.maximum(x @ w1_np, 0)
  feat_b = np.maximum(1.3 * x @ w1_np, 0)
  expected = ref_csa((feat_a, np.maximum(feat_a @ w2_np, 0)), labels,
                     (feat_b, np.maximum(feat_b @ w2_np, 0)), labels, 5, class_specific)
  assert 0 <= float(value) <= 4
  np.testing.assert_allclose(value, expected, rtol=1e-3, atol=1e-12)
  for grad in grads:
    assert np.all(np.isfinite(grad))


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
