"""Named sharing settings, from one network per modality to one network for all.

A preset names the ROLES of blocks whose kernels are per modality; `sharing_preset` maps the roles
onto the block names of a given network, so one preset serves the U-Net, the ResFCN and the dilated
network alike:

  input           `init` (the ResFCN's and the dilated net's first conv; the U-Net has none)
  encoder         `enc<i>` blocks, except the deepest when the network has no bottleneck
  first_encoder   the shallowest encoder block (the "first-scale residual units")
  middle          `bottleneck` (U-Net, dilated net: its dilated units); otherwise the deepest
                  `enc<i>` (ResFCN: its last encoder scale)
  decoder         `dec<i>` blocks
  head            `head`

  blocks = unet_blocks(depth=4)
  sharing = sharing_preset('y_shaped', blocks, ('mr', 'ct'))
  sharing.per_modality_blocks   # ('enc0', 'enc1', 'enc2', 'enc3')

In every preset but `joint` the normalisation (affine parameters and statistics) is per modality.
"""

import dataclasses
import re
from collections.abc import Sequence

from unpaired_seg.nn.sharing import Sharing

ROLES = ("input", "encoder", "first_encoder", "middle", "decoder", "head")


@dataclasses.dataclass(frozen=True)
class SharingPreset:
  """A named sharing setting.

  Attributes:
    per_modality_roles: block roles whose kernels are per modality (see ROLES).
    norm_per_modality: per-modality normalisation collections, or one shared set.
    description: what is shared and what is not, for logs and docs.
  """
  per_modality_roles: tuple[str, ...]
  norm_per_modality: bool
  description: str


_ALL = ("input", "encoder", "middle", "decoder", "head")

SHARING_PRESETS: dict[str, SharingPreset] = {
    "individual": SharingPreset(
        _ALL, True,
        "nothing shared: one network per modality (every block and norm per modality)"),
    "joint": SharingPreset(
        (), False,
        "everything shared: every kernel and ONE set of norm parameters and statistics"),
    "chilopod": SharingPreset(
        (), True,
        "every kernel shared, normalisation per modality (UMMKD's MSBN)"),
    "y_shaped": SharingPreset(
        ("input", "encoder"), True,
        "per-modality input and encoder blocks; middle (bottleneck), decoder and head shared"),
    "x_shaped": SharingPreset(
        ("input", "encoder", "decoder", "head"), True,
        "per-modality encoder and decoder (input and head included); only the middle (bottleneck "
        "/ deepest encoder scale) shared"),
    "dualstream_v1": SharingPreset(
        ("input", "encoder", "middle"), True,
        "DualStream V1: the whole encoder per modality (its deepest scale included); decoder and "
        "head shared"),
    "dualstream_v2": SharingPreset(
        ("input", "first_encoder"), True,
        "DualStream V2: separate streams only at the input and the first-scale units; the rest "
        "shared"),
    "dualstream_v3": SharingPreset(
        ("decoder", "head"), True,
        "DualStream V3: shared encoder (middle included); decoder and head per modality"),
    "dualstream_v4": SharingPreset(
        ("input", "encoder", "decoder", "head"), True,
        "DualStream V4 (X-shaped): per-modality encoders sharing only the last encoder scale, "
        "per-modality decoder and head; the same blocks as x_shaped"),
}

_ENC = re.compile(r"enc(\d+)")
_DEC = re.compile(r"dec(\d+)")


def block_roles(blocks: Sequence[str]) -> dict[str, tuple[str, ...]]:
  """The roles of each block of a network (a block may have two: encoder and first_encoder).

  Args:
    blocks: the network's block names, e.g. `unet_blocks(4)`.

  Returns:
    {block: roles}, in the order of `blocks`.
  """
  encoders = {}
  for b in blocks:
    m = _ENC.fullmatch(b)
    if m:
      encoders[b] = int(m.group(1))
    elif not (b in ("init", "bottleneck", "head") or _DEC.fullmatch(b)):
      raise ValueError(f"block {b!r} has no sharing role; block names are init, enc<i>, "
                       "bottleneck, dec<i> and head")
  middle = "bottleneck" if "bottleneck" in blocks else (
      max(encoders, key=encoders.get) if encoders else None)
  plain = {b: i for b, i in encoders.items() if b != middle}
  first = min(plain, key=plain.get) if plain else None
  roles = {}
  for b in blocks:
    if b == "init":
      roles[b] = ("input",)
    elif b == middle:
      roles[b] = ("middle",)
    elif b in plain:
      roles[b] = ("encoder", "first_encoder") if b == first else ("encoder",)
    elif b == "head":
      roles[b] = ("head",)
    else:
      roles[b] = ("decoder",)
  return roles


def sharing_preset(name: str, blocks: Sequence[str], modalities: Sequence[str]) -> Sharing:
  """The `Sharing` of preset `name` for a network with block names `blocks`.

  Args:
    name: a key of SHARING_PRESETS (config key `model.sharing`).
    blocks: the network's block names (`network_blocks(config.model)`).
    modalities: every modality the model serves.

  Returns:
    A Sharing listing the per-modality blocks by name, in network order.
  """
  if name not in SHARING_PRESETS:
    raise ValueError(f"sharing preset (model.sharing) {name!r} is not one of "
                     f"{sorted(SHARING_PRESETS)}")
  if not modalities:
    raise ValueError("sharing_preset: modalities must name at least one modality")
  preset = SHARING_PRESETS[name]
  wanted = set(preset.per_modality_roles)
  per_modality = tuple(b for b, r in block_roles(blocks).items() if wanted.intersection(r))
  return Sharing(tuple(modalities), per_modality, preset.norm_per_modality)
