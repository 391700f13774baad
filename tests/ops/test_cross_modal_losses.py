"""Tests of unpaired_seg.ops.losses.cross_modal (KD and CSA): hand cases and numpy references.

  python -m pytest -q tests/ops/test_cross_modal_losses.py
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.ops.loss_cases import SPATIAL, jl, np_softmax as _np_softmax, random_case as _random_case
from unpaired_seg.ops.losses import cross_modal as losses  # the module, its _resize_nearest too


# ------------------------------------------------------------------------------------------------
# Slow numpy references: explicit loops over pixels and classes, float64.
# ------------------------------------------------------------------------------------------------


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
