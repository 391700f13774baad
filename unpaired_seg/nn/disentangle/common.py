"""What the MMSDNet / DAFNet networks share: Keras' initialisers and LeakyReLU slope, the checks of
their inputs and widths, and nearest up-sampling."""

import flax.linen as nn
import jax
import jax.numpy as jnp

# Keras' Glorot uniform is its default kernel initialiser; the authors ask for He normal in the
# U-Net, segmentor, modality encoder and discriminators, and Glorot normal for the decoder output.
# (flax's truncated normals are variance-corrected; Keras 2.1's were not, a small difference.)
GLOROT_UNIFORM = nn.initializers.glorot_uniform()
GLOROT_NORMAL = nn.initializers.glorot_normal()
HE_NORMAL = nn.initializers.he_normal()

# Keras' LeakyReLU default, which the authors' modality encoder and FiLM decoder keep.
KERAS_LEAKY_SLOPE = 0.3


def check_images(caller: str, **arrays: jax.Array) -> None:
  """Each array must be [B, H, W, C]; all must share B, H and W."""
  reference = None
  for name, x in arrays.items():
    if x.ndim != 4:
      raise ValueError(f"{caller}: `{name}` must be [B, H, W, C], got shape {tuple(x.shape)}")
    if reference is None:
      reference = (name, x.shape[:3])
    elif x.shape[:3] != reference[1]:
      raise ValueError(f"{caller}: `{name}` {tuple(x.shape)} and `{reference[0]}` must share "
                       f"batch, height and width {tuple(reference[1])}")


def check_width(caller: str, **widths: int) -> None:
  """Each width must be a positive int (a bool is not one)."""
  for name, value in widths.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{caller}: `{name}` must be a positive int, got {value!r}")


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
  """Nearest-neighbour up-sampling of [B, H, W, C] by an integer factor (Keras UpSampling2D)."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)
