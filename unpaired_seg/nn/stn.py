"""The MMSDNet/DAFNet spatial transformer (align) and max fusion (fuse) of anatomy factors.

A localisation net reads the moving and the fixed anatomy factors and predicts unbounded offsets of
a regular 5 x 5 control grid on [0, 1]^2; a thin-plate spline through (grid, grid + offsets) warps
the moving factor onto the fixed one (`unpaired_seg.ops.tps.thin_plate_spline`, bilinear). The last
layer starts at zero, so the untrained transformer is exactly the identity. Fusion is the
element-wise maximum of any number of factors.

  stn = SpatialTransformer()
  params = stn.init(rng, s_moving, s_fixed)                   # s: [B, H, W, 8], H, W >= 32
  warped, displacements = stn.apply(params, s_moving, s_fixed)  # [B, H, W, 8], [B, 25, 2]
  fused = max_fusion(s_fixed, warped)

  python -m pytest -q tests/nn/test_stn.py
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from unpaired_seg.ops import resample, tps

# Keras' default kernel initialiser, which the authors' localisation net keeps.
_glorot_uniform = nn.initializers.glorot_uniform()


def _valid_size(size: int, kernel: int, stride: int) -> int:
  """Output length of a VALID convolution or pooling."""
  return (size - kernel) // stride + 1


def localisation_output_size(size: int) -> int:
  """Spatial size after the localisation net's convs and pools (32 -> 1, 64 -> 9, 192 -> 41)."""
  size = _valid_size(size, 5, 1)  # conv 5x5
  size = _valid_size(size, 2, 2)  # max-pool 2
  size = _valid_size(size, 5, 1)
  size = _valid_size(size, 2, 2)
  return _valid_size(size, 5, 1)


class LocalisationNet(nn.Module):
  """Control-point offsets from concat(moving s, fixed s).

  Three [5x5 conv, VALID -> LeakyReLU(0.3)] with a 2x2 max-pool after the first two, flatten,
  Dense(hidden) tanh, Dense(2 K) with kernel AND bias zero (module `offsets`), reshaped to
  [B, K, 2] (row, col) offsets. Height and width must be at least 32 (32 leaves 1 x 1 after the
  last conv, 64 leaves 9 x 9).

  Attributes:
    features: width of the convs (authors: 20).
    hidden: width of the tanh layer (authors: 100).
    grid_size: control points per side, K = grid_size^2 (authors: 5).
    negative_slope: LeakyReLU slope (Keras' default 0.3).
  """
  features: int = 20
  hidden: int = 100
  grid_size: int = 5
  negative_slope: float = 0.3

  @nn.compact
  def __call__(self, moving: jax.Array, fixed: jax.Array) -> jax.Array:
    """(moving [B, H, W, C], fixed [B, H, W, C']) -> offsets [B, grid_size^2, 2]."""
    _check_factors("LocalisationNet", moving, fixed)
    if min(localisation_output_size(n) for n in moving.shape[1:3]) < 1:
      raise ValueError(f"LocalisationNet: three 5x5 VALID convolutions and two 2x2 poolings need "
                       f"height and width >= 32, got {moving.shape[1:3]}")
    num_points = self.grid_size ** 2
    x = jnp.concatenate([moving, fixed.astype(moving.dtype)], axis=-1)
    for i in range(3):
      x = nn.Conv(self.features, (5, 5), padding="VALID", kernel_init=_glorot_uniform,
                  name=f"conv{i}")(x)
      x = nn.leaky_relu(x, self.negative_slope)
      if i < 2:
        x = resample.max_pool(x, (2, 2))
    x = x.reshape(x.shape[0], -1)  # [B, h * w * features]
    x = jnp.tanh(nn.Dense(self.hidden, kernel_init=_glorot_uniform, name="hidden")(x))
    offsets = nn.Dense(2 * num_points, kernel_init=nn.initializers.zeros,
                       bias_init=nn.initializers.zeros, name="offsets")(x)
    # Consecutive pairs are (row, col) of control point k (row-major over the grid).
    return offsets.reshape(x.shape[0], num_points, 2)


class SpatialTransformer(nn.Module):
  """Thin-plate-spline spatial transformer: warps the moving factor onto the fixed one.

  Attributes:
    features: localisation net conv width (authors: 20).
    hidden: localisation net tanh width (authors: 100).
    grid_size: control points per side (authors: 5).
    negative_slope: LeakyReLU slope of the localisation net (0.3).
  """
  features: int = 20
  hidden: int = 100
  grid_size: int = 5
  negative_slope: float = 0.3

  @nn.compact
  def __call__(self, moving: jax.Array, fixed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Returns (warped moving factor [B, H, W, C], displacements [B, grid_size^2, 2]).

    Displacements are (row, col) offsets of the regular control grid in normalised [0, 1] units;
    output pixel p samples the moving factor (bilinearly) at the spline's image of p.
    """
    displacements = LocalisationNet(self.features, self.hidden, self.grid_size,
                                    self.negative_slope, name="localisation")(moving, fixed)
    grid = tps.regular_control_grid(self.grid_size)
    warped = tps.thin_plate_spline(moving, displacements.astype(moving.dtype), grid)
    return warped, displacements


def _check_factors(caller: str, moving: jax.Array, fixed: jax.Array) -> None:
  for name, x in (("moving", moving), ("fixed", fixed)):
    if x.ndim != 4:
      raise ValueError(f"{caller}: `{name}` must be [B, H, W, C], got shape {tuple(x.shape)}")
  if moving.shape[:3] != fixed.shape[:3]:
    raise ValueError(f"{caller}: `moving` {tuple(moving.shape)} and `fixed` {tuple(fixed.shape)} "
                     "must share batch, height and width")


def max_fusion(*factors: jax.Array) -> jax.Array:
  """Element-wise maximum of any number of same-shape factors (one input is returned as is).

  Invariant to the order and the number of inputs, so the same model fuses two modalities, more,
  or runs on one at inference. The gradient goes to the largest input; tied inputs (everywhere in
  binary factors) share it equally, so the gradient too is symmetric in the inputs.

  Args:
    *factors: one or more arrays of one shape, e.g. [B, H, W, C] anatomy factors.

  Returns:
    Their element-wise maximum, same shape.
  """
  if not factors:
    raise ValueError("max_fusion: needs at least one factor")
  shape = jnp.shape(factors[0])
  for i, f in enumerate(factors):
    if jnp.shape(f) != shape:
      raise ValueError(f"max_fusion: factor {i} has shape {jnp.shape(f)}, factor 0 has {shape}")
  if len(factors) == 1:
    return jnp.asarray(factors[0])
  # One reduction over a stack (not a chain of pairwise maxima) splits a tie's gradient evenly.
  return jnp.max(jnp.stack(factors, axis=0), axis=0)
