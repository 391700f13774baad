"""Helpers shared by the losses: input checks, sample weights, safe division, one-hot labels.

The conventions they enforce are those of the package docstring (`unpaired_seg.ops.losses`).
"""

import jax
import jax.numpy as jnp

# The losses' matmuls and einsums are reductions of a loss: keep them in full float32 even on
# accelerators whose default matmul precision is lower.
PRECISION = jax.lax.Precision.HIGHEST


def safe_divide(numerator: jax.Array, denominator: jax.Array, *, empty: float = 0.0) -> jax.Array:
  """numerator / denominator, `empty` where the denominator is 0, with finite gradients.

  The inner `where` keeps the untaken branch finite too: a plain `where(d > 0, n / d, 0)` has a
  NaN gradient wherever d == 0.
  """
  nonzero = denominator != 0
  safe = jnp.where(nonzero, denominator, 1.0)
  return jnp.where(nonzero, numerator / safe, empty)


def check_logits_labels(logits: jax.Array, labels: jax.Array, fn: str,
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


def sample_weights(sample_weight: jax.Array | None, batch: int, fn: str) -> jax.Array:
  """[B] float32 sample weights; all ones when None."""
  if sample_weight is None:
    return jnp.ones((batch,), jnp.float32)
  sample_weight = jnp.asarray(sample_weight, jnp.float32)
  if sample_weight.shape != (batch,):
    raise ValueError(f"{fn}: `sample_weight` must have shape ({batch},) (one weight per sample), "
                     f"got {sample_weight.shape}")
  return sample_weight


def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """sum(w * v) / sum(w) over [B] values; 0 when the weights sum to 0."""
  return safe_divide(jnp.sum(weights * values), jnp.sum(weights))


def one_hot(labels: jax.Array, num_classes: int) -> jax.Array:
  """[B, *spatial] int -> [B, *spatial, C] float32."""
  return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
