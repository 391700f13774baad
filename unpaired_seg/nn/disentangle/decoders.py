"""The decoders g(s, z) that draw the image back: FiLM (the default) and SPADE (the alternative)."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from unpaired_seg.nn.disentangle.common import (GLOROT_NORMAL, GLOROT_UNIFORM, KERAS_LEAKY_SLOPE,
                                                check_images, check_width, upsample_nearest)


# ------------------------------------------------------------------------------------------------
# FiLM decoder.
# ------------------------------------------------------------------------------------------------


class FiLMBlock(nn.Module):
  """a = LReLU(conv3x3(x)); b = LReLU(conv3x3(a) * gamma(z) + beta(z)); out = a + b.

  gamma and beta each come from their own Dense(features) -> LReLU on z.
  """
  features: int = 8
  negative_slope: float = KERAS_LEAKY_SLOPE

  @nn.compact
  def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
    act = lambda v: nn.leaky_relu(v, self.negative_slope)
    a = act(nn.Conv(self.features, (3, 3), kernel_init=GLOROT_UNIFORM, name="conv0")(x))
    b = nn.Conv(self.features, (3, 3), kernel_init=GLOROT_UNIFORM, name="conv1")(a)
    gamma = act(nn.Dense(self.features, kernel_init=GLOROT_UNIFORM, name="gamma")(z))  # [B, F]
    beta = act(nn.Dense(self.features, kernel_init=GLOROT_UNIFORM, name="beta")(z))
    b = act(b * gamma[:, None, None, :] + beta[:, None, None, :])
    return a + b


class FiLMDecoder(nn.Module):
  """FiLM decoder g(s, z) (the default decoder): 3x3 conv -> LReLU, FiLM blocks, 1x1 conv, tanh.

  Attributes:
    features: width of every conv (authors: 8).
    num_blocks: FiLM blocks (authors: 4).
    out_channels: image channels (1).
    negative_slope: LeakyReLU slope (Keras' default 0.3).
  """
  features: int = 8
  num_blocks: int = 4
  out_channels: int = 1
  negative_slope: float = KERAS_LEAKY_SLOPE

  @nn.compact
  def __call__(self, anatomy: jax.Array, z: jax.Array) -> jax.Array:
    """(s [B, H, W, A], z [B, Z]) -> image [B, H, W, out_channels] in [-1, 1]."""
    check_images("FiLMDecoder", anatomy=anatomy)
    check_width("FiLMDecoder", features=self.features, num_blocks=self.num_blocks,
                out_channels=self.out_channels)
    if z.ndim != 2 or z.shape[0] != anatomy.shape[0]:
      raise ValueError(f"FiLMDecoder: `z` must be [B, Z] with B = {anatomy.shape[0]}, got shape "
                       f"{tuple(z.shape)}")
    x = nn.Conv(self.features, (3, 3), kernel_init=GLOROT_UNIFORM, name="conv_in")(anatomy)
    x = nn.leaky_relu(x, self.negative_slope)
    for i in range(self.num_blocks):
      x = FiLMBlock(self.features, self.negative_slope, name=f"film{i}")(x, z)
    x = nn.Conv(self.out_channels, (1, 1), kernel_init=GLOROT_NORMAL, name="conv_out")(x)
    return jnp.tanh(x)


# ------------------------------------------------------------------------------------------------
# SPADE decoder.
# ------------------------------------------------------------------------------------------------


def resize_nearest(x: jax.Array, height: int, width: int) -> jax.Array:
  """Nearest-neighbour resize of [B, H, W, C] to [B, height, width, C], as TF 1's legacy op.

  Output pixel i takes input pixel floor(i * H / height) (no half-pixel centres), which is what
  the authors' `tf.image.resize_nearest_neighbor` does; for an integer down-sampling factor f it
  keeps the top-left pixel of every f x f block.
  """
  rows = (jnp.arange(height) * x.shape[1]) // height
  cols = (jnp.arange(width) * x.shape[2]) // width
  return x[:, rows][:, :, cols]


class SPADE(nn.Module):
  """Spatially-adaptive normalisation: IN(x) * (1 + gamma(s)) + beta(s).

  Instance norm without affine parameters; s resized (nearest) to x's size -> 3x3 conv(hidden) ->
  ReLU -> two 3x3 convs give gamma and beta with x's channels.

  Attributes:
    hidden: width of the shared conv on the anatomy (authors: 128).
    epsilon: instance norm epsilon (keras-contrib's default 1e-3).
  """
  hidden: int = 128
  epsilon: float = 1e-3

  @nn.compact
  def __call__(self, x: jax.Array, anatomy: jax.Array) -> jax.Array:
    """x [B, h, w, F], s [B, H, W, A] -> [B, h, w, F]."""
    mean = jnp.mean(x, axis=(1, 2), keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
    normalised = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    s = resize_nearest(anatomy, x.shape[1], x.shape[2])
    s = nn.relu(nn.Conv(self.hidden, (3, 3), kernel_init=GLOROT_UNIFORM, name="shared")(s))
    gamma = nn.Conv(x.shape[-1], (3, 3), kernel_init=GLOROT_UNIFORM, name="gamma")(s)
    beta = nn.Conv(x.shape[-1], (3, 3), kernel_init=GLOROT_UNIFORM, name="beta")(s)
    return normalised * (1.0 + gamma) + beta


class SPADEBlock(nn.Module):
  """Residual SPADE block.

  SPADE -> LReLU(0.2) -> 3x3 conv(min(fin, fout)) -> SPADE -> LReLU(0.2) -> 3x3 conv(fout), plus a
  shortcut: the input itself, or SPADE -> 1x1 conv (no bias) when fin != fout.
  """
  features: int
  hidden: int = 128
  negative_slope: float = 0.2

  @nn.compact
  def __call__(self, x: jax.Array, anatomy: jax.Array) -> jax.Array:
    fin, fout = x.shape[-1], self.features
    act = lambda v: nn.leaky_relu(v, self.negative_slope)
    y = act(SPADE(self.hidden, name="spade0")(x, anatomy))
    y = nn.Conv(min(fin, fout), (3, 3), kernel_init=GLOROT_UNIFORM, name="conv0")(y)
    y = act(SPADE(self.hidden, name="spade1")(y, anatomy))
    y = nn.Conv(fout, (3, 3), kernel_init=GLOROT_UNIFORM, name="conv1")(y)
    shortcut = x
    if fin != fout:
      shortcut = SPADE(self.hidden, name="spade_shortcut")(x, anatomy)
      shortcut = nn.Conv(fout, (1, 1), use_bias=False, kernel_init=GLOROT_UNIFORM,
                         name="conv_shortcut")(shortcut)
    return shortcut + y


class SPADEDecoder(nn.Module):
  """SPADE decoder g(s, z) (the alternative decoder).

  Dense(z) -> [B, H / 2^n, W / 2^n, 8 f], then n + 1 residual SPADE blocks with a nearest x2
  up-sampling between consecutive blocks (n = `num_upsamples`), 1x1 conv, tanh. Block i has
  f * 2^min(3, n - i) channels: with the authors' f = 16, n = 5 that is 128, 128, 128, 64, 32, 16,
  and a 64 x 64 image starts at 2 x 2, a 192 x 192 one at 6 x 6. H and W must be divisible by 2^n
  (32 by default) and the start map must have at least 2 positions: a 1 x 1 map (32 x 32 images
  with n = 5) is zeroed by the first instance norm and z would be ignored. Use a smaller
  `num_upsamples` for such sizes (n = 4 for 32 x 32).

  Attributes:
    features: width of the last block, f (authors: 16).
    hidden: width of the SPADE ops' anatomy conv (authors: 128).
    num_upsamples: n, the number of x2 up-samplings (authors: 5).
    out_channels: image channels (1).
    negative_slope: LeakyReLU slope in the blocks (0.2).
  """
  features: int = 16
  hidden: int = 128
  num_upsamples: int = 5
  out_channels: int = 1
  negative_slope: float = 0.2

  def width(self, block: int) -> int:
    return self.features * 2 ** min(3, self.num_upsamples - block)

  @nn.compact
  def __call__(self, anatomy: jax.Array, z: jax.Array) -> jax.Array:
    """(s [B, H, W, A], z [B, Z]) -> image [B, H, W, out_channels] in [-1, 1]."""
    caller = "SPADEDecoder"
    check_images(caller, anatomy=anatomy)
    check_width(caller, features=self.features, hidden=self.hidden,
                out_channels=self.out_channels)
    if not isinstance(self.num_upsamples, int) or self.num_upsamples < 0:
      raise ValueError(f"{caller}: `num_upsamples` must be an int >= 0, got {self.num_upsamples!r}")
    if z.ndim != 2 or z.shape[0] != anatomy.shape[0]:
      raise ValueError(f"{caller}: `z` must be [B, Z] with B = {anatomy.shape[0]}, got shape "
                       f"{tuple(z.shape)}")
    factor = 2 ** self.num_upsamples
    height, width = anatomy.shape[1:3]
    if height % factor or width % factor:
      raise ValueError(f"{caller}: {self.num_upsamples} up-samplings need height and width "
                       f"divisible by {factor}, got {(height, width)}; lower `num_upsamples`")
    h, w, f = height // factor, width // factor, self.features * 8
    if h * w < 2:
      # Instance norm of a single position is 0: the first block would erase z altogether.
      raise ValueError(f"{caller}: {self.num_upsamples} up-samplings leave a 1 x 1 start map for a "
                       f"{height} x {width} image, which the first instance norm zeroes (z would "
                       "be ignored); lower `num_upsamples`")
    x = nn.Dense(h * w * f, kernel_init=GLOROT_UNIFORM, name="project")(z)
    x = x.reshape(z.shape[0], h, w, f)  # [B, H / 2^n, W / 2^n, 8 f]
    for i in range(self.num_upsamples + 1):
      if i:
        x = upsample_nearest(x)
      x = SPADEBlock(self.width(i), self.hidden, self.negative_slope, name=f"block{i}")(x, anatomy)
    x = nn.Conv(self.out_channels, (1, 1), kernel_init=GLOROT_NORMAL, name="conv_out")(x)
    return jnp.tanh(x)
