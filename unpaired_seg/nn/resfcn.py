"""The residual FCN of DualStream (DLTK `residual_fcn_3d`), 2D or 3D, with sharable blocks.

  model = ResFCN(num_classes=5, sharing=Sharing(('mr', 'ct')), ndim=3)
  variables = model.init(rng, x, modality='mr', train=False)     # x: [B, D, H, W, C]
  logits = model.apply(variables, x, modality='ct', train=False)   # [B, D, H, W, classes]

Layout, as DLTK builds it (scale s works at 1 / prod(strides[:s + 1]) of the input size):
  init        3x3(x3) conv to filters[0] (strides[0] = 1): all of scale 0
  enc1 ..     scale s: `units_per_scale` pre-activation residual units [norm -> ReLU -> conv] x 2
              with filters[s]; the first unit downsamples by a strided conv of kernel 2 x stride,
              its shortcut by max pooling and zero-padding of the new channels
  dec{S-2} .. "upscore" units in score space: a 1x1 conv of the coarser features to `num_classes`
              channels, parameter-free linear upsampling, plus (1x1 conv + norm) of the encoder
              features of that scale
  head        1x1 conv to logits (no softmax)

DLTK keeps no residual units at scale 0 (the initial conv is that scale), so there is no `enc0`
block; the deepest block `enc{S-1}` plays the role of the bottleneck in the sharing presets.
The outputs of `init`, `enc<s>` and `dec<s>` are sown to 'intermediates' as `<block>_features`.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unpaired_seg.nn.norms import ModalityNorm
from unpaired_seg.nn.sharing import NormSpec, Sharing, shared_or_per_modality
from unpaired_seg.nn.unet import Head
from unpaired_seg.ops import resample


def pad_channels(x: jax.Array, features: int) -> jax.Array:
  """Zero-pads the channel axis to `features`, the zeros split evenly before and after.

  The split (floor before, ceil after) is DLTK's; for doubled channels it is also UMMKD's.

  Args:
    x: [B, *spatial, C] with C <= features.
    features: channels wanted.

  Returns:
    [B, *spatial, features]; channel c of `x` lands at c + (features - C) // 2.
  """
  grow = features - x.shape[-1]
  if grow < 0:
    raise ValueError(f"pad_channels: cannot pad {x.shape[-1]} channels down to {features}")
  before = grow // 2
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(before, grow - before)])


def modality_norm(spec: NormSpec, groups: Sequence[str], name: str) -> ModalityNorm:
  """A `ModalityNorm` with the settings of `spec`."""
  return ModalityNorm(groups, kind=spec.kind, momentum=spec.momentum, epsilon=spec.epsilon,
                      num_groups=spec.num_groups, stat_shards=spec.stat_shards, name=name)


def axis_strides(stride: int | Sequence[int], ndim: int) -> tuple[int, ...]:
  """One stride per spatial axis from an int (isotropic) or a per-axis sequence."""
  if isinstance(stride, int):
    return (stride,) * ndim
  stride = tuple(int(s) for s in stride)
  if len(stride) != ndim:
    raise ValueError(f"stride {stride} has {len(stride)} axes, the network has ndim={ndim}")
  return stride


class ResidualUnit(nn.Module):
  """Pre-activation residual unit (He et al. 2016) as DLTK's `vanilla_residual_unit_3d`.

  Attributes:
    features: output channels.
    strides: per-axis stride of the first conv; >1 also max-pools the shortcut.
    norm: normalisation settings.
    norm_groups: every norm group of the model.
    ndim: 2 or 3.
    dropout: dropout rate on the residual branch before the addition (DLTK has none: 0).
  """
  features: int
  strides: tuple[int, ...]
  norm: NormSpec
  norm_groups: Sequence[str]
  ndim: int = 2
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, group: str, train: bool) -> jax.Array:
    in_features = x.shape[-1]
    use_bias = self.norm.kind == "none"
    # A kernel of 2 x stride on the strided conv, so that no input position is skipped.
    kernel = tuple(2 * s if s > 1 else 3 for s in self.strides)
    y = modality_norm(self.norm, self.norm_groups, "norm0")(x, group, train)
    y = nn.Conv(self.features, kernel, strides=self.strides, use_bias=use_bias,
                name="conv0")(nn.relu(y))
    y = modality_norm(self.norm, self.norm_groups, "norm1")(y, group, train)
    y = nn.Conv(self.features, (3,) * self.ndim, use_bias=use_bias, name="conv1")(nn.relu(y))
    y = nn.Dropout(self.dropout)(y, deterministic=not train)

    shortcut = x
    if any(s > 1 for s in self.strides):
      shortcut = resample.max_pool(shortcut, self.strides)
    if in_features < self.features:
      shortcut = pad_channels(shortcut, self.features)
    elif in_features > self.features:
      # Fewer channels cannot be had by padding: DLTK projects with a conv.
      shortcut = nn.Conv(self.features, (3,) * self.ndim, use_bias=use_bias,
                         name="shortcut_conv")(shortcut)
    return y + shortcut


class ResidualScale(nn.Module):
  """The residual units of one encoder scale; the first one downsamples."""
  features: int
  strides: tuple[int, ...]
  units: int
  norm: NormSpec
  norm_groups: Sequence[str]
  ndim: int = 2
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, group: str, train: bool) -> jax.Array:
    for i in range(self.units):
      strides = self.strides if i == 0 else (1,) * self.ndim
      x = ResidualUnit(self.features, strides, self.norm, self.norm_groups, self.ndim,
                       self.dropout, name=f"unit{i}")(x, group, train)
    return x


class Upscore(nn.Module):
  """Upscore unit (Long et al. 2015, as DLTK's `upscore_layer_3d`).

  The coarser input goes to `features` channels by a 1x1 conv (only when its channel count
  differs) and is upsampled by parameter-free linear interpolation (`jax.image.resize`, half-pixel
  centres). DLTK uses a fixed, untrained bilinear transposed convolution instead: the same weights
  (1/4, 3/4) in the interior; at the borders the resize renormalises where the deconvolution
  reads zeros. The encoder features of the finer scale add through a 1x1 conv and a norm.
  """
  features: int
  norm: NormSpec
  norm_groups: Sequence[str]
  ndim: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, skip: jax.Array, group: str, train: bool) -> jax.Array:
    if x.shape[-1] != self.features:
      x = nn.Conv(self.features, (1,) * self.ndim, use_bias=False, name="filter_conversion")(x)
    x = jax.image.resize(x, skip.shape[:-1] + (self.features,), method="linear")
    s = nn.Conv(self.features, (1,) * self.ndim, use_bias=self.norm.kind == "none",
                name="skip_conv")(skip)
    s = modality_norm(self.norm, self.norm_groups, "skip_norm")(s, group, train)
    return x + s


def resfcn_blocks(num_scales: int) -> tuple[str, ...]:
  """Block names of a ResFCN with `num_scales` scales (len(filters)), input to output."""
  if num_scales < 2:
    raise ValueError(f"a ResFCN needs at least 2 scales (len(filters)), got {num_scales}")
  return (("init",) + tuple(f"enc{s}" for s in range(1, num_scales))
          + tuple(f"dec{s}" for s in reversed(range(num_scales - 1))) + ("head",))


class ResFCN(nn.Module):
  """DLTK-style residual FCN; spatial sizes must be divisible by the product of the strides.

  Attributes:
    num_classes: output channels (background included); also the width of the upscore decoder.
    sharing: which blocks and norms are per modality.
    filters: channels per scale; filters[0] is the initial conv's (DualStream: 16, 64, 128, 256,
      512).
    units_per_scale: residual units at each scale from 1 on (DualStream: 3).
    strides: per scale, an int or one int per axis; strides[0] is the initial conv's and must be
      1, so that the logits have the input's size.
    ndim: 2 for [B, H, W, C] inputs, 3 for [B, D, H, W, C].
    norm: normalisation settings.
    dropout: dropout rate at the end of each residual branch (0 = none, as DLTK).
  """
  num_classes: int
  sharing: Sharing
  filters: Sequence[int] = (16, 64, 128, 256, 512)
  units_per_scale: int = 3
  strides: Sequence[int | Sequence[int]] = (1, 2, 2, 2, 2)
  ndim: int = 2
  norm: NormSpec = NormSpec()
  dropout: float = 0.0

  def scale_strides(self) -> list[tuple[int, ...]]:
    if self.ndim not in (2, 3):
      raise ValueError(f"ResFCN: ndim must be 2 or 3, got {self.ndim}")
    if len(self.strides) != len(self.filters):
      raise ValueError(f"ResFCN: strides has {len(self.strides)} entries, filters "
                       f"{len(self.filters)}; give one stride per scale")
    if self.units_per_scale < 1:
      raise ValueError(f"ResFCN: units_per_scale must be >= 1, got {self.units_per_scale}")
    strides = [axis_strides(s, self.ndim) for s in self.strides]
    if any(a != 1 for a in strides[0]):
      # The decoder returns to the initial conv's resolution: logits must match the labels.
      raise ValueError(f"ResFCN: strides[0] (the initial conv's) must be 1, got {self.strides[0]}")
    return strides

  @nn.compact
  def __call__(self, x: jax.Array, modality: str, train: bool) -> jax.Array:
    strides = self.scale_strides()
    num_scales = len(self.filters)
    resfcn_blocks(num_scales)  # validates the number of scales
    if x.ndim != self.ndim + 2:
      raise ValueError(f"ResFCN with ndim={self.ndim} needs [B, *spatial({self.ndim}), C] input, "
                       f"got shape {x.shape}")
    total = [1] * self.ndim
    for s in strides:
      total = [t * a for t, a in zip(total, s)]
    if any(n % t for n, t in zip(x.shape[1:-1], total)):
      raise ValueError(f"ResFCN with strides {tuple(self.strides)} needs spatial sizes divisible "
                       f"by {tuple(total)}, got {x.shape[1:-1]}")
    group = self.sharing.norm_group(modality)
    use_bias = self.norm.kind == "none"

    def make(name):
      base = name.split("_")[0]
      groups = self.sharing.groups_for_block(name)
      if base == "init":
        return nn.Conv(self.filters[0], (3,) * self.ndim, strides=strides[0], use_bias=use_bias,
                       name=name)
      if base.startswith("enc"):
        s = int(base[3:])
        return ResidualScale(self.filters[s], strides[s], self.units_per_scale, self.norm,
                             groups, self.ndim, self.dropout, name=name)
      if base.startswith("dec"):
        return Upscore(self.num_classes, self.norm, groups, self.ndim, name=name)
      return Head(self.num_classes, self.ndim, name=name)

    def block(name, *args, **kwargs):
      return shared_or_per_modality(self, self.sharing, name, make, modality, *args, **kwargs)

    x = block("init", x)
    self.sow("intermediates", "init_features", x)
    features = [x]  # per scale, the finest first
    for s in range(1, num_scales):
      x = block(f"enc{s}", x, group=group, train=train)
      self.sow("intermediates", f"enc{s}_features", x)
      features.append(x)
    for s in reversed(range(num_scales - 1)):
      x = block(f"dec{s}", x, features[s], group=group, train=train)
      self.sow("intermediates", f"dec{s}_features", x)
    return block("head", x)
