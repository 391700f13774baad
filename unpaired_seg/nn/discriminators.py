"""LS-GAN discriminators of MMSDNet/DAFNet: spectral normalisation or the authors' soft penalty.

  4x4 conv f, stride 2, VALID -> LReLU(0.2); 4x4 convs 2f, 4f, 8f with strides 2, 2, 1, each
  LReLU(0.2); flatten -> Dense(1), linear: one score per sample, not a patch map.

The mask discriminator reads a mask without its background channel (class 0 in our convention);
the image discriminator reads an image. Spectral handling, attribute `spectral`:

  * 'paper' (default): spectral normalisation (Miyato et al.) of every layer, W_sn = W / sigma(W),
    sigma from power iteration on the kernel reshaped to [kh * kw * cin, cout]. The iteration
    vector u is state in collection 'spectral' and advances (one step per call by default) only
    when that collection is mutable: `apply(..., mutable=['spectral'])` in the update step.
  * 'code' (the authors' code): plain layers; each of the three block convs sows the soft penalty
    10 * mean|stop_gradient(W / sigma) - W| (sigma from 3 power iterations) into collection
    'penalties'. Add `collected_penalty(updates)` to the discriminator loss. The authors' graph
    starts every step from the same random u; here u is kept in 'spectral' and advances when
    mutable, which only sharpens sigma.
  * 'none': plain layers.

  disc = Discriminator(features=64, exclude_background=True)          # the mask discriminator
  variables = disc.init(rng, masks)                                   # {'params', 'spectral'}
  scores, updates = disc.apply(variables, masks, mutable=['spectral'])  # [B, 1]

  python -m pytest -q tests/nn/test_discriminators.py
"""

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

SPECTRAL_COLLECTION = "spectral"
PENALTY_COLLECTION = "penalties"
SPECTRAL_MODES = ("paper", "code", "none")

_he_normal = nn.initializers.he_normal()
_glorot_uniform = nn.initializers.glorot_uniform()


# ------------------------------------------------------------------------------------------------
# Power iteration and the soft penalty (pure jax.numpy).
# ------------------------------------------------------------------------------------------------


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x * jax.lax.rsqrt(jnp.sum(x * x) + eps)


def kernel_matrix(kernel: jax.Array) -> jax.Array:
  """A dense [in, out] or conv [kh, kw, cin, cout] kernel as the matrix [kh * kw * cin, cout]."""
  if kernel.ndim < 2:
    raise ValueError(f"kernel_matrix: `kernel` needs at least 2 dims, got shape {kernel.shape}")
  return kernel.reshape(-1, kernel.shape[-1])


def power_iteration(matrix: jax.Array, u: jax.Array,
                    steps: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Estimates the largest singular value of `matrix` by power iteration.

  Each step: v = normalise(M u), u = normalise(M^T v). u and v are constants for the gradient
  (stop_gradient); sigma = v^T M u is differentiable in M, as in Miyato et al.

  Args:
    matrix: [m, n].
    u: [n] start vector (any non-zero scale).
    steps: iterations, >= 1.

  Returns:
    (u [n], v [m], sigma scalar). sigma <= the largest singular value, and reaches it as the
    iteration converges.
  """
  if matrix.ndim != 2 or u.shape != (matrix.shape[1],):
    raise ValueError(f"power_iteration: `matrix` must be [m, n] and `u` [n], got {matrix.shape} "
                     f"and {u.shape}")
  if not isinstance(steps, int) or steps < 1:
    raise ValueError(f"power_iteration: `steps` must be an int >= 1, got {steps!r}")
  constant = jax.lax.stop_gradient(matrix)
  u = u.astype(matrix.dtype)
  for _ in range(steps):
    v = _l2_normalize(constant @ u)
    u = _l2_normalize(constant.T @ v)
  u = jax.lax.stop_gradient(u)
  v = jax.lax.stop_gradient(v)
  return u, v, v @ matrix @ u


def soft_spectral_penalty(kernel: jax.Array, u: jax.Array, *, iterations: int = 3,
                          weight: float = 10.0) -> tuple[jax.Array, jax.Array]:
  """The authors' soft spectral penalty of one kernel: weight * mean|stop_grad(W / sigma) - W|.

  Pulls W towards its spectrally normalised self without normalising the forward pass; the
  gradient only flows through the second W.

  Args:
    kernel: [in, out] or [kh, kw, cin, cout].
    u: [out] power-iteration vector.
    iterations: power-iteration steps for sigma (authors: 3).
    weight: the factor (authors: 10).

  Returns:
    (penalty scalar, the advanced u [out]).
  """
  matrix = kernel_matrix(kernel)
  u, _, sigma = power_iteration(matrix, u, iterations)
  target = jax.lax.stop_gradient(matrix / sigma)
  return weight * jnp.mean(jnp.abs(target - matrix)), u


def collected_penalty(updates: Mapping[str, Any]) -> jax.Array:
  """Sum of every penalty sown into 'penalties' (0 when there is none).

  Args:
    updates: the mutable collections returned by `apply(..., mutable=['penalties', ...])`.
  """
  leaves = jax.tree.leaves(updates.get(PENALTY_COLLECTION, {}))
  return sum((jnp.sum(leaf) for leaf in leaves), jnp.zeros((), jnp.float32))


# ------------------------------------------------------------------------------------------------
# Layers.
# ------------------------------------------------------------------------------------------------


def _spectral_kernel(module: nn.Module, kernel: jax.Array, mode: str, power_iterations: int,
                     penalty_iterations: int, penalty_weight: float) -> jax.Array:
  """The kernel a layer uses in its forward pass, with its 'spectral' state and penalty."""
  if mode not in SPECTRAL_MODES:
    raise ValueError(f"{type(module).__name__}: `mode` must be one of {SPECTRAL_MODES}, got "
                     f"{mode!r}")
  if mode == "none":
    return kernel
  u_var = module.variable(SPECTRAL_COLLECTION, "u", lambda: jax.random.normal(
      module.make_rng("params"), (kernel.shape[-1],), kernel.dtype))
  update = module.is_mutable_collection(SPECTRAL_COLLECTION) and not module.is_initializing()
  if mode == "paper":
    u, _, sigma = power_iteration(kernel_matrix(kernel), u_var.value, power_iterations)
    effective = kernel / sigma
  else:
    penalty, u = soft_spectral_penalty(kernel, u_var.value, iterations=penalty_iterations,
                                       weight=penalty_weight)
    if not module.is_initializing():
      # Kept out of the init variables: sown values passed back into `apply` would accumulate.
      module.sow(PENALTY_COLLECTION, "spectral_penalty", penalty)
    effective = kernel
  if update:
    u_var.value = u
  return effective


class SpectralConv(nn.Module):
  """2D convolution with spectral normalisation ('paper'), the soft penalty ('code') or neither.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: 'VALID' or 'SAME'.
    mode: 'paper', 'code' or 'none' (see the module docstring).
    power_iterations: steps per call for 'paper'.
    penalty_iterations: steps per call for 'code' (authors: 3).
    penalty_weight: the soft penalty's factor (authors: 10).
  """
  features: int
  kernel_size: tuple[int, int] = (4, 4)
  strides: tuple[int, int] = (1, 1)
  padding: str = "VALID"
  mode: str = "paper"
  power_iterations: int = 1
  penalty_iterations: int = 3
  penalty_weight: float = 10.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, Cin] -> [B, H', W', features]."""
    if x.ndim != 4:
      raise ValueError(f"SpectralConv: input must be [B, H, W, C], got shape {tuple(x.shape)}")
    kernel = self.param("kernel", _he_normal, tuple(self.kernel_size) + (x.shape[-1],
                                                                         self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    kernel = _spectral_kernel(self, kernel, self.mode, self.power_iterations,
                              self.penalty_iterations, self.penalty_weight)
    y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), tuple(self.strides), self.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias


class SpectralDense(nn.Module):
  """Dense layer with spectral normalisation ('paper'), the soft penalty ('code') or neither.

  Attributes as `SpectralConv`.
  """
  features: int
  mode: str = "paper"
  power_iterations: int = 1
  penalty_iterations: int = 3
  penalty_weight: float = 10.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, in] -> [B, features]."""
    kernel = self.param("kernel", _glorot_uniform, (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    kernel = _spectral_kernel(self, kernel, self.mode, self.power_iterations,
                              self.penalty_iterations, self.penalty_weight)
    return x @ kernel.astype(x.dtype) + bias


# ------------------------------------------------------------------------------------------------
# The discriminator.
# ------------------------------------------------------------------------------------------------

# (width multiple of `features`, stride) of conv0 and the three blocks.
_LAYERS = ((1, 2), (2, 2), (4, 2), (8, 1))


def discriminator_output_size(size: int, padding: str = "VALID") -> int:
  """Spatial size after the four 4x4 convs: VALID 64 -> 3, 46 -> 1 (the minimum), 32 -> invalid."""
  for _, stride in _LAYERS:
    size = (size - 4) // stride + 1 if padding == "VALID" else -(-size // stride)
  return size


class Discriminator(nn.Module):
  """LS-GAN discriminator: [B, H, W, C] -> one linear score per sample [B, 1].

  With VALID padding (the authors') height and width must be at least 46; 'SAME' padding lets
  small test images (e.g. 32 x 32) through.

  Attributes:
    features: f, width of the first conv (authors: DAFNet 64; MMSDNet mask discriminator 4).
    spectral: 'paper' (spectral normalisation of every layer), 'code' (soft penalty on the three
      block convs, sown into 'penalties') or 'none'.
    exclude_background: drop input channel 0 (the mask discriminator: masks [B, H, W, classes]
      with background first).
    padding: 'VALID' (authors) or 'SAME'.
    negative_slope: LeakyReLU slope (0.2).
    power_iterations: power-iteration steps per call for 'paper'.
  """
  features: int = 64
  spectral: str = "paper"
  exclude_background: bool = False
  padding: str = "VALID"
  negative_slope: float = 0.2
  power_iterations: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    caller = "Discriminator"
    if x.ndim != 4:
      raise ValueError(f"{caller}: input must be [B, H, W, C], got shape {tuple(x.shape)}")
    if self.spectral not in SPECTRAL_MODES:
      raise ValueError(f"{caller}: `spectral` must be one of {SPECTRAL_MODES}, got "
                       f"{self.spectral!r}")
    if self.padding not in ("VALID", "SAME"):
      raise ValueError(f"{caller}: `padding` must be 'VALID' or 'SAME', got {self.padding!r}")
    if not isinstance(self.features, int) or self.features < 1:
      raise ValueError(f"{caller}: `features` must be a positive int, got {self.features!r}")
    if min(discriminator_output_size(n, self.padding) for n in x.shape[1:3]) < 1:
      raise ValueError(f"{caller}: four 4x4 {self.padding} convolutions with strides 2, 2, 2, 1 "
                       f"need height and width >= 46, got {x.shape[1:3]}; use padding='SAME' "
                       "for smaller images")
    if self.exclude_background:
      if x.shape[-1] < 2:
        raise ValueError(f"{caller}: with exclude_background the input needs a background and at "
                         f"least one foreground channel, got {x.shape[-1]} channel(s)")
      x = x[..., 1:]  # [B, H, W, classes - 1]: background (class 0) is not shown to D
    first_and_last = "paper" if self.spectral == "paper" else "none"
    for i, (multiple, stride) in enumerate(_LAYERS):
      # The authors' penalty covers the three block convs, not the first conv or the dense layer.
      mode = first_and_last if i == 0 else self.spectral
      x = SpectralConv(self.features * multiple, (4, 4), (stride, stride), self.padding, mode,
                       self.power_iterations, name=f"conv{i}")(x)
      x = nn.leaky_relu(x, self.negative_slope)
    x = x.reshape(x.shape[0], -1)  # [B, h * w * 8 f]
    return SpectralDense(1, first_and_last, self.power_iterations, name="dense")(x)
