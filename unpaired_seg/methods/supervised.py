"""Supervised segmentation with a configurable amount of sharing across modalities.

The sharing axis of one network definition, from nothing shared to everything shared:
  individual  one network per modality (UNet-single): every block and norm per modality
  joint       one network (UNet-both): every kernel and one set of norm statistics shared; all
              modalities go through it in one mixed batch

  python -m unpaired_seg.main --config=configs/individual.py --workdir=runs/individual
"""

import functools
from collections.abc import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from unpaired_seg.methods.base import count_parameters
from unpaired_seg.nn.norms import stats_collection
from unpaired_seg.nn.sharing import NormSpec, Sharing
from unpaired_seg.nn.unet import UNet
from unpaired_seg.ops import losses

# name -> (blocks whose kernels are per modality, per-modality normalisation)
SHARING_PRESETS: dict[str, tuple[tuple[str, ...], bool]] = {
    "individual": (("*",), True),
    "joint": ((), False),
}


@flax.struct.dataclass
class SupervisedState:
  step: jax.Array
  params: dict      # trainable collections: 'params' and every 'norm_<group>'
  stats: dict       # running statistics: every 'stats_<group>'
  opt_state: optax.OptState


def sharing_from_config(config: ml_collections.ConfigDict, modalities: Sequence[str],
                        default: str) -> Sharing:
  name = config.model.sharing or default
  if name not in SHARING_PRESETS:
    raise ValueError(f"config key 'model.sharing': {name!r} is not one of {sorted(SHARING_PRESETS)}")
  blocks, norm_per_modality = SHARING_PRESETS[name]
  return Sharing(tuple(modalities), blocks, norm_per_modality)


def build_network(config: ml_collections.ConfigDict, num_classes: int, sharing: Sharing,
                  num_data_shards: int) -> nn.Module:
  norm = config.model.norm
  spec = NormSpec(kind=norm.kind, momentum=norm.momentum, epsilon=norm.epsilon,
                  num_groups=norm.num_groups, stat_shards=1 if norm.sync else num_data_shards)
  if config.model.name == "unet":
    return UNet(num_classes=num_classes, sharing=sharing, features=config.model.features,
                depth=config.model.depth, ndim=config.model.ndim, norm=spec)
  raise ValueError(f"config key 'model.name': unknown network {config.model.name!r}")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  decay = config.train.lr_decay
  return optax.exponential_decay(config.train.learning_rate, transition_steps=decay.every,
                                 decay_rate=decay.rate)


class Supervised:
  """Dice + cross-entropy on every labelled slice, one network with the configured sharing."""

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int,
               modalities: Sequence[str], num_data_shards: int = 1, default_sharing: str = "joint"):
    self.config = config
    self.modalities = tuple(modalities)
    self.num_classes = num_classes
    self.sharing = sharing_from_config(config, modalities, default_sharing)
    self.network = build_network(config, num_classes, self.sharing, num_data_shards)
    self.tx = optax.adam(learning_rate_schedule(config))
    # One forward pass over the concatenated modalities when nothing is per modality: that is the
    # mixed batch of UNet-both, with one set of batch statistics over all of it.
    self.mixed_batch = not self.sharing.norm_per_modality and not self.sharing.per_modality_blocks

  # -- state ----------------------------------------------------------------------------------
  def init(self, rng: jax.Array, example_batch: dict) -> SupervisedState:
    x = example_batch[self.modalities[0]]["image"]
    # Jitted: an eager init dispatches (and compiles) every op one by one.
    init = jax.jit(functools.partial(self.network.init, modality=self.modalities[0], train=False))
    variables = init(rng, x)
    params = {k: v for k, v in variables.items() if not k.startswith("stats_")}
    stats = {k: v for k, v in variables.items() if k.startswith("stats_")}
    return SupervisedState(step=jnp.zeros((), jnp.int32), params=params, stats=stats,
                           opt_state=self.tx.init(params))

  def parameter_counts(self, state: SupervisedState) -> dict[str, int]:
    counts = {k: count_parameters(v) for k, v in state.params.items()}
    counts["trainable_total"] = sum(counts.values())
    return counts

  def describe(self) -> dict:
    return {"network": type(self.network).__name__,
            "per_modality_blocks": list(self.sharing.per_modality_blocks),
            "norm_groups": list(self.sharing.norm_groups), "mixed_batch": self.mixed_batch}

  # -- forward --------------------------------------------------------------------------------
  def apply(self, params: dict, stats: dict, image: jax.Array, modality: str, train: bool):
    """Returns (logits, updated stats); only the modality's own stats collection is mutable."""
    variables = {**params, **stats}
    if not train:
      return self.network.apply(variables, image, modality=modality, train=False), stats
    group = self.sharing.norm_group(modality)
    mutable = [stats_collection(group)] if stats_collection(group) in stats else []
    logits, updated = self.network.apply(variables, image, modality=modality, train=True,
                                         mutable=mutable)
    return logits, {**stats, **updated}

  def predict(self, state: SupervisedState, image: jax.Array, modality: str) -> jax.Array:
    return self.apply(state.params, state.stats, image, modality, train=False)[0]

  # -- training -------------------------------------------------------------------------------
  def segmentation_loss(self, logits: jax.Array, labels: jax.Array, labelled: jax.Array):
    return losses.dice_ce_loss(logits, labels, sample_weight=labelled,
                               dice_weight=self.config.loss.dice_weight,
                               ce_weight=self.config.loss.ce_weight)

  def loss_fn(self, params: dict, stats: dict, batch: dict):
    metrics = {}
    if self.mixed_batch:
      image = jnp.concatenate([batch[m]["image"] for m in self.modalities])
      logits, stats = self.apply(params, stats, image, self.modalities[0], train=True)
      sizes = [batch[m]["image"].shape[0] for m in self.modalities]
      per_modality = jnp.split(logits, _cumulative(sizes))
      total = 0.0
      for m, lg in zip(self.modalities, per_modality):
        metrics[f"seg_{m}"] = self.segmentation_loss(lg, batch[m]["label"], batch[m]["labelled"])
        total = total + metrics[f"seg_{m}"]
    else:
      total = 0.0
      for m in self.modalities:
        lg, stats = self.apply(params, stats, batch[m]["image"], m, train=True)
        metrics[f"seg_{m}"] = self.segmentation_loss(lg, batch[m]["label"], batch[m]["labelled"])
        total = total + metrics[f"seg_{m}"]
    metrics["loss"] = total
    return total, (stats, metrics)

  def train_step(self, state: SupervisedState, batch: dict, rng: jax.Array):
    del rng  # no stochastic layers
    grads, (stats, metrics) = jax.grad(self.loss_fn, has_aux=True)(state.params, state.stats, batch)
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return state.replace(step=state.step + 1, params=params, stats=stats,
                         opt_state=opt_state), metrics


def _cumulative(sizes: Sequence[int]) -> list[int]:
  out, acc = [], 0
  for s in sizes[:-1]:
    acc += s
    out.append(acc)
  return out


individual = functools.partial(Supervised, default_sharing="individual")
joint = functools.partial(Supervised, default_sharing="joint")
