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

The package: `segmentation` (losses against one modality's labels), `cross_modal` (KD and CSA,
between two modalities), `label_free` (weight decay, KL, L1, LS-GAN) and `common` (the helpers they
share). Import the losses from here: `from unpaired_seg.ops import losses`.

Tests (hand-computed values and slow numpy references):

  python -m pytest -q tests/ops/test_losses.py tests/ops/test_cross_modal_losses.py
"""

from unpaired_seg.ops.losses.cross_modal import (affinity_matrices, class_mean_logits, csa_loss,
                                                 kd_loss)
from unpaired_seg.ops.losses.label_free import (kl_divergence_gaussian, l1_loss, l2_weight_decay,
                                                lsgan_discriminator_loss, lsgan_generator_loss)
from unpaired_seg.ops.losses.segmentation import (batch_class_weights,
                                                  clipped_weighted_cross_entropy,
                                                  cross_entropy_loss, dice_ce_loss,
                                                  pooled_dice_loss, soft_dice_loss)

__all__ = [
    "affinity_matrices", "batch_class_weights", "class_mean_logits",
    "clipped_weighted_cross_entropy", "cross_entropy_loss", "csa_loss", "dice_ce_loss", "kd_loss",
    "kl_divergence_gaussian", "l1_loss", "l2_weight_decay", "lsgan_discriminator_loss",
    "lsgan_generator_loss", "pooled_dice_loss", "soft_dice_loss",
]
