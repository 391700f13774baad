"""The anatomy side: the U-Net anatomy encoder f_A (image -> binary factor s) and segmentor h(s).

Both are built of [3x3 conv -> norm -> ReLU] blocks with Keras' batch norm, each block shared
across modalities or one per modality.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unpaired_seg.nn.disentangle.common import (GLOROT_UNIFORM, HE_NORMAL, check_images,
                                                check_width, upsample_nearest)
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


def _make_norm(spec: NormSpec, groups: Sequence[str], name: str) -> ModalityNorm:
  return ModalityNorm(tuple(groups), kind=spec.kind, momentum=spec.momentum, epsilon=spec.epsilon,
                      num_groups=spec.num_groups, stat_shards=spec.stat_shards, name=name)


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
                  kernel_init=HE_NORMAL, name=f"conv{i}")(x)
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
    x = nn.Conv(self.features, (3, 3), use_bias=self.norm.kind == "none", kernel_init=HE_NORMAL,
                name="up_conv")(x)
    x = _make_norm(self.norm, self.norm_groups, "up_norm")(x, group, train)
    x = jnp.concatenate([x, skip], axis=-1)
    return _ConvNormBlock(self.features, self.norm, self.norm_groups, name="conv")(x, group, train)


class _PointwiseConv(nn.Module):
  """A 1x1 convolution (a module of its own so that it can be shared or per modality)."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Conv(self.features, (1, 1), kernel_init=GLOROT_UNIFORM, name="conv")(x)


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
    check_images(caller, x=x)
    check_width(caller, features=self.features, depth=self.depth, num_anatomy=self.num_anatomy)
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
# Segmentor.
# ------------------------------------------------------------------------------------------------


class _SegmentorHead(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Conv(self.num_classes, (1, 1), kernel_init=GLOROT_UNIFORM, name="conv")(x)


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
    check_images("Segmentor", anatomy=anatomy)
    check_width("Segmentor", num_classes=self.num_classes, features=self.features)
    sharing = self.sharing
    group = sharing.norm_group(modality)

    def make(name: str) -> nn.Module:
      if name.split("_")[0] == "body":
        return _ConvNormBlock(self.features, self.norm, sharing.norm_groups, name=name)
      return _SegmentorHead(self.num_classes, name=name)

    x = shared_or_per_modality(self, sharing, "body", make, modality, anatomy, group, train)
    return shared_or_per_modality(self, sharing, "head", make, modality, x)
