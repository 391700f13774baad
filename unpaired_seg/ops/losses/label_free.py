"""The losses that use no labels: L2 weight decay, the VAE's KL term, L1 reconstruction and the
least-squares GAN terms.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from unpaired_seg.ops.losses.common import sample_weights, weighted_mean


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
  weights = sample_weights(sample_weight, x.shape[0], "l1_loss")
  difference = jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))
  per_sample = jnp.mean(difference.reshape(x.shape[0], -1), axis=1)
  return weighted_mean(per_sample, weights).astype(jnp.float32)


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
