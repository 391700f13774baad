"""A PyTorch twin of the `joint` method's supervised U-Net train step, for speed comparisons only.

The same network as `unpaired_seg.nn.unet.UNet` with one shared batch norm (configs/joint.py:
16 features, depth 4, [3x3 conv (no bias) -> batch norm -> ReLU] x 2 per block, 2 x 2 max pooling,
2 x 2 stride-2 transposed convolutions with bias, a 1 x 1 head), the same loss (soft Dice over the
foreground classes pooled over the batch + cross-entropy) and Adam. Never imported by the package;
`benchmarks/compare_torch.py` times it against the JAX step.
"""

import torch
from torch import nn


def conv_block(cin: int, cout: int) -> nn.Sequential:
  return nn.Sequential(
      nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5),
      nn.ReLU(inplace=True),
      nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout, momentum=0.1, eps=1e-5),
      nn.ReLU(inplace=True))


class UNet(nn.Module):
  def __init__(self, in_channels: int = 1, num_classes: int = 5, features: int = 16, depth: int = 4):
    super().__init__()
    widths = [features * 2 ** i for i in range(depth + 1)]
    self.enc = nn.ModuleList()
    cin = in_channels
    for w in widths[:-1]:
      self.enc.append(conv_block(cin, w))
      cin = w
    self.bottleneck = conv_block(widths[-2], widths[-1])
    self.up = nn.ModuleList()
    self.dec = nn.ModuleList()
    cin = widths[-1]
    for w in reversed(widths[:-1]):
      self.up.append(nn.ConvTranspose2d(cin, w, 2, stride=2))
      self.dec.append(conv_block(2 * w, w))
      cin = w
    self.head = nn.Conv2d(widths[0], num_classes, 1)
    self.pool = nn.MaxPool2d(2)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    skips = []
    for block in self.enc:
      x = block(x)
      skips.append(x)
      x = self.pool(x)
    x = self.bottleneck(x)
    for up, block, skip in zip(self.up, self.dec, reversed(skips)):
      x = block(torch.cat([up(x), skip], dim=1))
    return self.head(x)


def dice_ce_loss(logits: torch.Tensor, labels: torch.Tensor, smooth: float = 1e-5) -> torch.Tensor:
  """1 - mean foreground soft Dice (sums over batch and pixels) + mean cross-entropy."""
  num_classes = logits.shape[1]
  probs = torch.softmax(logits, dim=1)
  onehot = nn.functional.one_hot(labels, num_classes).permute(0, 3, 1, 2).to(probs.dtype)
  inter = (probs * onehot).sum(dim=(0, 2, 3))
  denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
  dice = (2 * inter + smooth) / (denom + smooth)
  return (1 - dice[1:].mean()) + nn.functional.cross_entropy(logits, labels)


class TrainStep:
  """One Adam step on a batch of [B, C, H, W] images and [B, H, W] labels."""

  def __init__(self, batch: int, height: int, width: int, in_channels: int = 1,
               num_classes: int = 5, features: int = 16, depth: int = 4,
               channels_last: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    self.model = UNet(in_channels, num_classes, features, depth).to(memory_format=fmt)
    self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    self.image = torch.randn(batch, in_channels, height, width, generator=g).to(memory_format=fmt)
    self.label = torch.randint(0, num_classes, (batch, height, width), generator=g)

  def __call__(self) -> float:
    self.optimizer.zero_grad(set_to_none=True)
    loss = dice_ce_loss(self.model(self.image), self.label)
    loss.backward()
    self.optimizer.step()
    return loss.item()   # waits for the step, as block_until_ready does on the JAX side
