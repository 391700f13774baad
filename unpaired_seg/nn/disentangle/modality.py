"""The modality encoder f_M: a VAE that encodes (s, x) into the modality vector z."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from unpaired_seg.nn.disentangle.common import (GLOROT_UNIFORM, HE_NORMAL, KERAS_LEAKY_SLOPE,
                                                check_images, check_width)


def _valid_size(size: int, kernel: int, stride: int) -> int:
  """Output length of a VALID convolution or pooling."""
  return (size - kernel) // stride + 1


class ModalityEncoder(nn.Module):
  """VAE modality encoder f_M: (s, x) -> z, shared by all modalities.

  concat(s, x) -> four [3x3 conv, stride 2, VALID -> LeakyReLU(0.3)] at `features` x (1, 2, 4, 8)
  -> flatten -> Dense(hidden) -> LeakyReLU(0.3) -> two Dense(z_dim) heads, mean and log-variance.
  The flattened size follows the input: 192 -> 95 -> 47 -> 23 -> 11, 64 -> 31 -> 15 -> 7 -> 3,
  32 -> 15 -> 7 -> 3 -> 1; the smallest input is 31 x 31.

  Attributes:
    z_dim: size of z (authors: 8).
    features: width of the first conv (authors: 16, giving 16, 32, 64, 128).
    hidden: width of the dense layer (authors: 32).
    negative_slope: LeakyReLU slope (Keras' default 0.3, which the authors' encoder keeps).
  """
  z_dim: int = 8
  features: int = 16
  hidden: int = 32
  negative_slope: float = KERAS_LEAKY_SLOPE

  @nn.compact
  def __call__(self, anatomy: jax.Array, image: jax.Array,
               sample: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Encodes (s [B, H, W, A], x [B, H, W, C]) into (z, mean, logvar), each [B, z_dim].

    With `sample=True`, z = mean + exp(0.5 logvar) * eps, eps ~ N(0, I) from the 'sample' rng
    stream (pass `rngs={'sample': key}`); with `sample=False`, z = mean.
    """
    caller = "ModalityEncoder"
    check_images(caller, anatomy=anatomy, image=image)
    check_width(caller, z_dim=self.z_dim, features=self.features, hidden=self.hidden)
    size = list(anatomy.shape[1:3])
    for _ in range(4):
      size = [_valid_size(n, 3, 2) for n in size]
    if min(size) < 1:
      raise ValueError(f"{caller}: four 3x3 stride-2 VALID convolutions need height and width >= "
                       f"31, got {anatomy.shape[1:3]}")
    x = jnp.concatenate([anatomy, image.astype(anatomy.dtype)], axis=-1)
    for i in range(4):
      x = nn.Conv(self.features * 2 ** i, (3, 3), strides=(2, 2), padding="VALID",
                  kernel_init=HE_NORMAL, name=f"conv{i}")(x)
      x = nn.leaky_relu(x, self.negative_slope)
    x = x.reshape(x.shape[0], -1)  # [B, h * w * 8 features]
    x = nn.leaky_relu(nn.Dense(self.hidden, kernel_init=HE_NORMAL, name="dense")(x),
                      self.negative_slope)
    mean = nn.Dense(self.z_dim, kernel_init=GLOROT_UNIFORM, name="mean")(x)
    logvar = nn.Dense(self.z_dim, kernel_init=GLOROT_UNIFORM, name="logvar")(x)
    if not sample:
      return mean, mean, logvar
    eps = jax.random.normal(self.make_rng("sample"), mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps, mean, logvar
