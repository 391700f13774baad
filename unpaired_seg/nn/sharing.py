"""Which blocks of a network are shared across modalities and which are per modality.

A network is a sequence of named blocks (`enc0`, `enc1`, ..., `bottleneck`, `dec1`, `dec0`, `head`).
A `Sharing` says, block by block, whether the block's kernels are shared (one module, named after the
block) or per modality (one module per modality, named `<block>_<modality>`, all created at init), and
whether normalisation is per modality (collections `norm_<m>` / `stats_<m>`) or shared
(`norm_shared` / `stats_shared`). Per-modality kernels stay in `params`, under their own module names,
so `params/enc0_mr/...` and `params/enc0_ct/...` read clearly in any tree dump.
"""

import dataclasses
import fnmatch
from collections.abc import Callable, Sequence

import flax.linen as nn

SHARED_GROUP = "shared"


@dataclasses.dataclass(frozen=True)
class NormSpec:
  """Hashable normalisation settings passed down to every `ModalityNorm`."""
  kind: str = "batch"
  momentum: float = 0.9
  epsilon: float = 1e-5
  num_groups: int = 8
  stat_shards: int = 1


@dataclasses.dataclass(frozen=True)
class Sharing:
  """Block-by-block sharing of a network across modalities.

  Attributes:
    modalities: every modality the model serves.
    per_modality_blocks: glob patterns of block names whose kernels are per modality ('*' = all).
    norm_per_modality: True for per-modality normalisation collections, False for one shared set.
  """
  modalities: tuple[str, ...]
  per_modality_blocks: tuple[str, ...] = ()
  norm_per_modality: bool = True

  def is_per_modality(self, block: str) -> bool:
    return any(fnmatch.fnmatchcase(block, p) for p in self.per_modality_blocks)

  @property
  def norm_groups(self) -> tuple[str, ...]:
    return self.modalities if self.norm_per_modality else (SHARED_GROUP,)

  def groups_for_block(self, module_name: str) -> tuple[str, ...]:
    """Norm groups a block's module needs: a modality's own copy needs only that modality's."""
    if self.norm_per_modality:
      for m in self.modalities:
        if module_name.endswith(f"_{m}") and self.is_per_modality(module_name[: -len(m) - 1]):
          return (m,)
    return self.norm_groups

  def norm_group(self, modality: str) -> str:
    if modality not in self.modalities:
      raise ValueError(f"unknown modality {modality!r}; the model serves {self.modalities}")
    return modality if self.norm_per_modality else SHARED_GROUP


def shared_or_per_modality(parent: nn.Module, sharing: Sharing, block: str,
                           make: Callable[[str], nn.Module], modality: str, *args, **kwargs):
  """Runs block `block` for `modality`, building per-modality copies where the sharing says so.

  Must be called from inside `parent`'s compact method. At init every modality's copy is run once so
  that all of them exist; afterwards only the modality's own copy runs. Blocks that normalise take
  their norm group as the keyword argument `group`.

  Args:
    parent: the calling module (for `is_initializing`).
    sharing: the network's sharing specification.
    block: the block name.
    make: builds the block module given its name.
    modality: the modality of the current batch.
    *args: passed to the block, **kwargs likewise.

  Returns:
    The block's output for `modality`.
  """
  if not sharing.is_per_modality(block):
    return make(block)(*args, **kwargs)
  if parent.is_initializing():
    outputs = {}
    for m in sharing.modalities:
      # Each copy is initialised under its own modality's norm group (passed as `group=`).
      kw = {**kwargs, "group": sharing.norm_group(m)} if "group" in kwargs else kwargs
      outputs[m] = make(f"{block}_{m}")(*args, **kw)
    return outputs[modality]
  return make(f"{block}_{modality}")(*args, **kwargs)


def block_names_matching(patterns: Sequence[str], blocks: Sequence[str]) -> list[str]:
  """The blocks of `blocks` that any pattern names (for validating a sharing spec)."""
  return [b for b in blocks if any(fnmatch.fnmatchcase(b, p) for p in patterns)]
