"""MMSDNet/DAFNet's loss terms as pure jnp functions (no Flax), and the batch-stacking helper.

The generator's forward pass (`generator_loss.py`) computes the networks' outputs; these turn them
into the terms it weighs. N slices of a modality, k candidates each, K control points.

  python -m pytest -q tests/methods/test_mmsdnet.py -k "term or warp"
"""

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from unpaired_seg.ops import losses, similarity

GENERATOR_TERMS = ("kl", "sup", "adv_mask", "rec", "adv_image", "z_rec")


class Stack:
  """Arrays concatenated along the batch axis, and the way to split a result of the same rows."""

  def __init__(self, parts: Sequence[jax.Array]):
    self.parts = list(parts)
    self.value = jnp.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]

  def split(self, stacked: jax.Array) -> list[jax.Array]:
    sizes = [p.shape[0] for p in self.parts]
    bounds = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
    return jnp.split(stacked, bounds)


def straight_through_warp(moving: jax.Array, warped: jax.Array) -> jax.Array:
  """`warped` forward; backward, the gradient goes to `moving` as if the warp were the identity.

  Nothing reaches the transformer or its inputs through the result, and the partner's encoder
  learns in its own image's frame: it cannot drift and leave the warp to make up for it.
  """
  return moving + jax.lax.stop_gradient(warped - moving)


def supervised(logits: jax.Array, labels: jax.Array, labelled: jax.Array, mode: str) -> jax.Array:
  """The supervised term of [N, H, W, K] logits, labels [N, H, W] weighted by `labelled` [N]:
  per-class Dice + CE ('paper') or the authors' code's pooled foreground Dice + CE ('code')."""
  if mode == "code":
    return (losses.pooled_dice_loss(logits, labels, sample_weight=labelled)
            + losses.cross_entropy_loss(logits, labels, sample_weight=labelled))
  return losses.dice_ce_loss(logits, labels, sample_weight=labelled)


def supervised_per_sample(logits: jax.Array, labels: jax.Array, mode: str) -> jax.Array:
  """[N, H, W, K] logits, [N, H, W] labels -> [N] supervised term of each sample alone."""
  def one(lg, lb):
    lg, lb = lg[None], lb[None]
    if mode == "code":
      return losses.pooled_dice_loss(lg, lb) + losses.cross_entropy_loss(lg, lb)
    return losses.dice_ce_loss(lg, lb)
  return jax.vmap(one)(logits, labels)


def candidate_supervised(per_sample: jax.Array, labelled: jax.Array,
                         pair_weights: jax.Array) -> jax.Array:
  """Candidates' [N, k] supervised terms weighted by the pair weights [N, k], over the labelled
  slices ([N] 0/1): the sum over a slice's candidates, the mean over labelled slices."""
  norm = jnp.maximum(jnp.sum(labelled), 1.0)
  return jnp.sum(labelled[:, None] * pair_weights * per_sample) / norm


def candidate_reconstruction(decoded: jax.Array, images: jax.Array,
                             pair_weights: jax.Array) -> jax.Array:
  """L1 of [N k, H, W, C] reconstructions to their slices' images (repeated k times), each
  slice's k candidates weighted by [N, k] pair weights and summed, the mean over slices."""
  n, k = pair_weights.shape
  per_rec = jnp.mean(jnp.abs(decoded - images).reshape(n, k, -1), axis=-1)
  return jnp.mean(jnp.sum(pair_weights * per_rec, axis=1))


def z_reconstruction(z_back: jax.Array, z_prior: jax.Array) -> jax.Array:
  """L1 between prior samples z [N, Z] and the means re-encoded from their decoded images."""
  return jnp.mean(jnp.abs(z_back - z_prior))


def weighted_sum(terms: Mapping[str, jax.Array], weights: Mapping[str, float]) -> jax.Array:
  """w_kl KL + w_sup sup + w_adv_mask adv_M + w_rec rec + w_adv_image adv_I + w_z_rec z_rec."""
  total = weights["kl"] * terms["kl"]
  for name in GENERATOR_TERMS[1:]:
    total = total + weights[name] * terms[name]
  return total


def anatomy_alignment(fixed: jax.Array, moved: jax.Array) -> jax.Array:
  """1 - soft Dice (pooled over channels, per sample, averaged) of anatomies [N, H, W, A]."""
  return 1.0 - jnp.mean(similarity.soft_dice_per_sample(fixed, moved))


def mask_alignment(moved: jax.Array, target: jax.Array) -> jax.Array:
  """1 - soft Dice per organ and sample, averaged, of foreground masks [N, H, W, K - 1]."""
  return 1.0 - jnp.mean(similarity.soft_dice_per_class(moved, target))


def mask_targets(labels: jax.Array, labelled: jax.Array, own_probs: jax.Array, num_classes: int,
                 k: int) -> jax.Array:
  """A slice's organ masks [N k, H, W, K - 1] (each repeated for its k candidates): its one-hot
  label [N, H, W] when labelled ([N] > 0), else the segmentor's softmax `own_probs`."""
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  mask = jnp.where(labelled[:, None, None, None] > 0, one_hot, own_probs)
  return jnp.repeat(mask[..., 1:], k, axis=0)


def mean_offset(displacements: Sequence[jax.Array], active: jax.Array | None = None) -> jax.Array:
  """The mean square of each direction's control-point offsets [N k, K, 2] averaged over its
  pairs; 0 while `active` is False. Independent pairs' misalignments average out: what is left
  is the warp every pair shares."""
  fields = [jnp.mean(d, axis=0) for d in displacements]                  # [K, 2] per direction
  loss = jnp.mean(jnp.stack([jnp.square(f) for f in fields]))
  return loss if active is None else jnp.where(active, loss, 0.0)


def mask_discriminator(real: jax.Array, fake: jax.Array, real_weight: jax.Array) -> jax.Array:
  """LS-GAN loss of the mask discriminator's [N, 1] scores: real ones weighted by [N] weights
  (unlabelled slices have no real mask) toward 1, fake ones toward 0."""
  real_term = jnp.sum(real_weight * jnp.square(real[:, 0] - 1.0)) / jnp.maximum(
      jnp.sum(real_weight), 1.0)
  return 0.5 * (real_term + jnp.mean(jnp.square(fake)))


def real_masks(batch: Mapping, modalities: Sequence[str], num_classes: int):
  """One-hot labels of every modality's slices [N, H, W, K] and their `labelled` weights [N]."""
  masks = jnp.concatenate([jax.nn.one_hot(batch[m]["label"], num_classes) for m in modalities])
  weight = jnp.concatenate([batch[m]["labelled"].astype(jnp.float32) for m in modalities])
  return masks, weight
