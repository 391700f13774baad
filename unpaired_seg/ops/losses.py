"""Losses for unpaired multi-modal segmentation, in pure jax.numpy (no Flax).

Segmentation (soft Dice, the MMSDNet code's pooled Dice, cross-entropy, the UMMKD code's clipped
class-weighted cross-entropy), knowledge distillation between modalities (UMMKD), class-specific
affinity (CSA, Chen et al.), weight decay, the VAE's KL term, L1 reconstruction and the
least-squares GAN terms.

Conventions:
  * Channels last, any number of spatial dims: logits are [B, H, W, C] or [B, D, H, W, C].
  * `labels` are integer class maps [B, *spatial] with background = class 0. Values outside
    [0, C) cannot be checked under `jit`; they become an all-zero one-hot row (no class).
  * `sample_weight` [B] (optional, non-negative float): 0 drops a sample (an unlabelled slice in
    semi-supervised training). A loss is a weighted average over the samples and is 0, not NaN,
    when the total weight is 0.
  * Every function is jit-able (its non-array arguments static, e.g.
    `jax.jit(kd_loss, static_argnames=("temperature", "absent"))`) and differentiable, and
    returns a float32 scalar unless stated.

Tests (hand-computed values and slow numpy references):

  python -m pytest -q tests/ops/test_losses.py
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Matmuls and einsums below are reductions of a loss: keep them in full float32 even on
# accelerators whose default matmul precision is lower.
_PRECISION = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------------------------
# Helpers.
# ------------------------------------------------------------------------------------------------


def _safe_divide(numerator: jax.Array, denominator: jax.Array, *, empty: float = 0.0) -> jax.Array:
  """numerator / denominator, `empty` where the denominator is 0, with finite gradients.

  The inner `where` keeps the untaken branch finite too: a plain `where(d > 0, n / d, 0)` has a
  NaN gradient wherever d == 0.
  """
  nonzero = denominator != 0
  safe = jnp.where(nonzero, denominator, 1.0)
  return jnp.where(nonzero, numerator / safe, empty)


def _check_logits_labels(logits: jax.Array, labels: jax.Array, fn: str,
                         logits_name: str = "logits", labels_name: str = "labels") -> None:
  """Static checks of a [B, *spatial, C] logits / [B, *spatial] labels pair."""
  if logits.ndim < 3:
    raise ValueError(f"{fn}: `{logits_name}` must be [B, *spatial, C] with at least one spatial "
                     f"dim, got shape {logits.shape}")
  if tuple(labels.shape) != tuple(logits.shape[:-1]):
    raise ValueError(f"{fn}: `{labels_name}` must have shape {tuple(logits.shape[:-1])} "
                     f"(`{logits_name}` without its channel axis), got {tuple(labels.shape)}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"{fn}: `{labels_name}` must be an integer class map, got dtype "
                     f"{labels.dtype}")


def _sample_weights(sample_weight: jax.Array | None, batch: int, fn: str) -> jax.Array:
  """[B] float32 sample weights; all ones when None."""
  if sample_weight is None:
    return jnp.ones((batch,), jnp.float32)
  sample_weight = jnp.asarray(sample_weight, jnp.float32)
  if sample_weight.shape != (batch,):
    raise ValueError(f"{fn}: `sample_weight` must have shape ({batch},) (one weight per sample), "
                     f"got {sample_weight.shape}")
  return sample_weight


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(w * v) / sum(w) over [B] values; 0 when the weights sum to 0."""
  return _safe_divide(jnp.sum(weights * values), jnp.sum(weights))


def _one_hot(labels: jax.Array, num_classes: int) -> jax.Array:
  """[B, *spatial] int -> [B, *spatial, C] float32."""
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)


def _spatial_axes(x: jax.Array) -> tuple[int, ...]:
  """The spatial axes of a [B, *spatial, C] array."""
  return tuple(range(1, x.ndim - 1))


def _resize_nearest(x: jax.Array, spatial_shape: Sequence[int]) -> jax.Array:
  """Nearest-neighbour resize of [B, *spatial, C] to [B, *spatial_shape, C].

  Half-pixel centres: output index i reads input index floor((i + 0.5) * n_in / n_out), the rule
  of `jax.image.resize(..., 'nearest')`. The indices are computed in exact integer arithmetic
  (shapes are static), which float32 cannot promise for large sizes.
  """
  for axis, size_out in enumerate(spatial_shape, start=1):
    size_in = x.shape[axis]
    if size_in == size_out:
      continue
    index = (2 * np.arange(size_out) + 1) * size_in // (2 * size_out)
    x = jnp.take(x, jnp.asarray(index, jnp.int32), axis=axis)
  return x


# ------------------------------------------------------------------------------------------------
# Segmentation losses.
# ------------------------------------------------------------------------------------------------


def soft_dice_loss(logits: jax.Array, labels: jax.Array, *, sample_weight: jax.Array | None = None,
                   include_background: bool = False, smooth: float = 1e-5,
                   reduction: str = "batch") -> jax.Array:
  """1 - mean over classes of the soft Dice of softmax(logits) against one-hot labels.

  Per class c, Dice_c = (2 sum(p_c g_c) + smooth) / (sum p_c + sum g_c + smooth). A class with
  0 / 0 (possible only with smooth = 0) counts as Dice 1: nothing to find, nothing found.

  Args:
    logits: [B, *spatial, C] pre-softmax scores.
    labels: [B, *spatial] integer classes, background = 0.
    sample_weight: optional [B] non-negative weights; 0 drops a sample.
    include_background: average over all C classes, else over classes 1..C-1.
    smooth: added to numerator and denominator.
    reduction: "batch": the sums run over the batch and the spatial dims, each sample's sums
      scaled by its weight (one Dice per class for the whole batch); "sample": one Dice per sample
      and class, the per-sample losses then averaged with the sample weights.

  Returns:
    float32 scalar; 0 when the total sample weight is 0.
  """
  fn = "soft_dice_loss"
  _check_logits_labels(logits, labels, fn)
  if reduction not in ("batch", "sample"):
    raise ValueError(f"{fn}: `reduction` must be 'batch' or 'sample', got {reduction!r}")
  num_classes = logits.shape[-1]
  first = 0 if include_background else 1
  if num_classes - first < 1:
    raise ValueError(f"{fn}: `logits` has {num_classes} channel(s); without the background "
                     "(include_background=False) no class is left to average")
  weights = _sample_weights(sample_weight, logits.shape[0], fn)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  onehot = _one_hot(labels, num_classes)
  axes = _spatial_axes(probs)
  # Per sample and class: [B, C].
  intersection = jnp.sum(probs * onehot, axis=axes)
  pred_sum = jnp.sum(probs, axis=axes)
  true_sum = jnp.sum(onehot, axis=axes)
  if reduction == "batch":
    # With all weights 0 every sum is 0, so each Dice is smooth / smooth or 0 / 0, both 1: the
    # loss is 0 without a special case.
    w = weights[:, None]
    dice = _safe_divide(2.0 * jnp.sum(w * intersection, 0) + smooth,
                        jnp.sum(w * pred_sum, 0) + jnp.sum(w * true_sum, 0) + smooth, empty=1.0)
    return (1.0 - jnp.mean(dice[first:])).astype(jnp.float32)
  dice = _safe_divide(2.0 * intersection + smooth, pred_sum + true_sum + smooth, empty=1.0)
  per_sample = 1.0 - jnp.mean(dice[:, first:], axis=-1)  # [B]
  return _weighted_mean(per_sample, weights).astype(jnp.float32)


def pooled_dice_loss(logits: jax.Array, labels: jax.Array, *,
                     sample_weight: jax.Array | None = None, smooth: float = 1e-12) -> jax.Array:
  """The MMSDNet/DAFNet code's Dice: all foreground channels pooled into ONE Dice per sample.

  Per sample b, with p = softmax(logits) and g = one-hot(labels) restricted to channels 1..C-1:
  Dice_b = (2 sum(p g) + smooth) / (sum p + sum g + smooth), the sums over the spatial dims AND the
  foreground channels. Loss = weighted mean over samples of 1 - Dice_b. Unlike a per-class mean,
  a large structure dominates a small one. (The authors' code keeps background in the last
  channel and its first C-1 channels are the foreground; here background is channel 0.)

  Args:
    logits: [B, *spatial, C] pre-softmax scores, C >= 2.
    labels: [B, *spatial] integer classes, background = 0.
    sample_weight: optional [B] non-negative weights; 0 drops a sample.
    smooth: added to numerator and denominator (the code's 1e-12).

  Returns:
    float32 scalar; 0 when the total sample weight is 0.
  """
  fn = "pooled_dice_loss"
  _check_logits_labels(logits, labels, fn)
  num_classes = logits.shape[-1]
  if num_classes < 2:
    raise ValueError(f"{fn}: `logits` needs a background and at least one foreground channel, "
                     f"got {num_classes} channel(s)")
  weights = _sample_weights(sample_weight, logits.shape[0], fn)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1:]
  onehot = _one_hot(labels, num_classes)[..., 1:]
  axes = tuple(range(1, probs.ndim))  # spatial dims and foreground channels together
  intersection = jnp.sum(probs * onehot, axis=axes)  # [B]
  union = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)
  dice = _safe_divide(2.0 * intersection + smooth, union + smooth, empty=1.0)
  return _weighted_mean(1.0 - dice, weights).astype(jnp.float32)


def cross_entropy_loss(logits: jax.Array, labels: jax.Array, *,
                       sample_weight: jax.Array | None = None,
                       class_weights: jax.Array | None = None) -> jax.Array:
  """Mean pixel cross-entropy of log_softmax(logits) against integer labels.

  With class weights w [C] it is the weighted mean sum(w_y ce) / sum(w_y) over the pixels (each
  pixel's weight also scaled by its sample's weight). A pixel whose label is outside [0, C) has
  weight 0.

  Args:
    logits: [B, *spatial, C] pre-softmax scores.
    labels: [B, *spatial] integer classes.
    sample_weight: optional [B] non-negative weights; 0 drops a sample.
    class_weights: optional [C] non-negative per-class weights.

  Returns:
    float32 scalar; 0 when the total weight is 0.
  """
  fn = "cross_entropy_loss"
  _check_logits_labels(logits, labels, fn)
  num_classes = logits.shape[-1]
  weights = _sample_weights(sample_weight, logits.shape[0], fn)
  if class_weights is None:
    class_weights = jnp.ones((num_classes,), jnp.float32)
  class_weights = jnp.asarray(class_weights, jnp.float32)
  if class_weights.shape != (num_classes,):
    raise ValueError(f"{fn}: `class_weights` must have shape ({num_classes},), got "
                     f"{class_weights.shape}")
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  onehot = _one_hot(labels, num_classes)
  ce = -jnp.sum(onehot * log_probs, axis=-1)  # [B, *spatial]
  pixel_weight = jnp.sum(onehot * class_weights, axis=-1)
  pixel_weight = pixel_weight * weights.reshape((-1,) + (1,) * (ce.ndim - 1))
  return _safe_divide(jnp.sum(pixel_weight * ce), jnp.sum(pixel_weight)).astype(jnp.float32)


def batch_class_weights(labels: jax.Array, num_classes: int) -> jax.Array:
  """The UMMKD code's class weights w_c = 1 - n_c / N, counted over the whole batch.

  Args:
    labels: [B, *spatial] integer classes.
    num_classes: C.

  Returns:
    [C] float32; an absent class gets weight 1.
  """
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"batch_class_weights: `labels` must be an integer class map, got dtype "
                     f"{labels.dtype}")
  if num_classes < 1:
    raise ValueError(f"batch_class_weights: `num_classes` must be >= 1, got {num_classes}")
  counts = jnp.sum(_one_hot(labels.reshape(-1), num_classes), axis=0)  # [C]
  return (1.0 - counts / labels.size).astype(jnp.float32)


def clipped_weighted_cross_entropy(logits: jax.Array, labels: jax.Array, class_weights: jax.Array,
                                   clip: float = 0.005, *,
                                   sample_weight: jax.Array | None = None) -> jax.Array:
  """The UMMKD code's cross-entropy: -w_y log(clip(p_y, clip, 1)), a plain mean over pixels.

  Unlike `cross_entropy_loss` the sum is divided by the number of pixels, not by the sum of the
  weights, and the probabilities are clipped, so a pixel with p_y < clip has no gradient.
  Use `batch_class_weights(labels, C)` for the code's weights.

  Args:
    logits: [B, *spatial, C] pre-softmax scores.
    labels: [B, *spatial] integer classes.
    class_weights: [C] per-class weights.
    clip: lower bound of the probabilities (the code's 0.005).
    sample_weight: optional [B] non-negative weights; the per-sample pixel means are averaged
      with them (all ones gives the code's mean over every pixel of the batch).

  Returns:
    float32 scalar; 0 when the total sample weight is 0.
  """
  fn = "clipped_weighted_cross_entropy"
  _check_logits_labels(logits, labels, fn)
  num_classes = logits.shape[-1]
  class_weights = jnp.asarray(class_weights, jnp.float32)
  if class_weights.shape != (num_classes,):
    raise ValueError(f"{fn}: `class_weights` must have shape ({num_classes},), got "
                     f"{class_weights.shape}")
  weights = _sample_weights(sample_weight, logits.shape[0], fn)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  onehot = _one_hot(labels, num_classes)
  true_prob = jnp.sum(onehot * probs, axis=-1)
  pixel_weight = jnp.sum(onehot * class_weights, axis=-1)
  # Out-of-range labels have weight 0; clipping keeps their log finite.
  ce = -pixel_weight * jnp.log(jnp.clip(true_prob, clip, 1.0))  # [B, *spatial]
  per_sample = jnp.mean(ce.reshape(ce.shape[0], -1), axis=1)
  return _weighted_mean(per_sample, weights).astype(jnp.float32)


def dice_ce_loss(logits: jax.Array, labels: jax.Array, *, sample_weight: jax.Array | None = None,
                 dice_weight: float = 1.0, ce_weight: float = 1.0,
                 class_weights: jax.Array | None = None,
                 include_background: bool = False) -> jax.Array:
  """dice_weight * soft_dice_loss + ce_weight * cross_entropy_loss (the papers' supervised loss).

  Args:
    logits: [B, *spatial, C] pre-softmax scores.
    labels: [B, *spatial] integer classes.
    sample_weight: optional [B] non-negative weights, passed to both terms.
    dice_weight: weight of the Dice term (alpha).
    ce_weight: weight of the cross-entropy term (beta).
    class_weights: optional [C] weights of the cross-entropy term.
    include_background: passed to `soft_dice_loss`.

  Returns:
    float32 scalar; 0 when the total sample weight is 0.
  """
  dice = soft_dice_loss(logits, labels, sample_weight=sample_weight,
                        include_background=include_background)
  ce = cross_entropy_loss(logits, labels, sample_weight=sample_weight, class_weights=class_weights)
  return (dice_weight * dice + ce_weight * ce).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# Knowledge distillation (UMMKD).
# ------------------------------------------------------------------------------------------------


def class_mean_logits(logits: jax.Array, labels: jax.Array,
                      num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Mean pre-softmax logit vector over the pixels of each ground-truth class, over the batch.

  Args:
    logits: [B, *spatial, C] pre-softmax scores.
    labels: [B, *spatial] integer classes.
    num_classes: C; must equal the channels of `logits`.

  Returns:
    means: [C, C] float32, row c the mean logit vector of the pixels labelled c; a zero row for a
      class absent from the batch (as the authors' code).
    present: [C] bool, whether class c has at least one pixel.
  """
  fn = "class_mean_logits"
  _check_logits_labels(logits, labels, fn)
  if logits.shape[-1] != num_classes:
    raise ValueError(f"{fn}: `logits` has {logits.shape[-1]} channels but `num_classes` is "
                     f"{num_classes}")
  flat_logits = logits.astype(jnp.float32).reshape(-1, num_classes)  # [P, C]
  onehot = _one_hot(labels.reshape(-1), num_classes)  # [P, C]
  sums = jnp.einsum("pc,pk->ck", onehot, flat_logits, precision=_PRECISION)
  counts = jnp.sum(onehot, axis=0)
  means = sums / jnp.maximum(counts, 1.0)[:, None]
  return means, counts > 0


def kd_loss(logits_a: jax.Array, labels_a: jax.Array, logits_b: jax.Array, labels_b: jax.Array, *,
            temperature: float = 2.0, absent: str = "skip") -> jax.Array:
  """UMMKD's symmetric KL between the class-wise soft predictions of two modalities.

  q_x[c] = softmax(class_mean_logits_x[c] / T); per class KL(q_a[c] || q_b[c]) +
  KL(q_b[c] || q_a[c]); the loss is the mean over classes. No T^2 factor and no stop-gradient:
  both modalities get gradients. The authors' code halves each class's term and weights the
  loss with alpha; the paper writes (alpha / 2) L_kd: the halving belongs to the caller's weight.

  Args:
    logits_a: [B_a, *spatial_a, C] pre-softmax scores of modality a.
    labels_a: [B_a, *spatial_a] integer classes.
    logits_b: [B_b, *spatial_b, C]; batch and spatial sizes may differ from a's.
    labels_b: [B_b, *spatial_b].
    temperature: T > 0.
    absent: "skip" averages over the classes present in BOTH batches (0 if there is none);
      "uniform" (the authors' code) compares every class, an absent one as a zero logit vector,
      i.e. the uniform distribution.

  Returns:
    float32 scalar.
  """
  fn = "kd_loss"
  if absent not in ("skip", "uniform"):
    raise ValueError(f"{fn}: `absent` must be 'skip' or 'uniform', got {absent!r}")
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f"{fn}: `temperature` must be > 0, got {temperature}")
  _check_logits_labels(logits_a, labels_a, fn, "logits_a", "labels_a")
  _check_logits_labels(logits_b, labels_b, fn, "logits_b", "labels_b")
  num_classes = logits_a.shape[-1]
  if logits_b.shape[-1] != num_classes:
    raise ValueError(f"{fn}: `logits_a` has {num_classes} channels but `logits_b` has "
                     f"{logits_b.shape[-1]}")
  means_a, present_a = class_mean_logits(logits_a, labels_a, num_classes)
  means_b, present_b = class_mean_logits(logits_b, labels_b, num_classes)
  log_q_a = jax.nn.log_softmax(means_a / temperature, axis=-1)  # [C, C]
  log_q_b = jax.nn.log_softmax(means_b / temperature, axis=-1)
  kl_ab = jnp.sum(jnp.exp(log_q_a) * (log_q_a - log_q_b), axis=-1)  # [C]
  kl_ba = jnp.sum(jnp.exp(log_q_b) * (log_q_b - log_q_a), axis=-1)
  symmetric = kl_ab + kl_ba
  if absent == "uniform":
    return jnp.mean(symmetric).astype(jnp.float32)
  both = (present_a & present_b).astype(jnp.float32)
  return _safe_divide(jnp.sum(both * symmetric), jnp.sum(both)).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# Class-specific affinity (Chen et al.).
# ------------------------------------------------------------------------------------------------


def affinity_matrices(feat_l: jax.Array, feat_k: jax.Array, labels: jax.Array, num_classes: int,
                      *, class_specific: bool = True, eps: float = 1e-8) -> jax.Array:
  """Class-specific channel affinity between two feature maps of one modality.

  For class c the masked features are F^c = F * M^c, with the ground-truth mask M^c resized
  (nearest) to each feature map's spatial size; the masked feat_k is then resized (nearest) to
  feat_l's spatial size. Per sample, a^c_{m,n} = cos(F^c_m(l), F^c_n(k)) / S_c, the cosine taken
  over the spatial positions and S_c the mask area at feat_l's resolution (max(S_c, 1), so an
  absent class gives zeros). The cosine is dot / (max(|u|, eps) max(|v|, eps)). The matrices are
  averaged over the batch. The affinity ignores where a structure lies, so the two modalities
  need not be paired.

  Args:
    feat_l: [B, *spatial_l, M] features of layer l.
    feat_k: [B, *spatial_k, N] features of layer k (sizes may differ from layer l's).
    labels: [B, *spatial_y] integer classes at any resolution.
    num_classes: C.
    class_specific: False gives the plain "affinity" variant: one all-ones mask.
    eps: lower bound of the norms in the cosine.

  Returns:
    [C, M, N] float32, or [1, M, N] when class_specific is False.
  """
  fn = "affinity_matrices"
  if feat_l.ndim < 3 or feat_k.ndim != feat_l.ndim:
    raise ValueError(f"{fn}: `feat_l` and `feat_k` must both be [B, *spatial, channels] with the "
                     f"same number of spatial dims, got {feat_l.shape} and {feat_k.shape}")
  if labels.ndim != feat_l.ndim - 1:
    raise ValueError(f"{fn}: `labels` must be [B, *spatial] with {feat_l.ndim - 2} spatial "
                     f"dim(s), got shape {labels.shape}")
  if not feat_l.shape[0] == feat_k.shape[0] == labels.shape[0]:
    raise ValueError(f"{fn}: batch sizes differ: `feat_l` {feat_l.shape[0]}, `feat_k` "
                     f"{feat_k.shape[0]}, `labels` {labels.shape[0]}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"{fn}: `labels` must be an integer class map, got dtype {labels.dtype}")
  spatial_l = feat_l.shape[1:-1]
  spatial_k = feat_k.shape[1:-1]
  if class_specific:
    masks = _one_hot(labels, num_classes)  # [B, *spatial_y, C]
  else:
    masks = jnp.ones(labels.shape + (1,), jnp.float32)
  mask_l = _resize_nearest(masks, spatial_l)  # [B, *spatial_l, C]
  # Mask feat_k at its own resolution, then bring it to layer l's: nearest resizing commutes
  # with the element-wise product, so resizing the mask and the features separately is the same.
  mask_k = _resize_nearest(_resize_nearest(masks, spatial_k), spatial_l)
  feat_l = feat_l.astype(jnp.float32).reshape(feat_l.shape[0], -1, feat_l.shape[-1])  # [B, P, M]
  feat_k = _resize_nearest(feat_k.astype(jnp.float32), spatial_l)
  feat_k = feat_k.reshape(feat_k.shape[0], -1, feat_k.shape[-1])  # [B, P, N]
  mask_l = mask_l.reshape(mask_l.shape[0], -1, mask_l.shape[-1])  # [B, P, C]
  mask_k = mask_k.reshape(mask_k.shape[0], -1, mask_k.shape[-1])
  # The masks are binary, so |F^c|^2 = sum M^c F^2. Each masked channel is divided by its norm
  # BEFORE the product, so every factor is bounded by 1 and so is the cosine, however small a
  # channel. (Dividing the dot of the raw features by the two norms afterwards returned 1e20..inf
  # under jit(value_and_grad) on dead ReLU channels, the affinity config's NaN on real data;
  # see the test with dead channels in tests/ops/test_losses.py.)
  sq_l = jnp.einsum("bpc,bpm->bcm", mask_l, feat_l * feat_l, precision=_PRECISION)
  sq_k = jnp.einsum("bpc,bpn->bcn", mask_k, feat_k * feat_k, precision=_PRECISION)
  # sqrt(max(s, eps^2)) == max(sqrt(s), eps) without sqrt's infinite slope at 0.
  inv_l = jax.lax.rsqrt(jnp.maximum(sq_l, eps * eps))  # [B, C, M]
  inv_k = jax.lax.rsqrt(jnp.maximum(sq_k, eps * eps))  # [B, C, N]
  unit_l = mask_l[..., :, None] * feat_l[..., None, :] * inv_l[:, None]  # [B, P, C, M]
  unit_k = mask_k[..., :, None] * feat_k[..., None, :] * inv_k[:, None]  # [B, P, C, N]
  cosine = jnp.einsum("bpcm,bpcn->bcmn", unit_l, unit_k, precision=_PRECISION)  # [B, C, M, N]
  area = jnp.maximum(jnp.sum(mask_l, axis=1), 1.0)  # [B, C]
  return jnp.mean(cosine / area[..., None, None], axis=0)


def csa_loss(feats_a: tuple[jax.Array, jax.Array], labels_a: jax.Array,
             feats_b: tuple[jax.Array, jax.Array], labels_b: jax.Array, num_classes: int, *,
             class_specific: bool = True) -> jax.Array:
  """Class-specific affinity loss between two modalities, literally as the paper writes it.

  L = (1 / C) sum_c || (1 / P) sum_{m,n} (A^{c,a} - A^{c,b})_{m,n} ||_2^2 with P = M N. The sum
  inside the norm makes its argument a scalar, whose squared 2-norm is simply its square, so
  entry differences of opposite sign cancel: this compares the mean affinity of each class, not
  the matrices entry by entry.

  Args:
    feats_a: (feat_l, feat_k) of modality a, as in `affinity_matrices`.
    labels_a: [B_a, *spatial] integer classes of modality a.
    feats_b: (feat_l, feat_k) of modality b; channels as a's, batch and spatial sizes free.
    labels_b: [B_b, *spatial] integer classes of modality b.
    num_classes: C.
    class_specific: False: the plain "affinity" variant (C = 1).

  Returns:
    float32 scalar.
  """
  fn = "csa_loss"
  for name, feats in (("feats_a", feats_a), ("feats_b", feats_b)):
    if len(feats) != 2:
      raise ValueError(f"{fn}: `{name}` must be a pair (feat_l, feat_k), got {len(feats)} item(s)")
  channels_a = (feats_a[0].shape[-1], feats_a[1].shape[-1])
  channels_b = (feats_b[0].shape[-1], feats_b[1].shape[-1])
  if channels_a != channels_b:
    raise ValueError(f"{fn}: `feats_a` has (M, N) = {channels_a} channels but `feats_b` has "
                     f"{channels_b}")
  affinity_a = affinity_matrices(*feats_a, labels_a, num_classes, class_specific=class_specific)
  affinity_b = affinity_matrices(*feats_b, labels_b, num_classes, class_specific=class_specific)
  mean_difference = jnp.mean(affinity_a - affinity_b, axis=(1, 2))  # [C]
  return jnp.mean(jnp.square(mean_difference)).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# Regularisers, VAE, reconstruction, LS-GAN.
# ------------------------------------------------------------------------------------------------


def _key_name(key: Any) -> str:
  """One entry of a jax key path as plain text."""
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def l2_weight_decay(tree: Any, *, include: Callable[[str], bool] = lambda path: True) -> jax.Array:
  """0.5 * sum of squares of the selected floating-point leaves (the tf.nn.l2_loss convention).

  Args:
    tree: a pytree of arrays, e.g. a Flax variables dict.
    include: called with each leaf's path as '/'-joined keys (e.g. 'params/conv_0/kernel');
      only leaves for which it returns True count. Integer and boolean leaves never count.

  Returns:
    float32 scalar; 0 for an empty selection.
  """
  total = jnp.zeros((), jnp.float32)
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    leaf = jnp.asarray(leaf)
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      continue
    if include("/".join(_key_name(k) for k in path)):
      total = total + 0.5 * jnp.sum(jnp.square(leaf.astype(jnp.float32)))
  return total


def kl_divergence_gaussian(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """KL(N(mean, exp(logvar)) || N(0, I)), summed per sample then averaged over the batch.

  Per sample -0.5 * sum(1 + logvar - mean^2 - exp(logvar)) over all non-batch axes.

  Args:
    mean: [B, Z] posterior means.
    logvar: [B, Z] posterior log-variances.

  Returns:
    float32 scalar.
  """
  if mean.ndim < 2 or mean.shape != logvar.shape:
    raise ValueError(f"kl_divergence_gaussian: `mean` and `logvar` must share a [B, Z] shape, got "
                     f"{mean.shape} and {logvar.shape}")
  mean = mean.astype(jnp.float32)
  logvar = logvar.astype(jnp.float32)
  per_element = 1.0 + logvar - jnp.square(mean) - jnp.exp(logvar)
  per_sample = -0.5 * jnp.sum(per_element.reshape(mean.shape[0], -1), axis=1)
  return jnp.mean(per_sample)


def l1_loss(x: jax.Array, y: jax.Array, *, sample_weight: jax.Array | None = None) -> jax.Array:
  """Mean absolute difference: per-sample means averaged with the sample weights.

  Args:
    x: [B, ...] array.
    y: same shape as x.
    sample_weight: optional [B] non-negative weights; 0 drops a sample.

  Returns:
    float32 scalar; 0 when the total sample weight is 0.
  """
  if x.ndim < 1 or x.shape != y.shape:
    raise ValueError(f"l1_loss: `x` and `y` must share a [B, ...] shape, got {x.shape} and "
                     f"{y.shape}")
  weights = _sample_weights(sample_weight, x.shape[0], "l1_loss")
  difference = jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))
  per_sample = jnp.mean(difference.reshape(x.shape[0], -1), axis=1)
  return _weighted_mean(per_sample, weights).astype(jnp.float32)


def lsgan_discriminator_loss(real_scores: jax.Array, fake_scores: jax.Array) -> jax.Array:
  """Least-squares discriminator loss 0.5 * (mean((r - 1)^2) + mean(f^2)).

  Targets: real 1, fake 0. The factor 0.5 is Mao et al.'s; it also makes the loss the mean of
  the real and fake mean squared errors, i.e. one 'mse' over a half-real, half-fake batch.

  Args:
    real_scores: discriminator outputs on real inputs, any shape.
    fake_scores: discriminator outputs on generated inputs, any shape.

  Returns:
    float32 scalar.
  """
  real = jnp.asarray(real_scores, jnp.float32)
  fake = jnp.asarray(fake_scores, jnp.float32)
  return 0.5 * (jnp.mean(jnp.square(real - 1.0)) + jnp.mean(jnp.square(fake)))


def lsgan_generator_loss(fake_scores: jax.Array) -> jax.Array:
  """Least-squares generator loss mean((f - 1)^2): the generator wants fakes scored as real.

  A plain mean squared error (Keras' 'mse', which the MMSDNet/DAFNet code trains with), without
  the factor 0.5 of Mao et al.'s generator objective: its gradients are twice theirs.

  Args:
    fake_scores: discriminator outputs on generated inputs, any shape.

  Returns:
    float32 scalar.
  """
  fake = jnp.asarray(fake_scores, jnp.float32)
  return jnp.mean(jnp.square(fake - 1.0))
