"""Weight averages kept beside the raw weights: MMSDNet's SWA and the supervised methods' EMA.

Pure jnp (no Flax), leaf by leaf over any pytree:
  swa_update(average, value, count, active)   the running mean of the values from a start on,
                                              a_n = a_{n-1} + (v - a_{n-1}) / n
  ema_weight(decay, n), ema_move(e, raw, w)   the bias-corrected exponential moving average,
                                              e_n = (1 - w_n) e_{n-1} + w_n raw,
                                              w_n = (1 - decay) / (1 - decay**n)

  python -m pytest -q tests/methods/test_averaging.py
"""

import jax
import jax.numpy as jnp


def swa_update(average, value, count: jax.Array, active: jax.Array):
  """One step of the running mean: (average, count) -> (new average, new count).

  While not `active` the average tracks `value` and the count stays 0; from the first active step
  on, average_n = average_{n-1} + (value - average_{n-1}) / n, the mean of the n values so far.
  """
  new_count = jnp.where(active, count + 1, 0)
  scale = 1.0 / jnp.maximum(new_count, 1).astype(jnp.float32)

  def leaf(a, v):
    mean = a + (v - a) * scale.astype(a.dtype)
    return jnp.where(active, mean, v)
  return jax.tree.map(leaf, average, value), new_count


def ema_weight(decay: jax.Array, n: jax.Array) -> jax.Array:
  """w_n = (1 - d) / (1 - d**n), the weight of the n-th value (n >= 1) in the bias-corrected EMA.

  w_1 = 1: the first average is the first value, with no zero start to correct later; the stored
  average after n values is sum_i d**(n-i) v_i / sum_i d**(n-i). `decay` is float32, so that w_1
  is exactly 1 (a float64 1 - d over a float32 one is not).
  """
  return (1 - decay) / (1 - jnp.power(decay, n.astype(jnp.float32)))


def ema_move(average: jax.Array, raw: jax.Array, weight: jax.Array) -> jax.Array:
  """One leaf's step of the EMA: (1 - w) average + w raw."""
  return (1 - weight) * average + weight * raw


def ema_mover(decay: jax.Array, n: jax.Array):
  """The leaf function (average, raw) -> moved average of the n-th update."""
  weight = ema_weight(decay, n)
  return lambda average, raw: ema_move(average, raw, weight)
