"""UMMKD's 2D dilated residual network ("Network-1") with sharable blocks and a pixel-shuffle head.

The input is 2.5D: C = 3 adjacent slices, [B, H, W, 3]; the label is the middle slice's.

  model = DilatedResNet(num_classes=5, sharing=Sharing(('mr', 'ct')))
  variables = model.init(rng, x, modality='mr', train=False)
  logits = model.apply(variables, x, modality='ct', train=True, mutable=['stats_ct'],
                       rngs={'dropout': key})                   # [B, H, W, classes]

Blocks (input to output), with the default widths (16, 32, 64, 128, 256, 256, 512):
  init        3x3 conv to widths[0]
  enc0 ..     one stage per width, units per stage (1, 1, 2, 2, 2, 2, 2) of residual units
              [norm -> LReLU(0.2) -> 3x3 conv -> dropout] x 2 + shortcut (channels zero-padded
              when they grow); 2x2 max pooling after each of the first `num_pools` stages (/8)
  bottleneck  two residual units of widths[-1] with 3x3 convs dilated by 2
  dec1        two [norm -> LReLU -> 3x3 conv widths[-1] -> dropout]
  dec0        3x3 conv to r^2 * head_channels, norm, LReLU (the paper's; the authors' code has a
              plain ReLU here), pixel shuffle by r = 2**num_pools back to the input size;
              head_channels = 8 * num_classes as in the authors' code
  head        5x5 conv to class logits
No conv has a bias. As in the authors' code, the convs of dec0 and head pad symmetrically (edge
included) instead of with zeros. 3D (ndim=3) uses the same layers with 3x3x3 kernels and a 3D
pixel shuffle; the paper's 3D network is a 3D U-Net (`UNet` with ndim=3). The outputs of
`enc<i>`, `bottleneck` and `dec1` are sown to 'intermediates' as `<block>_features`.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from unpaired_seg.nn.resfcn import modality_norm, pad_channels
from unpaired_seg.nn.sharing import NormSpec, Sharing, shared_or_per_modality
from unpaired_seg.ops import resample

UMMKD_WIDTHS = (16, 32, 64, 128, 256, 256, 512)
UMMKD_UNITS = (1, 1, 2, 2, 2, 2, 2)


def pixel_shuffle(x: jax.Array, r: int) -> jax.Array:
  """Moves channel blocks of r^d into r x ... x r spatial neighbourhoods (d spatial axes).

  Channel layout as the UMMKD code's `PS` (and PyTorch's PixelShuffle): for 2D,
  out[b, h * r + i, w * r + j, c] = x[b, h, w, c * r^2 + i * r + j]; in 3D the offset inside
  the block is (i * r + j) * r + k.

  Args:
    x: [B, *spatial, C * r^d].
    r: upscaling factor.

  Returns:
    [B, *(spatial * r), C].
  """
  d = x.ndim - 2
  channels = x.shape[-1]
  if r < 1 or channels % r ** d:
    raise ValueError(f"pixel_shuffle: {channels} channels are not a multiple of r^{d} = {r ** d}")
  spatial = x.shape[1:-1]
  c = channels // r ** d
  # [B, *S, C, r, ..., r] -> [B, S1, r, S2, r, ..., C]
  x = x.reshape(x.shape[:-1] + (c,) + (r,) * d)
  order = [0]
  for a in range(d):
    order += [1 + a, 2 + d + a]
  order.append(1 + d)
  x = x.transpose(order)
  return x.reshape((x.shape[0],) + tuple(n * r for n in spatial) + (c,))


def _symmetric_conv(x: jax.Array, conv: nn.Conv, kernel: int) -> jax.Array:
  """Runs a VALID conv after symmetric padding (TF 'SYMMETRIC': the edge sample is repeated)."""
  p = kernel // 2
  x = jnp.pad(x, [(0, 0)] + [(p, p)] * (x.ndim - 2) + [(0, 0)], mode="symmetric")
  return conv(x)


class LeakyResidualUnit(nn.Module):
  """[norm -> LReLU -> 3x3 conv (dilated) -> dropout] x 2 plus an identity/zero-padded shortcut."""
  features: int
  norm: NormSpec
  norm_groups: Sequence[str]
  ndim: int = 2
  dilation: int = 1
  dropout_rate: float = 0.0
  leak: float = 0.2

  @nn.compact
  def __call__(self, x: jax.Array, group: str, train: bool) -> jax.Array:
    if x.shape[-1] > self.features:
      raise ValueError(f"residual unit of {self.features} channels got {x.shape[-1]}; "
                       "widths must not decrease")
    y = x
    for i in range(2):
      y = modality_norm(self.norm, self.norm_groups, f"norm{i}")(y, group, train)
      y = nn.leaky_relu(y, self.leak)
      y = nn.Conv(self.features, (3,) * self.ndim, kernel_dilation=self.dilation, use_bias=False,
                  name=f"conv{i}")(y)
      y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    return y + pad_channels(x, self.features)


class Stage(nn.Module):
  """`units` residual units of one width (a dilation of 2 makes the bottleneck)."""
  features: int
  units: int
  norm: NormSpec
  norm_groups: Sequence[str]
  ndim: int = 2
  dilation: int = 1
  dropout_rate: float = 0.0
  leak: float = 0.2

  @nn.compact
  def __call__(self, x: jax.Array, group: str, train: bool) -> jax.Array:
    for i in range(self.units):
      x = LeakyResidualUnit(self.features, self.norm, self.norm_groups, self.ndim, self.dilation,
                            self.dropout_rate, self.leak, name=f"unit{i}")(x, group, train)
    return x


class ConvPair(nn.Module):
  """Two [norm -> LReLU -> 3x3 conv -> dropout] without a shortcut."""
  features: int
  norm: NormSpec
  norm_groups: Sequence[str]
  ndim: int = 2
  dropout_rate: float = 0.0
  leak: float = 0.2

  @nn.compact
  def __call__(self, x: jax.Array, group: str, train: bool) -> jax.Array:
    for i in range(2):
      x = modality_norm(self.norm, self.norm_groups, f"norm{i}")(x, group, train)
      x = nn.Conv(self.features, (3,) * self.ndim, use_bias=False,
                  name=f"conv{i}")(nn.leaky_relu(x, self.leak))
      x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return x


class ShuffleUp(nn.Module):
  """3x3 conv to r^d * channels, norm, LReLU, pixel shuffle by r."""
  channels: int
  factor: int
  norm: NormSpec
  norm_groups: Sequence[str]
  ndim: int = 2
  leak: float = 0.2

  @nn.compact
  def __call__(self, x: jax.Array, group: str, train: bool) -> jax.Array:
    conv = nn.Conv(self.factor ** self.ndim * self.channels, (3,) * self.ndim, padding="VALID",
                   use_bias=False, name="conv")
    x = _symmetric_conv(x, conv, 3)
    x = modality_norm(self.norm, self.norm_groups, "norm")(x, group, train)
    return pixel_shuffle(nn.leaky_relu(x, self.leak), self.factor)


class ShuffleHead(nn.Module):
  """5x5 conv (symmetric padding, no bias) to class logits."""
  num_classes: int
  ndim: int = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = nn.Conv(self.num_classes, (5,) * self.ndim, padding="VALID", use_bias=False,
                   name="conv")
    return _symmetric_conv(x, conv, 5)


def dilated_blocks(num_stages: int = len(UMMKD_WIDTHS)) -> tuple[str, ...]:
  """Block names of a DilatedResNet with `num_stages` widths, input to output."""
  if num_stages < 1:
    raise ValueError(f"a DilatedResNet needs at least 1 stage (len(widths)), got {num_stages}")
  return (("init",) + tuple(f"enc{i}" for i in range(num_stages))
          + ("bottleneck", "dec1", "dec0", "head"))


class DilatedResNet(nn.Module):
  """UMMKD's dilated residual network; spatial sizes must be divisible by 2**num_pools.

  Attributes:
    num_classes: output channels (background included).
    sharing: which blocks and norms are per modality (UMMKD: every kernel shared, norms per
      modality: the `chilopod` preset).
    widths: channels per stage; the bottleneck and dec1 use widths[-1]. Must not decrease.
    units: residual units per stage (same length as widths).
    norm: normalisation settings (UMMKD: batch norm, momentum 0.9, epsilon 1e-3).
    dropout_rate: drop probability after every conv of the residual units and dec1 (UMMKD: 0.25,
      keep 0.75). Needs a 'dropout' rng when training with a rate > 0.
    ndim: 2 for [B, H, W, C]; 3 for [B, D, H, W, C].
    num_pools: 2x2 max poolings, after the first `num_pools` stages; the pixel shuffle factor is
      2**num_pools.
    head_channels: channels after the pixel shuffle; 0 means 8 * num_classes (UMMKD).
    leak: negative slope of the leaky ReLUs.
  """
  num_classes: int
  sharing: Sharing
  widths: Sequence[int] = UMMKD_WIDTHS
  units: Sequence[int] = UMMKD_UNITS
  norm: NormSpec = NormSpec()
  dropout_rate: float = 0.25
  ndim: int = 2
  num_pools: int = 3
  head_channels: int = 0
  leak: float = 0.2

  def shuffle_channels(self) -> int:
    """Channels after the pixel shuffle (`r^d` times as many before it)."""
    return self.head_channels or 8 * self.num_classes

  def _validate(self, x: jax.Array) -> None:
    if self.ndim not in (2, 3):
      raise ValueError(f"DilatedResNet: ndim must be 2 or 3, got {self.ndim}")
    if len(self.units) != len(self.widths):
      raise ValueError(f"DilatedResNet: units has {len(self.units)} entries, widths "
                       f"{len(self.widths)}; give one unit count per stage")
    if any(b < a for a, b in zip(self.widths, self.widths[1:])):
      raise ValueError(f"DilatedResNet: widths must not decrease, got {tuple(self.widths)}")
    if not 0 <= self.num_pools <= len(self.widths):
      raise ValueError(f"DilatedResNet: num_pools must be in [0, {len(self.widths)}], "
                       f"got {self.num_pools}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"DilatedResNet: dropout_rate must be in [0, 1), got {self.dropout_rate}")
    if x.ndim != self.ndim + 2:
      raise ValueError(f"DilatedResNet with ndim={self.ndim} needs [B, *spatial({self.ndim}), C] "
                       f"input, got shape {x.shape}")
    factor = 2 ** self.num_pools
    if any(n % factor for n in x.shape[1:-1]):
      raise ValueError(f"DilatedResNet with {self.num_pools} poolings needs spatial sizes "
                       f"divisible by {factor}, got {x.shape[1:-1]}")

  @nn.compact
  def __call__(self, x: jax.Array, modality: str, train: bool) -> jax.Array:
    self._validate(x)
    group = self.sharing.norm_group(modality)
    common = dict(norm=self.norm, ndim=self.ndim, leak=self.leak)

    def make(name):
      base = name.split("_")[0]
      kw = dict(common, norm_groups=self.sharing.groups_for_block(name))
      if base == "init":
        return nn.Conv(self.widths[0], (3,) * self.ndim, use_bias=False, name=name)
      if base.startswith("enc"):
        i = int(base[3:])
        return Stage(self.widths[i], self.units[i], dropout_rate=self.dropout_rate, name=name,
                     **kw)
      if base == "bottleneck":
        return Stage(self.widths[-1], 2, dilation=2, dropout_rate=self.dropout_rate, name=name,
                     **kw)
      if base == "dec1":
        return ConvPair(self.widths[-1], dropout_rate=self.dropout_rate, name=name, **kw)
      if base == "dec0":
        return ShuffleUp(self.shuffle_channels(), 2 ** self.num_pools, name=name, **kw)
      return ShuffleHead(self.num_classes, self.ndim, name=name)

    def block(name, *args, **kwargs):
      return shared_or_per_modality(self, self.sharing, name, make, modality, *args, **kwargs)

    window = (2,) * self.ndim
    x = block("init", x)
    for i in range(len(self.widths)):
      x = block(f"enc{i}", x, group=group, train=train)
      self.sow("intermediates", f"enc{i}_features", x)
      if i < self.num_pools:
        x = resample.max_pool(x, window)
    x = block("bottleneck", x, group=group, train=train)
    self.sow("intermediates", "bottleneck_features", x)
    x = block("dec1", x, group=group, train=train)
    self.sow("intermediates", "dec1_features", x)
    x = block("dec0", x, group=group, train=train)
    return block("head", x)
