"""Down- and up-sampling written so that XLA compiles them to reshapes, reductions and one matmul.

XLA's CPU backend lowers `reduce_window` (max pooling) and a strided transposed convolution to
generic loops that are several times slower than the same maths as a reshape + reduce, or as a
dense layer followed by depth-to-space; on GPU and TPU the reshaped forms are at least as fast.

  y = max_pool(x, (2, 2))                          # [B, H, W, C] -> [B, H/2, W/2, C]
  y = transposed_conv_stride_equal(x, kernel, bias)  # kernel [2, 2, C_in, C_out] -> [B, 2H, 2W, C_out]

Every function takes channels-last arrays [B, *spatial, C] of any number of spatial axes.
"""

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def max_pool(x: jax.Array, window: Sequence[int]) -> jax.Array:
  """Non-overlapping max pooling (stride = window, 'VALID': a trailing remainder is dropped).

  The same values as `flax.linen.max_pool(x, window, strides=window)`. Its gradient splits
  evenly between tied maxima of a window (XLA's `select_and_scatter` gives it to one of them);
  the two agree wherever a window's maximum is unique, and after a ReLU a tie at zero has no
  gradient to pass on anyway.

  Args:
    x: [B, *spatial, C].
    window: one size per spatial axis.

  Returns:
    [B, *(spatial // window), C].
  """
  window = tuple(int(w) for w in window)
  spatial = x.shape[1:-1]
  if len(window) != len(spatial):
    raise ValueError(f"max_pool: window {window} for {len(spatial)} spatial axes of {x.shape}")
  out = tuple(s // w for s, w in zip(spatial, window))
  if any(o < 1 for o in out):
    raise ValueError(f"max_pool: window {window} is larger than the spatial shape {spatial}")
  if any(o * w != s for o, w, s in zip(out, window, spatial)):
    x = x[(slice(None),) + tuple(slice(0, o * w) for o, w in zip(out, window))]
  split = (x.shape[0],) + sum(((o, w) for o, w in zip(out, window)), ()) + (x.shape[-1],)
  return jnp.max(x.reshape(split), axis=tuple(2 + 2 * i for i in range(len(window))))


def depth_to_space(x: jax.Array, factors: Sequence[int]) -> jax.Array:
  """[B, *spatial, *factors, C] -> [B, *(spatial * factors), C], sub-pixel d of cell i at i*f + d."""
  factors = tuple(int(f) for f in factors)
  n = len(factors)
  spatial = x.shape[1:1 + n]
  if x.shape[1 + n:1 + 2 * n] != factors:
    raise ValueError(f"depth_to_space: expected [B, *spatial, *{factors}, C], got {x.shape}")
  # Interleave each spatial axis with its factor axis: (B, s1, f1, s2, f2, ..., C).
  order = (0,) + sum(((1 + i, 1 + n + i) for i in range(n)), ()) + (1 + 2 * n,)
  x = jnp.transpose(x, order)
  return x.reshape((x.shape[0],) + tuple(s * f for s, f in zip(spatial, factors)) + (x.shape[-1],))


def transposed_conv_stride_equal(x: jax.Array, kernel: jax.Array,
                                 bias: jax.Array | None = None) -> jax.Array:
  """A transposed convolution whose stride equals its kernel size, as one matmul + depth-to-space.

  Computes what `flax.linen.ConvTranspose(features, window, strides=window)` computes with the
  same `kernel` [*window, C_in, C_out] and `bias` [C_out]: every input cell becomes a window of
  output cells, cell d of the window taking `x @ kernel[window - 1 - d]` (flax's transposed
  convolution does not transpose, so its kernel is applied spatially flipped).

  Args:
    x: [B, *spatial, C_in].
    kernel: [*window, C_in, C_out].
    bias: [C_out] or None.

  Returns:
    [B, *(spatial * window), C_out].
  """
  n = kernel.ndim - 2
  window = kernel.shape[:n]
  if x.ndim != n + 2 or x.shape[-1] != kernel.shape[-2]:
    raise ValueError(f"transposed_conv_stride_equal: input {x.shape} does not match kernel "
                     f"{kernel.shape} ([*window, C_in, C_out])")
  flipped = jnp.flip(kernel, axis=tuple(range(n)))
  # [C_in, *window, C_out] as one dense layer's [C_in, prod(window) * C_out].
  dense = jnp.moveaxis(flipped, -2, 0).reshape(kernel.shape[-2], -1)
  y = jnp.dot(x, dense.astype(x.dtype))
  y = y.reshape(x.shape[:-1] + tuple(window) + (kernel.shape[-1],))
  y = depth_to_space(y, window)
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return y
