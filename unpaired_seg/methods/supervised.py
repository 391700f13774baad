"""Supervised segmentation over one network definition with a configurable amount of sharing.

The shared-kernel family of unpaired multi-modal segmentation, as plug-ins of one class:

  individual  one network per modality (UNet-single): every block and norm per modality
  joint       one network (UNet-both): every kernel and one set of norm statistics shared; all
              modalities go through it in one mixed batch
  joint_kd    joint + UMMKD's knowledge distillation between the modalities
  y_shaped    per-modality encoders, shared bottleneck, decoder and head
  x_shaped    per-modality encoders and decoders; only the bottleneck shared
  dualstream  DualStream V1..V4 (`model.sharing` = dualstream_v1 .. dualstream_v4), alternate
              single-modality batches
  chilopod    every kernel shared, normalisation per modality (UMMKD's MSBN)
  ummkd       chilopod + knowledge distillation (alpha / 2 * L_kd)
  affinity    chilopod + the affinity loss between two nearby layers, one all-ones mask
  csa         chilopod + the class-specific affinity loss (Chen et al.)

Loss (config section `loss`):
  sum_m [dice_weight * Dice_m + ce_weight * CE_m]
    + kd_weight / 2 * L_kd            (kd_weight = UMMKD's alpha; 0 switches it off)
    + csa_weight * L_csa              (lambda; 0 switches it off)
    + weight_decay * L2(kernels and norm parameters)   (eta; tf.nn.l2_loss convention)
  `loss.class_weights = 'batch'` replaces the CE by the UMMKD code's: class weights
  1 - n_c / N counted over the labelled pixels of the modality's batch, probabilities clipped to
  [loss.ce_clip, 1].

Training regimes (`train.regime`):
  mixed      every step sees a batch of every modality (UMMKD, CSA: 8 + 8) and sums their losses.
  alternate  one modality per step, in `data.modalities` order: step s trains modality
             s mod M (DualStream: one MR step, then one CT step). The batch still holds every
             modality (the host batch stays a pure function of the step, so resuming is exact);
             the trainer compiles one step per modality (`step_variants`) and picks the step's
             on the host (`variant_of_step`), which runs that modality's forward and backward
             pass only. As an optimiser that skips
             variables without a gradient (TF's Adam), the inactive modality's per-modality
             kernels, norm parameters, their Adam moments and its running statistics are left
             exactly as they were; shared kernels take an ordinary Adam step.

Optimiser and schedule (`train.optimizer`, `train.lr_schedule`, `train.grad_clip`, ...) are
built by `unpaired_seg/optim.py`. `train.ema_decay` > 0 keeps an exponential moving average of
the weights and the running statistics in the state (`SupervisedEMAState`); `predict`, and so
validation, the best checkpoint's choice and the test, then use the averages.

  python -m unpaired_seg.main --config=configs/ummkd.py --workdir=runs/ummkd
  python -m unpaired_seg.main --config=configs/dualstream.py:variant=v2,tiny --workdir=/tmp/ds
"""

import functools
from collections.abc import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from unpaired_seg import rng as rng_lib
from unpaired_seg.methods.base import Method, count_parameters
from unpaired_seg.nn.norms import norm_collection, stats_collection
from unpaired_seg.nn.presets import SHARING_PRESETS, sharing_preset
from unpaired_seg.nn.registry import build_network, network_blocks
from unpaired_seg.nn.sharing import NormSpec, Sharing
from unpaired_seg.nn.unet import DEEP_SUPERVISION
from unpaired_seg.ops import losses, precision
# learning_rate_schedule: also importable from here, where it lived before optim.py.
from unpaired_seg.optim import learning_rate_schedule, make_optimizer

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


def _select_params_like(new, old, keep, params_def):
  """In every params-shaped subtree of an optimiser state, keeps `old` where `keep` is True."""
  if jax.tree.structure(new) == params_def:
    return jax.tree.map(lambda n, o, k: jnp.where(k, o, n), new, old, keep)
  if isinstance(new, tuple):
    items = [_select_params_like(n, o, keep, params_def) for n, o in zip(new, old)]
    return type(new)(*items) if hasattr(new, "_fields") else tuple(items)
  return new


class Supervised(Method):
  """Dice + CE on every labelled slice, with optional KD, (class-specific) affinity and L2.

  Args:
    config: the resolved config (sections model, loss, train).
    num_classes: output classes, background included.
    modalities: the modalities, in `data.modalities` order (alternate regime: this order).
    num_data_shards: data-parallel devices (per-device batch statistics when not synced).
    default_sharing: the method's preset when `model.sharing` is ''.
    kd: the method distils between modalities (needs loss.kd_weight > 0).
    csa: None, or 'class_specific' / 'plain': the method's affinity term (needs
      loss.csa_weight > 0 and the matching loss.csa_class_specific).
    sharing_prefix: when set, `model.sharing` must start with it (dualstream: 'dualstream_').
  """

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int,
               modalities: Sequence[str], num_data_shards: int = 1, default_sharing: str = "joint",
               kd: bool = False, csa: str | None = None, sharing_prefix: str = ""):
    self.config = config
    self.modalities = tuple(modalities)
    self.num_classes = num_classes
    self.sharing_name = config.model.sharing or default_sharing
    if sharing_prefix and not self.sharing_name.startswith(sharing_prefix):
      raise ValueError(f"config key 'model.sharing': method {config.method!r} needs a "
                       f"{sharing_prefix}* preset, got {self.sharing_name!r}")
    self.sharing = sharing_from_config(config, modalities, default_sharing)
    self.network = build_network(config.model, num_classes, self.sharing,
                                 norm_spec(config, num_data_shards))
    loss = config.loss
    self.regime = config.train.regime
    if self.regime not in REGIMES:
      raise ValueError(f"config key 'train.regime': {self.regime!r} is not one of {REGIMES}")
    if loss.class_weights not in CLASS_WEIGHTS:
      raise ValueError(f"config key 'loss.class_weights': {loss.class_weights!r} is not one of "
                       f"{CLASS_WEIGHTS}")
    if kd and not loss.kd_weight > 0:
      raise ValueError(f"method {config.method!r} distils: config key 'loss.kd_weight' must be "
                       f"> 0, got {loss.kd_weight}")
    if csa is not None:
      if not loss.csa_weight > 0:
        raise ValueError(f"method {config.method!r} uses the affinity loss: config key "
                         f"'loss.csa_weight' must be > 0, got {loss.csa_weight}")
      if loss.csa_class_specific != (csa == "class_specific"):
        raise ValueError(f"method {config.method!r}: config key 'loss.csa_class_specific' must "
                         f"be {csa == 'class_specific'}")
    self.use_kd = loss.kd_weight > 0
    self.use_csa = loss.csa_weight > 0
    if (self.use_kd or self.use_csa) and len(self.modalities) < 2:
      raise ValueError("config keys 'loss.kd_weight' / 'loss.csa_weight' compare modalities: "
                       "data.modalities needs at least two")
    if self.regime == "alternate" and (self.use_kd or self.use_csa):
      raise ValueError("config key 'train.regime': 'alternate' sees one modality per step, so "
                       "it cannot compare modalities (loss.kd_weight and loss.csa_weight must "
                       "be 0)")
    self.csa_layers = tuple(loss.csa_layers) or default_csa_layers(config.model)
    if self.use_csa and len(self.csa_layers) != 2:
      raise ValueError(f"config key 'loss.csa_layers' must name two blocks (or be empty for "
                       f"the network's default), got {tuple(loss.csa_layers)}")
    self.tx = make_optimizer(config.train, learning_rate_schedule(config.train))
    self.ema_decay = float(config.train.ema_decay)
    self.compute_dtype = precision.compute_dtype(config.train.get("compute_dtype", "float32"))
    self.deep_supervision = bool(config.model.get("deep_supervision", False))
    if self.deep_supervision and config.model.name != "unet":
      raise ValueError(f"config key 'model.deep_supervision' is for model.name='unet', not "
                       f"{config.model.name!r}")
    # One forward pass over the concatenated modalities when nothing is per modality: that is the
    # mixed batch of UNet-both, with one set of batch statistics over all of it.
    self.mixed_batch = (not self.sharing.norm_per_modality and not self.sharing.per_modality_blocks
                        and self.regime == "mixed")

  # -- state ----------------------------------------------------------------------------------
  def init(self, rng: jax.Array, example_batch: dict) -> SupervisedState:
    x = example_batch[self.modalities[0]]["image"]
    # Jitted: an eager init dispatches (and compiles) every op one by one.
    init = jax.jit(functools.partial(self.network.init, modality=self.modalities[0], train=False))
    variables = init(rng, x)
    params = {k: v for k, v in variables.items() if not k.startswith(("stats_", "intermediates"))}
    stats = {k: v for k, v in variables.items() if k.startswith("stats_")}
    state = dict(step=jnp.zeros((), jnp.int32), params=params, stats=stats,
                 opt_state=self.tx.init(params))
    if not self.ema_decay:
      return SupervisedState(**state)
    # Copies: the trainer donates the state, and one buffer cannot be donated twice.
    copy = functools.partial(jax.tree.map, lambda x: jnp.array(x, copy=True))
    return SupervisedEMAState(**state, ema_params=copy(params), ema_stats=copy(stats))

  def parameter_counts(self, state: SupervisedState) -> dict[str, int]:
    counts = {k: count_parameters(v) for k, v in state.params.items()}
    counts["trainable_total"] = sum(counts.values())
    return counts

  def describe(self) -> dict:
    return {"network": type(self.network).__name__, "sharing": self.sharing_name,
            "per_modality_blocks": list(self.sharing.per_modality_blocks),
            "norm_groups": list(self.sharing.norm_groups), "mixed_batch": self.mixed_batch,
            "regime": self.regime, "kd": self.use_kd, "csa": self.use_csa,
            "csa_layers": list(self.csa_layers) if self.use_csa else []}

  # -- forward --------------------------------------------------------------------------------
  def apply(self, params: dict, stats: dict, image: jax.Array, modality: str, train: bool,
            rng: jax.Array | None = None, features: bool = False):
    """Returns (logits, updated stats, features).

    Only the modality's own stats collection is mutable. `features` collects the sown
    'intermediates' (a dict `<block>_features` -> array), else it is None. In training with deep
    supervision the dict also holds `ds_logits_<level>`: the decoder's logits at 1 / 2**level
    of the resolution.
    """
    if self.compute_dtype != jnp.float32:
      # The float32 parameters stay the optimiser's; the network computes with a cast copy.
      params = precision.cast_floating(params, self.compute_dtype)
      image = image.astype(self.compute_dtype)
    variables = {**params, **stats}
    mutable = ["intermediates"] if features else []
    deep = train and self.deep_supervision
    if deep:
      mutable.append(DEEP_SUPERVISION)
    if train:
      group = self.sharing.norm_group(modality)
      if stats_collection(group) in stats:
        mutable.append(stats_collection(group))
    rngs = {"dropout": rng} if (train and rng is not None) else None
    if not mutable:
      logits = self.network.apply(variables, image, modality=modality, train=train, rngs=rngs)
      return logits.astype(jnp.float32), stats, None
    logits, updated = self.network.apply(variables, image, modality=modality, train=train,
                                         mutable=mutable, rngs=rngs)
    updated = dict(updated)
    inter = updated.pop("intermediates", None)
    sown = updated.pop(DEEP_SUPERVISION, None)
    feats = None
    if features:
      feats = precision.to_float32({k: v[-1] for k, v in (inter or {}).items()})
    if deep:
      feats = {**(feats or {}), **precision.to_float32(deep_supervision_logits(sown))}
    return logits.astype(jnp.float32), {**stats, **updated}, feats

  def predict(self, state: SupervisedState, image: jax.Array, modality: str) -> jax.Array:
    if self.ema_decay:
      return self.apply(state.ema_params, state.ema_stats, image, modality, train=False)[0]
    return self.apply(state.params, state.stats, image, modality, train=False)[0]

  # -- losses ---------------------------------------------------------------------------------
  def segmentation_loss(self, logits: jax.Array, labels: jax.Array, labelled: jax.Array):
    loss = self.config.loss
    if loss.class_weights == "none":
      return losses.dice_ce_loss(logits, labels, sample_weight=labelled,
                                 dice_weight=loss.dice_weight, ce_weight=loss.ce_weight)
    dice = losses.soft_dice_loss(logits, labels, sample_weight=labelled)
    weights = labelled_class_weights(labels, labelled, self.num_classes)
    ce = losses.clipped_weighted_cross_entropy(logits, labels, weights, clip=loss.ce_clip,
                                               sample_weight=labelled)
    return loss.dice_weight * dice + loss.ce_weight * ce

  def deep_supervised_loss(self, full: jax.Array, feats: dict, batch: dict) -> jax.Array:
    """nnU-Net's weighting: the loss at 1 / 2**l of the resolution weighs 1 / 2**l, the weights
    normalised to sum to 1; labels are subsampled by nearest neighbour (every 2**l-th voxel)."""
    terms, weights = [full], [1.0]
    for key in sorted(k for k in feats if k.startswith("ds_logits_")):
      level = int(key.rsplit("_", 1)[1])
      f = 2 ** level
      labels = batch["label"][(slice(None),) + (slice(None, None, f),) * (batch["label"].ndim - 1)]
      terms.append(self.segmentation_loss(feats[key], labels, batch["labelled"]))
      weights.append(1.0 / f)
    return sum(w * t for w, t in zip(weights, terms)) / sum(weights)

  def kd_term(self, logits: dict, batch: dict) -> jax.Array:
    """L_kd averaged over the modality pairs (one pair for two modalities), labelled pixels only."""
    loss = self.config.loss
    terms = []
    for i, a in enumerate(self.modalities):
      for b in self.modalities[i + 1:]:
        la = mask_unlabelled(batch[a]["label"], batch[a]["labelled"], self.num_classes)
        lb = mask_unlabelled(batch[b]["label"], batch[b]["labelled"], self.num_classes)
        terms.append(losses.kd_loss(logits[a], la, logits[b], lb,
                                    temperature=loss.kd_temperature, absent=loss.kd_absent))
    return sum(terms) / len(terms)

  def csa_term(self, feats: dict, batch: dict) -> jax.Array:
    """L_csa between the configured pair of layers, averaged over the modality pairs."""
    loss = self.config.loss
    names = [f"{layer}_features" for layer in self.csa_layers]
    for m, f in feats.items():
      missing = [n for n in names if n not in f]
      if missing:
        raise ValueError(f"config key 'loss.csa_layers' {self.csa_layers}: the network sows no "
                         f"{missing}; it sows {sorted(f)}")
    terms = []
    for i, a in enumerate(self.modalities):
      for b in self.modalities[i + 1:]:
        la = mask_unlabelled(batch[a]["label"], batch[a]["labelled"], self.num_classes)
        lb = mask_unlabelled(batch[b]["label"], batch[b]["labelled"], self.num_classes)
        terms.append(losses.csa_loss(tuple(feats[a][n] for n in names), la,
                                     tuple(feats[b][n] for n in names), lb, self.num_classes,
                                     class_specific=loss.csa_class_specific))
    return sum(terms) / len(terms)

  def weight_decay_term(self, params: dict) -> jax.Array:
    """L2 of the kernels and the norm parameters (UMMKD's eta term), 0.5 * sum of squares."""
    return losses.l2_weight_decay(
        params, include=lambda path: path.endswith("kernel") or path.startswith("norm_"))

  def forward_all(self, params: dict, stats: dict, batch: dict, rng: jax.Array,
                  modalities: Sequence[str]):
    """Training forward pass of `modalities`: (logits, stats, features) per modality."""
    logits, feats = {}, {}
    if self.mixed_batch:
      image = jnp.concatenate([batch[m]["image"] for m in modalities])
      out, stats, f = self.apply(params, stats, image, modalities[0], train=True, rng=rng,
                                 features=self.use_csa)
      sizes = [batch[m]["image"].shape[0] for m in modalities]
      splits = np.cumsum(sizes)[:-1].tolist()
      for m, lg in zip(modalities, jnp.split(out, splits)):
        logits[m] = lg
      if f is not None:
        parts = {k: jnp.split(v, splits) for k, v in f.items()}
        for i, m in enumerate(modalities):
          feats[m] = {k: v[i] for k, v in parts.items()}
    else:
      for i, m in enumerate(modalities):
        logits[m], stats, f = self.apply(params, stats, batch[m]["image"], m, train=True,
                                         rng=jax.random.fold_in(rng, i), features=self.use_csa)
        if f is not None:
          feats[m] = f
    return logits, stats, feats

  def loss_fn(self, params: dict, stats: dict, batch: dict, rng: jax.Array | None = None,
              modalities: Sequence[str] | None = None):
    """Total loss of `modalities` (default: all), with (stats, metrics) as auxiliary output."""
    modalities = tuple(modalities or self.modalities)
    if rng is None:
      rng = rng_lib.prng_key(0)
    logits, stats, feats = self.forward_all(params, stats, batch, rng, modalities)
    metrics = {}
    total = jnp.zeros((), jnp.float32)
    for m in modalities:
      metrics[f"seg_{m}"] = self.segmentation_loss(logits[m], batch[m]["label"],
                                                   batch[m]["labelled"])
      if self.deep_supervision:
        metrics[f"seg_{m}"] = self.deep_supervised_loss(metrics[f"seg_{m}"], feats[m], batch[m])
      total = total + metrics[f"seg_{m}"]
    loss = self.config.loss
    if self.use_kd:
      metrics["kd"] = self.kd_term(logits, batch)
      total = total + loss.kd_weight / 2 * metrics["kd"]
    if self.use_csa:
      metrics["csa"] = self.csa_term(feats, batch)
      total = total + loss.csa_weight * metrics["csa"]
    if loss.weight_decay > 0:
      metrics["weight_decay"] = self.weight_decay_term(params)
      total = total + loss.weight_decay * metrics["weight_decay"]
    metrics["loss"] = total
    return total, (stats, metrics)

  # -- training -------------------------------------------------------------------------------
  def modality_mask(self, params: dict, modality: str) -> dict:
    """A params-shaped tree of Python bools: True on `modality`'s own leaves.

    Its own leaves are the kernels of its per-modality blocks (`<block>_<modality>`) and its
    norm collection; shared kernels and other modalities' leaves are False.
    """
    def own(path, _):
      top = str(path[0].key)
      if top == norm_collection(modality):
        return True
      if top == "params" and len(path) > 1:
        block = str(path[1].key)
        return block.endswith(f"_{modality}") and self.sharing.is_per_modality(
            block[: -len(modality) - 1])
      return False
    return jax.tree_util.tree_map_with_path(own, params)

  def step_variants(self) -> tuple:
    """The alternate regime compiles one step per modality; the mixed regime one step."""
    return self.modalities if self.regime == "alternate" else (None,)

  def variant_of_step(self, step: int):
    """The step variant that trains step `step` (0-based: the state's step before the update)."""
    return self.modalities[step % len(self.modalities)] if self.regime == "alternate" else None

  def idle_mask(self, params: dict, active: str) -> dict:
    """A params-shaped tree of Python bools: True on the own leaves of every modality but
    `active`, the leaves an alternate step on `active` must leave as they are."""
    others = [self.modality_mask(params, o) for o in self.modalities if o != active]
    if not others:
      return jax.tree.map(lambda _: False, params)
    return jax.tree.map(lambda *flags: any(flags), *others)

  def update_ema(self, state: SupervisedEMAState, variant=None) -> SupervisedEMAState:
    """Moves the averages toward the state's updated params and stats (after the optimiser).

    Bias-corrected, as Adam's moments, per leaf: at a leaf's n-th update, with d =
    train.ema_decay, ema <- (1 - w_n) ema + w_n p, w_n = (1 - d) / (1 - d**n). The stored average
    is then sum_i d**(n-i) p_i / sum_i d**(n-i) over the leaf's own values so far, with no zero
    start to correct at prediction time: w_1 = 1 (the first average is the first trained value,
    the initial weights drop out), w_n -> 1 - d. A warm-up of the decay (TF's
    min(d, (1+n)/(10+n))) would keep a share of the random initial weights for long and add a
    second constant.

    n is the leaf's own count of updates: the step for the mixed regime and shared leaves; in
    the alternate regime a modality's own leaves count its steps only, and the other
    modalities' own leaves keep their average bit for bit (a static choice, no arithmetic on
    them: their raw values did not change, yet averaging toward them would still move it).

    The running statistics are averaged too, rather than paired raw with averaged weights: they
    follow the raw weights of the last ~1 / (1 - model.norm.momentum) steps, the averaged weights
    span ~1 / (1 - d), and statistics averaged over that span go with them (as timm's ModelEmaV2
    averages the buffers).

    Args:
      state: the state after the optimiser update, step already incremented.
      variant: the alternate regime's trained modality; None for the mixed regime.
    """
    # float32 throughout, so that w_1 is exactly 1 (a float64 1 - d over a float32 one is not).
    d = jnp.float32(self.ema_decay)

    def mover(n):
      w = (1 - d) / (1 - jnp.power(d, n.astype(jnp.float32)))
      return lambda ema, raw: (1 - w) * ema + w * raw

    t = state.step
    if variant is None:      # every leaf and every statistic is trained at every step
      move = mover(t)
      return state.replace(ema_params=jax.tree.map(move, state.ema_params, state.params),
                           ema_stats=jax.tree.map(move, state.ema_stats, state.stats))

    def updates(m):          # steps of modality m among the t so far (m trains steps s = i mod M)
      return (t - 1 - self.modalities.index(m)) // len(self.modalities) + 1

    move_own, move_shared = mover(updates(variant)), mover(t)
    own = self.modality_mask(state.params, variant)
    idle = self.idle_mask(state.params, variant)
    ema_params = jax.tree.map(
        lambda e, p, o, i: e if i else (move_own if o else move_shared)(e, p),
        state.ema_params, state.params, own, idle)
    # Only the trained modality's norm group's statistics changed; a group shared by several
    # modalities counts all their steps.
    group = self.sharing.norm_group(variant)
    move_stats = mover(sum(updates(m) for m in self.modalities
                           if self.sharing.norm_group(m) == group))
    ema_stats = {k: jax.tree.map(move_stats, v, state.stats[k])
                 if k == stats_collection(group) else v
                 for k, v in state.ema_stats.items()}
    return state.replace(ema_params=ema_params, ema_stats=ema_stats)

  def train_step(self, state: SupervisedState, batch: dict, rng: jax.Array, variant=None):
    """One update. Alternate regime: `variant` is the modality to train (a static choice)."""
    if self.regime == "mixed":
      grads, (stats, metrics) = jax.grad(self.loss_fn, has_aux=True)(
          state.params, state.stats, batch, rng)
      updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
    else:
      if variant not in self.modalities:
        raise ValueError(f"train.regime='alternate' trains one modality per step: variant must "
                         f"be one of {self.modalities} (variant_of_step), got {variant!r}")
      params, stats, opt_state, grads, metrics = self._alternate_update(state, batch, rng,
                                                                        variant)
    metrics["grad_norm"] = optax.tree.norm(grads)
    state = state.replace(step=state.step + 1, params=params, stats=stats, opt_state=opt_state)
    if self.ema_decay:
      state = self.update_ema(state, variant if self.regime == "alternate" else None)
    return state, metrics

  def _alternate_update(self, state: SupervisedState, batch: dict, rng: jax.Array,
                        modality: str):
    """One step on `modality`; the other modalities' own variables stay untouched.

    The modality is chosen on the host (`variant_of_step`), one compiled step each: a
    `lax.switch` on the traced step inside one executable ran many times slower on XLA:CPU.
    """
    m = modality
    params_def = jax.tree.structure(state.params)
    grads, (stats, metrics) = jax.grad(self.loss_fn, has_aux=True)(
        state.params, state.stats, batch, rng, (m,))
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Every modality but m keeps its own leaves (kernels, norm parameters, Adam moments).
    keep = jax.tree.map(jnp.asarray, self.idle_mask(state.params, m))
    params = jax.tree.map(lambda n, o, k: jnp.where(k, o, n), params, state.params, keep)
    opt_state = _select_params_like(opt_state, state.opt_state, keep, params_def)
    out = {"loss": metrics["loss"],
           "active_modality": jnp.asarray(self.modalities.index(m), jnp.float32)}
    for o in self.modalities:
      out[f"seg_{o}"] = metrics.get(f"seg_{o}", jnp.zeros((), jnp.float32))
    if "weight_decay" in metrics:
      out["weight_decay"] = metrics["weight_decay"]
    return params, stats, opt_state, grads, out


class PatchSupervised(Supervised):
  """The same method on a 3D network (`model.ndim = 3`): 3D patches in, sliding window out.

  Training batches are patches of data.image_size x `train.patch_slices` drawn by
  `data.patches.PatchSampler` (a pure function of the step); evaluation predicts each volume
  from overlapping windows of that one shape (`predict_volume`, used by the trainer in place of
  slice-by-slice prediction).
  """

  def __init__(self, config: ml_collections.ConfigDict, *args, **kwargs):
    super().__init__(config, *args, **kwargs)
    self.patch_shape = tuple(config.data.image_size) + (config.train.patch_slices,)
    self._samplers = None

  def host_batch(self, data, step: int, rows: slice | None = None) -> dict:
    from unpaired_seg.data import patches  # host-side data code, only for 3D
    if self._samplers is None:
      c = self.config
      self._samplers = {
          m: patches.PatchSampler(data.cases["train"][m], c.train.batch_size, self.patch_shape,
                                  c.data.foreground_fraction, seed=c.seed, stream=i,
                                  oversample=c.data.oversample)
          for i, m in enumerate(data.modalities)}
    return {m: s.batch(step, rows) for m, s in self._samplers.items()}

  def predict_volume(self, predict, state, modality: str, image, *, tile_size=None,
                     context_slices: int = 0, batch_size: int = 2, overlap: float = 0.5):
    """[X, Y, Z] labels; the trainer's slice arguments (tile_size, context_slices) are unused."""
    from unpaired_seg.data import patches
    del tile_size, context_slices
    return patches.predict_volume_patches(predict, state, modality, image,
                                          patch_shape=self.patch_shape,
                                          batch_size=max(1, min(batch_size, 2)), overlap=overlap)


def _method(default_sharing: str, kd: bool = False, csa: str | None = None,
            sharing_prefix: str = ""):
  def create(config: ml_collections.ConfigDict, *args, **kwargs):
    cls = PatchSupervised if config.model.ndim == 3 else Supervised
    return cls(config, *args, default_sharing=default_sharing, kd=kd, csa=csa,
               sharing_prefix=sharing_prefix, **kwargs)
  return create


individual = _method("individual")
joint = _method("joint")
joint_kd = _method("joint", kd=True)
y_shaped = _method("y_shaped")
x_shaped = _method("x_shaped")
dualstream = _method("dualstream_v4", sharing_prefix="dualstream_")
chilopod = _method("chilopod")
ummkd = _method("chilopod", kd=True)
affinity = _method("chilopod", csa="plain")
csa = _method("chilopod", csa="class_specific")
