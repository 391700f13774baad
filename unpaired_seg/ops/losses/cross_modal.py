"""Losses between two unpaired modalities: UMMKD's knowledge distillation and Chen et al.'s
class-specific affinity (CSA).

Both compare class-wise statistics of the two modalities (mean logits, channel affinities within
each ground-truth class), so the two batches need neither the same images nor the same sizes.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unpaired_seg.ops.losses.common import PRECISION, check_logits_labels, one_hot, safe_divide


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
  check_logits_labels(logits, labels, fn)
  if logits.shape[-1] != num_classes:
    raise ValueError(f"{fn}: `logits` has {logits.shape[-1]} channels but `num_classes` is "
                     f"{num_classes}")
  flat_logits = logits.astype(jnp.float32).reshape(-1, num_classes)  # [P, C]
  onehot = one_hot(labels.reshape(-1), num_classes)  # [P, C]
  sums = jnp.einsum("pc,pk->ck", onehot, flat_logits, precision=PRECISION)
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
  check_logits_labels(logits_a, labels_a, fn, "logits_a", "labels_a")
  check_logits_labels(logits_b, labels_b, fn, "logits_b", "labels_b")
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
  return safe_divide(jnp.sum(both * symmetric), jnp.sum(both)).astype(jnp.float32)


# ------------------------------------------------------------------------------------------------
# Class-specific affinity (Chen et al.).
# ------------------------------------------------------------------------------------------------


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
    masks = one_hot(labels, num_classes)  # [B, *spatial_y, C]
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
  sq_l = jnp.einsum("bpc,bpm->bcm", mask_l, feat_l * feat_l, precision=PRECISION)
  sq_k = jnp.einsum("bpc,bpn->bcn", mask_k, feat_k * feat_k, precision=PRECISION)
  # sqrt(max(s, eps^2)) == max(sqrt(s), eps) without sqrt's infinite slope at 0.
  inv_l = jax.lax.rsqrt(jnp.maximum(sq_l, eps * eps))  # [B, C, M]
  inv_k = jax.lax.rsqrt(jnp.maximum(sq_k, eps * eps))  # [B, C, N]
  unit_l = mask_l[..., :, None] * feat_l[..., None, :] * inv_l[:, None]  # [B, P, C, M]
  unit_k = mask_k[..., :, None] * feat_k[..., None, :] * inv_k[:, None]  # [B, P, C, N]
  cosine = jnp.einsum("bpcm,bpcn->bcmn", unit_l, unit_k, precision=PRECISION)  # [B, C, M, N]
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
