"""A 2D or 3D U-Net whose blocks can be shared or per modality and whose norms take the modality.

  model = UNet(num_classes=5, sharing=Sharing(('mr', 'ct')), features=16, depth=4)
  variables = model.init(rng, x, modality='mr', train=False)
  logits = model.apply(variables, x, modality='ct', train=False)   # [B, H, W, classes]
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unpaired_seg.nn.layers import UpConv
from unpaired_seg.nn.norms import ModalityNorm
from unpaired_seg.nn.sharing import NormSpec, Sharing, shared_or_per_modality
from unpaired_seg.ops import resample


class ConvBlock(nn.Module):
  """[conv 3 -> norm -> ReLU] x 2, in 2D or 3D."""
  features: int
  norm: NormSpec
  norm_groups: Sequence[str]
  ndim: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, group: str, train: bool) -> jax.Array:
    for i in range(2):
      x = nn.Conv(self.features, (3,) * self.ndim, use_bias=self.norm.kind == "none",
                  name=f"conv{i}")(x)
      x = ModalityNorm(self.norm_groups, kind=self.norm.kind, momentum=self.norm.momentum,
                       epsilon=self.norm.epsilon, num_groups=self.norm.num_groups,
                       stat_shards=self.norm.stat_shards, name=f"norm{i}")(x, group, train)
      x = nn.relu(x)
    return x


DEEP_SUPERVISION = "deep_supervision"   # the collection the decoders' extra logits are sown into


class UpBlock(nn.Module):
  """Transposed-conv upsampling x2, concatenation with the skip, then a ConvBlock.

  With `ds_classes` > 0 a 1x1 head turns the block's output into class logits at its resolution,
  sown into the DEEP_SUPERVISION collection (nnU-Net's deep supervision); the head lives in the
  block, so it is shared or per modality with its decoder.
  """
  features: int
  norm: NormSpec
  norm_groups: Sequence[str]
  ndim: int = 2
  ds_classes: int = 0

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array, group: str, train: bool) -> jax.Array:
    # The variables of nn.ConvTranspose(features, 2, strides=2), lowered as a matmul (see layers).
    x = UpConv(self.features, (2,) * self.ndim, name="up")(x)
    x = jnp.concatenate([x, skip], axis=-1)
    x = ConvBlock(self.features, self.norm, self.norm_groups, self.ndim, name="conv")(
        x, group, train)
    if self.ds_classes:
      self.sow(DEEP_SUPERVISION, "logits",
               nn.Conv(self.ds_classes, (1,) * self.ndim, name="ds_head")(x))
    return x


class Head(nn.Module):
  """1x1 convolution to class logits."""
  num_classes: int
  ndim: int = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Conv(self.num_classes, (1,) * self.ndim, name="conv")(x)


def unet_blocks(depth: int) -> tuple[str, ...]:
  """Block names of a U-Net of `depth` poolings, input to output."""
  return (tuple(f"enc{i}" for i in range(depth)) + ("bottleneck",)
          + tuple(f"dec{i}" for i in reversed(range(depth))) + ("head",))


class UNet(nn.Module):
  """U-Net with `depth` poolings; spatial sizes must be divisible by 2**depth.

  Attributes:
    num_classes: output channels (background included).
    sharing: which blocks and norms are per modality.
    features: channels at full resolution; doubled after each pooling, capped at `max_features`.
    depth: number of poolings.
    ndim: 2 for [B, H, W, C] inputs, 3 for [B, D, H, W, C].
    norm: normalisation settings.
    deep_supervision: decoder blocks below full resolution sow logits (see UpBlock).
  """
  num_classes: int
  sharing: Sharing
  features: int = 16
  depth: int = 4
  ndim: int = 2
  max_features: int = 512
  norm: NormSpec = NormSpec()
  deep_supervision: bool = False

  def width(self, level: int) -> int:
    return min(self.features * 2 ** level, self.max_features)

  @nn.compact
  def __call__(self, x: jax.Array, modality: str, train: bool) -> jax.Array:
    factor = 2 ** self.depth
    if any(s % factor for s in x.shape[1:-1]):
      raise ValueError(f"U-Net of depth {self.depth} needs spatial sizes divisible by {factor}, "
                       f"got {x.shape[1:-1]}")
    group = self.sharing.norm_group(modality)

    def block(name, *args, **kwargs):
      return shared_or_per_modality(self, self.sharing, name, _make, modality, *args, **kwargs)

    def _make(name):
      base = name.split("_")[0]
      groups = self.sharing.groups_for_block(name)
      if base.startswith("enc"):
        return ConvBlock(self.width(int(base[3:])), self.norm, groups, self.ndim, name=name)
      if base == "bottleneck":
        return ConvBlock(self.width(self.depth), self.norm, groups, self.ndim, name=name)
      if base.startswith("dec"):
        level = int(base[3:])
        # nnU-Net trains every decoder output but the coarsest (its weight is 0 there).
        ds = self.num_classes if self.deep_supervision and 0 < level < self.depth - 1 else 0
        return UpBlock(self.width(level), self.norm, groups, self.ndim, ds_classes=ds, name=name)
      return Head(self.num_classes, self.ndim, name=name)

    skips = []
    for level in range(self.depth):
      x = block(f"enc{level}", x, group=group, train=train)
      skips.append(x)
      x = resample.max_pool(x, (2,) * self.ndim)
    x = block("bottleneck", x, group=group, train=train)
    self.sow("intermediates", "bottleneck_features", x)
    for level in reversed(range(self.depth)):
      x = block(f"dec{level}", x, skips[level], group=group, train=train)
      self.sow("intermediates", f"dec{level}_features", x)
    return block("head", x)
