"""The supervised methods' state and the helpers of their losses and updates (no method class).

  state = SupervisedState(step=..., params=..., stats=..., opt_state=...)
  weights = labelled_class_weights(labels, labelled, num_classes)   # the UMMKD code's CE weights
"""

from collections.abc import Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from unpaired_seg.nn.presets import SHARING_PRESETS, sharing_preset
from unpaired_seg.nn.registry import network_blocks
from unpaired_seg.nn.sharing import NormSpec, Sharing

REGIMES = ("mixed", "alternate")
CLASS_WEIGHTS = ("none", "batch")

@flax.struct.dataclass
class SupervisedState:
  step: jax.Array
  params: dict      # trainable collections: 'params' and every 'norm_<group>'
  stats: dict       # running statistics: every 'stats_<group>'
  opt_state: optax.OptState


@flax.struct.dataclass
class SupervisedEMAState(SupervisedState):
  """The state with `train.ema_decay` > 0: bias-corrected moving averages of params and stats.

  A subclass rather than optional fields: orbax restores into the state's structure, and an
  extra field (even None) would stop checkpoints saved without EMA from restoring.
  """
  ema_params: dict
  ema_stats: dict


def sharing_from_config(config: ml_collections.ConfigDict, modalities: Sequence[str],
                        default: str) -> Sharing:
  """The `Sharing` of `model.sharing` (or the method's default preset) for the configured net."""
  name = config.model.sharing or default
  if name not in SHARING_PRESETS:
    raise ValueError(f"config key 'model.sharing': {name!r} is not one of "
                     f"{sorted(SHARING_PRESETS)}")
  return sharing_preset(name, network_blocks(config.model), modalities)


def norm_spec(config: ml_collections.ConfigDict, num_data_shards: int) -> NormSpec:
  norm = config.model.norm
  return NormSpec(kind=norm.kind, momentum=norm.momentum, epsilon=norm.epsilon,
                  num_groups=norm.num_groups, stat_shards=1 if norm.sync else num_data_shards)


def default_csa_layers(model_config: ml_collections.ConfigDict) -> tuple[str, str]:
  """Two adjacent layers in the middle of the network whose outputs are sown as features.

  U-Net and dilated net: the bottleneck and the first decoder block after it; ResFCN: the
  deepest encoder scale and the first upscore unit.
  """
  blocks = network_blocks(model_config)
  if model_config.name == "resfcn":
    encoders = [b for b in blocks if b.startswith("enc")]
    decoders = [b for b in blocks if b.startswith("dec")]
    return encoders[-1], decoders[0]
  after = blocks[blocks.index("bottleneck") + 1]
  return "bottleneck", after


def labelled_class_weights(labels: jax.Array, labelled: jax.Array, num_classes: int) -> jax.Array:
  """The UMMKD code's w_c = 1 - n_c / N, counted over the labelled samples only.

  With every sample labelled this is `losses.batch_class_weights`; unlabelled slices carry an
  all-background map that must not count as background.

  Args:
    labels: [B, *spatial] integer classes.
    labelled: [B] 0/1 weights.
    num_classes: C.

  Returns:
    [C] float32; all ones when no sample is labelled.
  """
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)             # [B, *S, C]
  mask = labelled.reshape((-1,) + (1,) * (onehot.ndim - 1)).astype(jnp.float32)
  counts = jnp.sum(onehot * mask, axis=tuple(range(onehot.ndim - 1)))          # [C]
  total = jnp.sum(mask) * np.prod(labels.shape[1:])
  return (1.0 - counts / jnp.maximum(total, 1.0)).astype(jnp.float32)


def deep_supervision_logits(sown) -> dict:
  """{'ds_logits_<level>': logits} from the DEEP_SUPERVISION collection of a U-Net pass.

  The collection is keyed by decoder block (`dec<level>` or `dec<level>_<modality>`), each with
  the tuple of its sown logits.
  """
  out = {}
  for block, values in (sown or {}).items():
    level = int(block.split("_")[0][3:])
    out[f"ds_logits_{level}"] = values["logits"][-1]
  return out


def mask_unlabelled(labels: jax.Array, labelled: jax.Array, num_classes: int) -> jax.Array:
  """Labels of unlabelled samples set to `num_classes` (outside [0, C): no class at all).

  `kd_loss` and `affinity_matrices` take no sample weight; an out-of-range label has an all-zero
  one-hot row there, so an unlabelled sample adds nothing to any class mean or class mask.
  """
  keep = labelled.reshape((-1,) + (1,) * (labels.ndim - 1)) > 0
  return jnp.where(keep, labels, num_classes)


def select_params_like(new, old, keep, params_def):
  """In every params-shaped subtree of an optimiser state, keeps `old` where `keep` is True."""
  if jax.tree.structure(new) == params_def:
    return jax.tree.map(lambda n, o, k: jnp.where(k, o, n), new, old, keep)
  if isinstance(new, tuple):
    items = [select_params_like(n, o, keep, params_def) for n, o in zip(new, old)]
    return type(new)(*items) if hasattr(new, "_fields") else tuple(items)
  return new
