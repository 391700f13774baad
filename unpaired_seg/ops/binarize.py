"""Straight-through binarisation of soft anatomy factors, in pure jax.numpy (no Flax).

The MMSDNet/DAFNet anatomy encoder ends in a softmax over its anatomy channels and makes the
result binary. The forward pass is exactly 0/1; the backward pass treats the binarisation as the
identity (a straight-through estimator), so the encoder still learns.

Two rules, both offered:

  * `straight_through_round` (the authors' code): each channel is rounded on its own. A pixel whose
    probabilities are all < 0.5 becomes all zero; it is not one-hot.
  * `straight_through_onehot_argmax` (the paper): one-hot of the arg-max channel; exactly one 1
    per pixel.

Both are written `hard + (p - stop_gradient(p))`: the forward value is `hard` exactly, for any input
(the more common `p + stop_gradient(hard - p)` loses the 1 to rounding when |p| is large, e.g. a
score of 1e8), and the gradient of the output with respect to `p` is the identity.

  python -m pytest -q tests/ops/test_binarize.py
"""

import jax
import jax.numpy as jnp

BINARIZE_MODES = ("onehot_argmax", "round")


def _straight_through(hard: jax.Array, soft: jax.Array) -> jax.Array:
  """`hard` in the forward pass, the gradient of `soft` in the backward pass."""
  return hard + (soft - jax.lax.stop_gradient(soft))


def straight_through_round(p: jax.Array) -> jax.Array:
  """Per-channel rounding with an identity gradient (the authors' code).

  Rounding is half-to-even, as numpy's (the authors' `np.round`): exactly 0.5 becomes 0.

  Args:
    p: probabilities in [0, 1], any shape, floating point.

  Returns:
    round(p) in the forward pass (0 or 1 for p in [0, 1]), same shape and dtype;
    d output / d p = identity.
  """
  p = jnp.asarray(p)
  if not jnp.issubdtype(p.dtype, jnp.floating):
    raise ValueError(f"straight_through_round: `p` must be floating point, got dtype {p.dtype}")
  return _straight_through(jnp.round(p), p)


def straight_through_onehot_argmax(p: jax.Array, axis: int = -1) -> jax.Array:
  """One-hot of the arg-max over `axis` with an identity gradient (the paper).

  Ties go to the first channel (as `jnp.argmax`), so every pixel has exactly one 1.

  Args:
    p: scores or probabilities, e.g. [B, H, W, C], floating point, at least one dimension.
    axis: the channel axis.

  Returns:
    one_hot(argmax(p, axis)) in the forward pass, same shape and dtype; d output / d p = identity.
  """
  p = jnp.asarray(p)
  if p.ndim < 1:
    raise ValueError("straight_through_onehot_argmax: `p` needs a channel axis, got a scalar")
  if not jnp.issubdtype(p.dtype, jnp.floating):
    raise ValueError(
        f"straight_through_onehot_argmax: `p` must be floating point, got dtype {p.dtype}")
  if not -p.ndim <= axis < p.ndim:
    raise ValueError(
        f"straight_through_onehot_argmax: `axis`={axis} is out of range for shape {p.shape}")
  hard = jax.nn.one_hot(jnp.argmax(p, axis=axis), p.shape[axis], dtype=p.dtype, axis=axis)
  return _straight_through(hard, p)


def binarize(p: jax.Array, mode: str) -> jax.Array:
  """Straight-through binarisation of channels-last probabilities by name.

  Args:
    p: [..., C] probabilities.
    mode: 'onehot_argmax' (paper) or 'round' (the authors' code).

  Returns:
    The binary factor, same shape and dtype as `p`.
  """
  if mode == "onehot_argmax":
    return straight_through_onehot_argmax(p, axis=-1)
  if mode == "round":
    return straight_through_round(p)
  raise ValueError(f"binarize: `mode` must be one of {BINARIZE_MODES}, got {mode!r}")
