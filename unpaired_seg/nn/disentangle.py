"""MMSDNet / DAFNet networks: anatomy and modality encoders, segmentor, decoders, pair weighting.

The disentangle-align-fuse models split an image x into a binary anatomy factor s = f_A(x)
[B, H, W, 8] and a modality vector z = f_M(s, x) [B, 8]; a segmentor h(s) gives the masks and a
decoder g(s, z) the image back. Architectures, widths, activations and initialisers follow the
authors' code; every width scales with a base width `features` whose default is theirs, so tests
and CPU configs can run tiny copies.

  modalities = ('mr', 'ct')
  encoder = AnatomyEncoder(modalities, variant='dafnet', features=8)
  variables = encoder.init(rng, x, modality='mr', train=False)   # creates every modality's blocks
  s, updates = encoder.apply(variables, x, modality='ct', train=True,
                             mutable=['stats_shared'])            # s: [B, H, W, 8], exactly 0/1
  z, mean, logvar = ModalityEncoder().apply(params, s, x, rngs={'sample': key})   # [B, 8] each
  image = FiLMDecoder().apply(params, s, z)                         # [B, H, W, 1] in [-1, 1]
  logits = Segmentor(num_classes, modalities).apply(variables, s, modality='mr', train=False)

Conventions: channels last; background is class 0 of the segmentor's logits (the authors put it
last); the segmentor returns LOGITS, the softmax belongs to the loss. Keras defaults are kept where
the authors relied on them: LeakyReLU slope 0.3, batch norm momentum 0.99 / epsilon 1e-3, Glorot
uniform kernels unless the authors asked for He normal, zero biases.

  python -m pytest -q tests/nn/test_disentangle.py
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unpaired_seg.nn.norms import ModalityNorm
from unpaired_seg.nn.sharing import NormSpec, Sharing, shared_or_per_modality
from unpaired_seg.ops import binarize as binarize_ops
from unpaired_seg.ops import resample

# Keras' BatchNormalization defaults, which the authors' networks use.
KERAS_BATCH_NORM = NormSpec(kind="batch", momentum=0.99, epsilon=1e-3)

# Which anatomy U-Net blocks are per modality (glob patterns over `unet_blocks(depth)` names).
ANATOMY_VARIANTS = {
    # Journal model: one encoding path per modality; bottleneck, decoding path and 1x1 shared.
    "dafnet": ("enc*",),
    # Conference model: two fully separate U-Nets.
    "mmsdnet": ("*",),
}

# Keras' Glorot uniform is its default kernel initialiser; the authors ask for He normal in the
# U-Net, segmentor, modality encoder and discriminators, and Glorot normal for the decoder output.
# (flax's truncated normals are variance-corrected; Keras 2.1's were not, a small difference.)
_glorot_uniform = nn.initializers.glorot_uniform()
_glorot_normal = nn.initializers.glorot_normal()
_he_normal = nn.initializers.he_normal()

_KERAS_LEAKY_SLOPE = 0.3


def _check_images(caller: str, **arrays: jax.Array) -> None:
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


def _check_width(caller: str, **widths: int) -> None:
  for name, value in widths.items():
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      raise ValueError(f"{caller}: `{name}` must be a positive int, got {value!r}")


def _make_norm(spec: NormSpec, groups: Sequence[str], name: str) -> ModalityNorm:
  return ModalityNorm(tuple(groups), kind=spec.kind, momentum=spec.momentum, epsilon=spec.epsilon,
                      num_groups=spec.num_groups, stat_shards=spec.stat_shards, name=name)


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
  """Nearest-neighbour up-sampling of [B, H, W, C] by an integer factor (Keras UpSampling2D)."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def resize_nearest(x: jax.Array, height: int, width: int) -> jax.Array:
  """Nearest-neighbour resize of [B, H, W, C] to [B, height, width, C], as TF 1's legacy op.

  Output pixel i takes input pixel floor(i * H / height) (no half-pixel centres), which is what
  the authors' `tf.image.resize_nearest_neighbor` does; for an integer down-sampling factor f it
  keeps the top-left pixel of every f x f block.
  """
  rows = (jnp.arange(height) * x.shape[1]) // height
  cols = (jnp.arange(width) * x.shape[2]) // width
  return x[:, rows][:, :, cols]


# ------------------------------------------------------------------------------------------------
# Anatomy encoder.
# ------------------------------------------------------------------------------------------------


class _ConvNormBlock(nn.Module):
  """[3x3 conv -> norm -> ReLU] x 2 (He normal kernels, as the authors' U-Net)."""
  features: int
  norm: NormSpec
  norm_groups: Sequence[str]

  @nn.compact
  def __call__(self, x: jax.Array, group: str, train: bool) -> jax.Array:
    for i in range(2):
      # A bias before batch norm is cancelled by the mean subtraction: only keep it without norm.
      x = nn.Conv(self.features, (3, 3), use_bias=self.norm.kind == "none",
                  kernel_init=_he_normal, name=f"conv{i}")(x)
      x = _make_norm(self.norm, self.norm_groups, f"norm{i}")(x, group, train)
      x = nn.relu(x)
    return x


class _AnatomyUpBlock(nn.Module):
  """Nearest up x2 -> 3x3 conv -> norm (no activation) -> concat skip -> _ConvNormBlock."""
  features: int
  norm: NormSpec
  norm_groups: Sequence[str]

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array, group: str, train: bool) -> jax.Array:
    x = upsample_nearest(x)
    x = nn.Conv(self.features, (3, 3), use_bias=self.norm.kind == "none", kernel_init=_he_normal,
                name="up_conv")(x)
    x = _make_norm(self.norm, self.norm_groups, "up_norm")(x, group, train)
    x = jnp.concatenate([x, skip], axis=-1)
    return _ConvNormBlock(self.features, self.norm, self.norm_groups, name="conv")(x, group, train)


class _PointwiseConv(nn.Module):
  """A 1x1 convolution (a module of its own so that it can be shared or per modality)."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Conv(self.features, (1, 1), kernel_init=_glorot_uniform, name="conv")(x)


def anatomy_sharing(modalities: Sequence[str], variant: str,
                    norm_per_modality: bool = False) -> Sharing:
  """The block sharing of the anatomy U-Net for a model variant.

  Args:
    modalities: every modality of the model.
    variant: 'dafnet' (encoding path per modality, the rest shared) or 'mmsdnet' (everything per
      modality).
    norm_per_modality: also give the SHARED blocks per-modality norm collections. A per-modality
      block has its own norm layers either way, so False reproduces the authors' networks.

  Returns:
    A `Sharing` over the block names of `unpaired_seg.nn.unet.unet_blocks(depth)`.
  """
  if variant not in ANATOMY_VARIANTS:
    raise ValueError(f"anatomy encoder `variant` must be one of {tuple(ANATOMY_VARIANTS)}, got "
                     f"{variant!r}")
  return Sharing(tuple(modalities), ANATOMY_VARIANTS[variant], norm_per_modality)


class AnatomyEncoder(nn.Module):
  """U-Net anatomy encoder f_A: image -> binary anatomy factor s.

  Encoding path: [3x3 conv -> norm -> ReLU] x 2 at `features` * 2^l, max-pool 2, for l < depth;
  bottleneck at `features` * 2^depth; decoding path of nearest up x2 -> 3x3 conv -> norm -> concat
  skip -> conv block; 1x1 conv to `num_anatomy` channels -> softmax -> straight-through
  binarisation. Blocks `enc0..`, `bottleneck`, `dec..0`, `head` are shared or per modality
  (`<block>_<modality>`) as `variant` says; the soft probabilities are sown into 'intermediates'
  as `probabilities`.

  Attributes:
    modalities: every modality of the model (all per-modality copies are created at init).
    variant: 'dafnet' or 'mmsdnet', see `ANATOMY_VARIANTS`.
    features: width at full resolution (authors: 64, giving 64 ... 1024 at depth 4).
    depth: number of poolings; H and W must be divisible by 2^depth.
    num_anatomy: channels of s (authors: 8).
    binarize: 'onehot_argmax' (paper, default) or 'round' (the authors' code: per-channel rounding,
      a pixel may be all zero).
    norm_per_modality: see `anatomy_sharing`.
    norm: normalisation settings (Keras batch norm by default).
  """
  modalities: Sequence[str]
  variant: str = "dafnet"
  features: int = 64
  depth: int = 4
  num_anatomy: int = 8
  binarize: str = "onehot_argmax"
  norm_per_modality: bool = False
  norm: NormSpec = KERAS_BATCH_NORM

  @property
  def sharing(self) -> Sharing:
    return anatomy_sharing(self.modalities, self.variant, self.norm_per_modality)

  @nn.compact
  def __call__(self, x: jax.Array, modality: str, train: bool) -> jax.Array:
    """Encodes images [B, H, W, C_in] of `modality` into s [B, H, W, num_anatomy] (0/1)."""
    caller = "AnatomyEncoder"
    _check_images(caller, x=x)
    _check_width(caller, features=self.features, depth=self.depth, num_anatomy=self.num_anatomy)
    if self.binarize not in binarize_ops.BINARIZE_MODES:
      raise ValueError(f"{caller}: `binarize` must be one of {binarize_ops.BINARIZE_MODES}, got "
                       f"{self.binarize!r}")
    factor = 2 ** self.depth
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"{caller}: a U-Net of depth {self.depth} needs height and width divisible "
                       f"by {factor}, got {x.shape[1:3]}")
    sharing = self.sharing
    group = sharing.norm_group(modality)
    groups = sharing.norm_groups

    def make(name: str) -> nn.Module:
      base = name.split("_")[0]
      if base.startswith("enc"):
        return _ConvNormBlock(self.features * 2 ** int(base[3:]), self.norm, groups, name=name)
      if base == "bottleneck":
        return _ConvNormBlock(self.features * 2 ** self.depth, self.norm, groups, name=name)
      if base.startswith("dec"):
        return _AnatomyUpBlock(self.features * 2 ** int(base[3:]), self.norm, groups, name=name)
      return _PointwiseConv(self.num_anatomy, name=name)

    def block(name: str, *args):
      return shared_or_per_modality(self, sharing, name, make, modality, *args)

    skips = []
    for level in range(self.depth):
      x = block(f"enc{level}", x, group, train)
      skips.append(x)
      x = resample.max_pool(x, (2, 2))
    x = block("bottleneck", x, group, train)
    for level in reversed(range(self.depth)):
      x = block(f"dec{level}", x, skips[level], group, train)
    probabilities = jax.nn.softmax(block("head", x), axis=-1)  # [B, H, W, num_anatomy]
    self.sow("intermediates", "probabilities", probabilities)
    return binarize_ops.binarize(probabilities, self.binarize)


# ------------------------------------------------------------------------------------------------
# Modality encoder (VAE).
# ------------------------------------------------------------------------------------------------


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
    negative_slope: LeakyReLU slope (Keras' default 0.3).
  """
  z_dim: int = 8
  features: int = 16
  hidden: int = 32
  negative_slope: float = _KERAS_LEAKY_SLOPE

  @nn.compact
  def __call__(self, anatomy: jax.Array, image: jax.Array,
               sample: bool = True) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Encodes (s [B, H, W, A], x [B, H, W, C]) into (z, mean, logvar), each [B, z_dim].

    With `sample=True`, z = mean + exp(0.5 logvar) * eps, eps ~ N(0, I) from the 'sample' rng
    stream (pass `rngs={'sample': key}`); with `sample=False`, z = mean.
    """
    caller = "ModalityEncoder"
    _check_images(caller, anatomy=anatomy, image=image)
    _check_width(caller, z_dim=self.z_dim, features=self.features, hidden=self.hidden)
    size = list(anatomy.shape[1:3])
    for _ in range(4):
      size = [_valid_size(n, 3, 2) for n in size]
    if min(size) < 1:
      raise ValueError(f"{caller}: four 3x3 stride-2 VALID convolutions need height and width >= "
                       f"31, got {anatomy.shape[1:3]}")
    x = jnp.concatenate([anatomy, image.astype(anatomy.dtype)], axis=-1)
    for i in range(4):
      x = nn.Conv(self.features * 2 ** i, (3, 3), strides=(2, 2), padding="VALID",
                  kernel_init=_he_normal, name=f"conv{i}")(x)
      x = nn.leaky_relu(x, self.negative_slope)
    x = x.reshape(x.shape[0], -1)  # [B, h * w * 8 features]
    x = nn.leaky_relu(nn.Dense(self.hidden, kernel_init=_he_normal, name="dense")(x),
                      self.negative_slope)
    mean = nn.Dense(self.z_dim, kernel_init=_glorot_uniform, name="mean")(x)
    logvar = nn.Dense(self.z_dim, kernel_init=_glorot_uniform, name="logvar")(x)
    if not sample:
      return mean, mean, logvar
    eps = jax.random.normal(self.make_rng("sample"), mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps, mean, logvar


# ------------------------------------------------------------------------------------------------
# Segmentor.
# ------------------------------------------------------------------------------------------------


class _SegmentorHead(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Conv(self.num_classes, (1, 1), kernel_init=_glorot_uniform, name="conv")(x)


class Segmentor(nn.Module):
  """Segmentor h: anatomy factor -> class logits (background = class 0), shared by default.

  Two [3x3 conv -> norm -> ReLU] at `features`, then a 1x1 conv to `num_classes` logits. Blocks
  `body` and `head`; the authors share both across modalities, norm included.

  Attributes:
    num_classes: output channels, background included.
    modalities: every modality of the model.
    features: conv width (authors: 64).
    per_modality_blocks: glob patterns of blocks ('body', 'head') with per-modality kernels.
    norm_per_modality: per-modality norm collections for shared blocks.
    norm: normalisation settings.
  """
  num_classes: int
  modalities: Sequence[str]
  features: int = 64
  per_modality_blocks: tuple[str, ...] = ()
  norm_per_modality: bool = False
  norm: NormSpec = KERAS_BATCH_NORM

  @property
  def sharing(self) -> Sharing:
    return Sharing(tuple(self.modalities), tuple(self.per_modality_blocks), self.norm_per_modality)

  @nn.compact
  def __call__(self, anatomy: jax.Array, modality: str, train: bool) -> jax.Array:
    """[B, H, W, A] anatomy factor -> [B, H, W, num_classes] logits."""
    _check_images("Segmentor", anatomy=anatomy)
    _check_width("Segmentor", num_classes=self.num_classes, features=self.features)
    sharing = self.sharing
    group = sharing.norm_group(modality)

    def make(name: str) -> nn.Module:
      if name.split("_")[0] == "body":
        return _ConvNormBlock(self.features, self.norm, sharing.norm_groups, name=name)
      return _SegmentorHead(self.num_classes, name=name)

    x = shared_or_per_modality(self, sharing, "body", make, modality, anatomy, group, train)
    return shared_or_per_modality(self, sharing, "head", make, modality, x)


# ------------------------------------------------------------------------------------------------
# FiLM decoder.
# ------------------------------------------------------------------------------------------------


class FiLMBlock(nn.Module):
  """a = LReLU(conv3x3(x)); b = LReLU(conv3x3(a) * gamma(z) + beta(z)); out = a + b.

  gamma and beta each come from their own Dense(features) -> LReLU on z.
  """
  features: int = 8
  negative_slope: float = _KERAS_LEAKY_SLOPE

  @nn.compact
  def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
    act = lambda v: nn.leaky_relu(v, self.negative_slope)
    a = act(nn.Conv(self.features, (3, 3), kernel_init=_glorot_uniform, name="conv0")(x))
    b = nn.Conv(self.features, (3, 3), kernel_init=_glorot_uniform, name="conv1")(a)
    gamma = act(nn.Dense(self.features, kernel_init=_glorot_uniform, name="gamma")(z))  # [B, F]
    beta = act(nn.Dense(self.features, kernel_init=_glorot_uniform, name="beta")(z))
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
  negative_slope: float = _KERAS_LEAKY_SLOPE

  @nn.compact
  def __call__(self, anatomy: jax.Array, z: jax.Array) -> jax.Array:
    """(s [B, H, W, A], z [B, Z]) -> image [B, H, W, out_channels] in [-1, 1]."""
    _check_images("FiLMDecoder", anatomy=anatomy)
    _check_width("FiLMDecoder", features=self.features, num_blocks=self.num_blocks,
                 out_channels=self.out_channels)
    if z.ndim != 2 or z.shape[0] != anatomy.shape[0]:
      raise ValueError(f"FiLMDecoder: `z` must be [B, Z] with B = {anatomy.shape[0]}, got shape "
                       f"{tuple(z.shape)}")
    x = nn.Conv(self.features, (3, 3), kernel_init=_glorot_uniform, name="conv_in")(anatomy)
    x = nn.leaky_relu(x, self.negative_slope)
    for i in range(self.num_blocks):
      x = FiLMBlock(self.features, self.negative_slope, name=f"film{i}")(x, z)
    x = nn.Conv(self.out_channels, (1, 1), kernel_init=_glorot_normal, name="conv_out")(x)
    return jnp.tanh(x)


# ------------------------------------------------------------------------------------------------
# SPADE decoder.
# ------------------------------------------------------------------------------------------------


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
    s = nn.relu(nn.Conv(self.hidden, (3, 3), kernel_init=_glorot_uniform, name="shared")(s))
    gamma = nn.Conv(x.shape[-1], (3, 3), kernel_init=_glorot_uniform, name="gamma")(s)
    beta = nn.Conv(x.shape[-1], (3, 3), kernel_init=_glorot_uniform, name="beta")(s)
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
    y = nn.Conv(min(fin, fout), (3, 3), kernel_init=_glorot_uniform, name="conv0")(y)
    y = act(SPADE(self.hidden, name="spade1")(y, anatomy))
    y = nn.Conv(fout, (3, 3), kernel_init=_glorot_uniform, name="conv1")(y)
    shortcut = x
    if fin != fout:
      shortcut = SPADE(self.hidden, name="spade_shortcut")(x, anatomy)
      shortcut = nn.Conv(fout, (1, 1), use_bias=False, kernel_init=_glorot_uniform,
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
    _check_images(caller, anatomy=anatomy)
    _check_width(caller, features=self.features, hidden=self.hidden,
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
    x = nn.Dense(h * w * f, kernel_init=_glorot_uniform, name="project")(z)
    x = x.reshape(z.shape[0], h, w, f)  # [B, H / 2^n, W / 2^n, 8 f]
    for i in range(self.num_upsamples + 1):
      if i:
        x = upsample_nearest(x)
      x = SPADEBlock(self.width(i), self.hidden, self.negative_slope, name=f"block{i}")(x, anatomy)
    x = nn.Conv(self.out_channels, (1, 1), kernel_init=_glorot_normal, name="conv_out")(x)
    return jnp.tanh(x)


# ------------------------------------------------------------------------------------------------
# Pair weighting (automated pairing).
# ------------------------------------------------------------------------------------------------


class PairWeighting(nn.Module):
  """Weights of k candidate pairs: Dense(hidden) -> ReLU -> Dense(k) -> softmax over the k.

  The scores are Dice(s_target, deformed candidate anatomy) per sample
  (`unpaired_seg.ops.similarity.soft_dice_per_sample`), stacked to [B, k].

  Attributes:
    hidden: width of the hidden layer (authors: 5).
  """
  hidden: int = 5

  @nn.compact
  def __call__(self, scores: jax.Array) -> jax.Array:
    """[B, k] scores -> [B, k] weights, positive, summing to 1 per sample."""
    if scores.ndim != 2 or scores.shape[1] < 1:
      raise ValueError(f"PairWeighting: `scores` must be [B, k], got shape {tuple(scores.shape)}")
    _check_width("PairWeighting", hidden=self.hidden)
    x = nn.relu(nn.Dense(self.hidden, kernel_init=_glorot_uniform, name="hidden")(scores))
    x = nn.Dense(scores.shape[1], kernel_init=_glorot_uniform, name="logits")(x)
    return jax.nn.softmax(x, axis=-1)
