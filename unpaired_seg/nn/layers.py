"""Layers whose variables are those of their flax.linen counterparts, with faster lowerings.

`UpConv` has the parameters of `nn.ConvTranspose(features, window, strides=window)` (same names,
shapes and initialisers, so checkpoints and seeds carry over) and computes the same function as
one matmul followed by depth-to-space (`ops.resample`); XLA's CPU backend runs the strided
transposed convolution several times slower.

  up = UpConv(32, (2, 2), name="up")     # [B, H, W, C] -> [B, 2H, 2W, 32]
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unpaired_seg.ops import resample


class UpConv(nn.Module):
  """Up-sampling by a transposed convolution whose stride is its kernel size.

  Attributes:
    features: output channels.
    window: kernel size = stride, one per spatial axis.
    use_bias: add a bias (flax's default: True).
    kernel_init, bias_init: as `nn.ConvTranspose`'s defaults.
  """
  features: int
  window: Sequence[int]
  use_bias: bool = True
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  bias_init: nn.initializers.Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    window = tuple(int(w) for w in self.window)
    if x.ndim != len(window) + 2:
      raise ValueError(f"UpConv: input {x.shape} needs {len(window)} spatial axes")
    kernel = self.param("kernel", self.kernel_init, window + (x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32) \
        if self.use_bias else None
    return resample.transposed_conv_stride_equal(x, kernel.astype(x.dtype), bias)
