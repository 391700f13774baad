"""The pair weighting of the automated pairing: how much each candidate pair counts."""

import flax.linen as nn
import jax

from unpaired_seg.nn.disentangle.common import GLOROT_UNIFORM, check_width


class PairWeighting(nn.Module):
  """Weights of k candidate pairs: Dense(hidden) -> ReLU -> Dense(k) -> softmax over the k.

  The scores are Dice(s_target, deformed candidate anatomy) per sample
  (`unpaired_seg.ops.similarity.soft_dice_per_sample`), stacked to [B, k].

  Attributes:
    hidden: width of the hidden layer (authors: 5).
  """
  hidden: int = 5

  @nn.compact
  def __call__(self, scores: jax.Array) -> jax.Array:
    """[B, k] scores -> [B, k] weights, positive, summing to 1 per sample."""
    if scores.ndim != 2 or scores.shape[1] < 1:
      raise ValueError(f"PairWeighting: `scores` must be [B, k], got shape {tuple(scores.shape)}")
    check_width("PairWeighting", hidden=self.hidden)
    x = nn.relu(nn.Dense(self.hidden, kernel_init=GLOROT_UNIFORM, name="hidden")(scores))
    x = nn.Dense(scores.shape[1], kernel_init=GLOROT_UNIFORM, name="logits")(x)
    return jax.nn.softmax(x, axis=-1)
