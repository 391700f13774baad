"""Segmentation losses: soft Dice, the MMSDNet code's pooled Dice, cross-entropy, the UMMKD code's
clipped class-weighted cross-entropy, and Dice + cross-entropy.

Logits [B, *spatial, C] against integer labels [B, *spatial]; see the package docstring
(`unpaired_seg.ops.losses`) for the conventions.
"""

import jax
import jax.numpy as jnp

from unpaired_seg.ops.losses.common import (check_logits_labels, one_hot, safe_divide,
                                            sample_weights, weighted_mean)


def _spatial_axes(x: jax.Array) -> tuple[int, ...]:
  """The spatial axes of a [B, *spatial, C] array."""
  return tuple(range(1, x.ndim - 1))


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
  check_logits_labels(logits, labels, fn)
  if reduction not in ("batch", "sample"):
    raise ValueError(f"{fn}: `reduction` must be 'batch' or 'sample', got {reduction!r}")
  num_classes = logits.shape[-1]
  first = 0 if include_background else 1
  if num_classes - first < 1:
    raise ValueError(f"{fn}: `logits` has {num_classes} channel(s); without the background "
                     "(include_background=False) no class is left to average")
  weights = sample_weights(sample_weight, logits.shape[0], fn)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  onehot = one_hot(labels, num_classes)
  axes = _spatial_axes(probs)
  # Per sample and class: [B, C].
  intersection = jnp.sum(probs * onehot, axis=axes)
  pred_sum = jnp.sum(probs, axis=axes)
  true_sum = jnp.sum(onehot, axis=axes)
  if reduction == "batch":
    # With all weights 0 every sum is 0, so each Dice is smooth / smooth or 0 / 0, both 1: the
    # loss is 0 without a special case.
    w = weights[:, None]
    dice = safe_divide(2.0 * jnp.sum(w * intersection, 0) + smooth,
                       jnp.sum(w * pred_sum, 0) + jnp.sum(w * true_sum, 0) + smooth, empty=1.0)
    return (1.0 - jnp.mean(dice[first:])).astype(jnp.float32)
  dice = safe_divide(2.0 * intersection + smooth, pred_sum + true_sum + smooth, empty=1.0)
  per_sample = 1.0 - jnp.mean(dice[:, first:], axis=-1)  # [B]
  return weighted_mean(per_sample, weights).astype(jnp.float32)


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
  check_logits_labels(logits, labels, fn)
  num_classes = logits.shape[-1]
  if num_classes < 2:
    raise ValueError(f"{fn}: `logits` needs a background and at least one foreground channel, "
                     f"got {num_classes} channel(s)")
  weights = sample_weights(sample_weight, logits.shape[0], fn)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)[..., 1:]
  onehot = one_hot(labels, num_classes)[..., 1:]
  axes = tuple(range(1, probs.ndim))  # spatial dims and foreground channels together
  intersection = jnp.sum(probs * onehot, axis=axes)  # [B]
  union = jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)
  dice = safe_divide(2.0 * intersection + smooth, union + smooth, empty=1.0)
  return weighted_mean(1.0 - dice, weights).astype(jnp.float32)


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
  check_logits_labels(logits, labels, fn)
  num_classes = logits.shape[-1]
  weights = sample_weights(sample_weight, logits.shape[0], fn)
  if class_weights is None:
    class_weights = jnp.ones((num_classes,), jnp.float32)
  class_weights = jnp.asarray(class_weights, jnp.float32)
  if class_weights.shape != (num_classes,):
    raise ValueError(f"{fn}: `class_weights` must have shape ({num_classes},), got "
                     f"{class_weights.shape}")
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  onehot = one_hot(labels, num_classes)
  ce = -jnp.sum(onehot * log_probs, axis=-1)  # [B, *spatial]
  pixel_weight = jnp.sum(onehot * class_weights, axis=-1)
  pixel_weight = pixel_weight * weights.reshape((-1,) + (1,) * (ce.ndim - 1))
  return safe_divide(jnp.sum(pixel_weight * ce), jnp.sum(pixel_weight)).astype(jnp.float32)


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
  counts = jnp.sum(one_hot(labels.reshape(-1), num_classes), axis=0)  # [C]
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
  check_logits_labels(logits, labels, fn)
  num_classes = logits.shape[-1]
  class_weights = jnp.asarray(class_weights, jnp.float32)
  if class_weights.shape != (num_classes,):
    raise ValueError(f"{fn}: `class_weights` must have shape ({num_classes},), got "
                     f"{class_weights.shape}")
  weights = sample_weights(sample_weight, logits.shape[0], fn)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  onehot = one_hot(labels, num_classes)
  true_prob = jnp.sum(onehot * probs, axis=-1)
  pixel_weight = jnp.sum(onehot * class_weights, axis=-1)
  # Out-of-range labels have weight 0; clipping keeps their log finite.
  ce = -pixel_weight * jnp.log(jnp.clip(true_prob, clip, 1.0))  # [B, *spatial]
  per_sample = jnp.mean(ce.reshape(ce.shape[0], -1), axis=1)
  return weighted_mean(per_sample, weights).astype(jnp.float32)


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
