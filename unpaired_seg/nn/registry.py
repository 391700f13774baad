"""Build a segmentation network from `config.model`, keyed by `config.model.name`.

  blocks = network_blocks(config.model)
  sharing = sharing_preset(config.model.sharing, blocks, ('mr', 'ct'))
  network = build_network(config.model, num_classes=5, sharing=sharing, norm=NormSpec())

Keys of `config.model` read per network (besides `name`):
  unet     features, depth, ndim
  resfcn   filters, units_per_scale, strides, dropout, ndim
  dilated  widths, dropout, head_channels (0 = 8 * classes), ndim
"""

from collections.abc import Callable

import flax.linen as nn
import ml_collections

from unpaired_seg.nn.dilated import DilatedResNet, dilated_blocks
from unpaired_seg.nn.resfcn import ResFCN, resfcn_blocks
from unpaired_seg.nn.sharing import NormSpec, Sharing, block_names_matching
from unpaired_seg.nn.unet import UNet, unet_blocks

NETWORK_KEYS: dict[str, tuple[str, ...]] = {
    "unet": ("features", "depth", "ndim"),
    "resfcn": ("filters", "units_per_scale", "strides", "dropout", "ndim"),
    "dilated": ("widths", "dropout", "head_channels", "ndim"),
}


def _keys(model_config: ml_collections.ConfigDict) -> tuple[str, dict]:
  """The network name and the values of its keys; a clear error for a missing one."""
  name = model_config.name
  if name not in NETWORK_KEYS:
    raise ValueError(f"config key 'model.name': unknown network {name!r}; "
                     f"choose one of {sorted(NETWORK_KEYS)}")
  values = {}
  for key in NETWORK_KEYS[name]:
    if key not in model_config:
      raise ValueError(f"config key 'model.{key}' is needed by model.name={name!r}")
    values[key] = model_config[key]
  return name, values


def _tuple(value) -> tuple:
  return tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in value)


_BLOCKS: dict[str, Callable[[dict], tuple[str, ...]]] = {
    "unet": lambda k: unet_blocks(k["depth"]),
    "resfcn": lambda k: resfcn_blocks(len(k["filters"])),
    "dilated": lambda k: dilated_blocks(len(k["widths"])),
}


def network_blocks(model_config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The block names of the configured network, input to output (for `sharing_preset`)."""
  name, keys = _keys(model_config)
  return _BLOCKS[name](keys)


def build_network(model_config: ml_collections.ConfigDict, num_classes: int, sharing: Sharing,
                  norm: NormSpec) -> nn.Module:
  """The configured network.

  Args:
    model_config: `config.model` (name and the keys listed in NETWORK_KEYS).
    num_classes: output channels, background included.
    sharing: per-modality blocks and norms; every block pattern must name a block of the network.
    norm: normalisation settings for every norm layer.

  Returns:
    An unbound Flax module called as `(x, modality, train)`.
  """
  name, k = _keys(model_config)
  blocks = _BLOCKS[name](k)
  unknown = [p for p in sharing.per_modality_blocks if not block_names_matching([p], blocks)]
  if unknown:
    raise ValueError(f"sharing names blocks {unknown} that model.name={name!r} does not have; "
                     f"its blocks are {list(blocks)}")
  if name == "unet":
    return UNet(num_classes=num_classes, sharing=sharing, features=k["features"],
                depth=k["depth"], ndim=k["ndim"], norm=norm,
                deep_supervision=bool(model_config.get("deep_supervision", False)))
  if name == "resfcn":
    return ResFCN(num_classes=num_classes, sharing=sharing, filters=tuple(k["filters"]),
                  units_per_scale=k["units_per_scale"], strides=_tuple(k["strides"]),
                  ndim=k["ndim"], norm=norm, dropout=float(k["dropout"]))
  return DilatedResNet(num_classes=num_classes, sharing=sharing, widths=tuple(k["widths"]),
                       units=_units_for(len(k["widths"])), norm=norm,
                       dropout_rate=float(k["dropout"]), ndim=k["ndim"],
                       head_channels=k["head_channels"])


def _units_for(num_stages: int) -> tuple[int, ...]:
  """UMMKD's units per stage, (1, 1, 2, 2, ...), for any number of stages."""
  return tuple(1 if i < 2 else 2 for i in range(num_stages))
