"""The supervised plug-in class: one network with a configurable amount of sharing, Dice + CE with
optional KD, (class-specific) affinity and L2, the mixed and alternate regimes, an optional EMA.

See the package docstring (`unpaired_seg/methods/supervised/__init__.py`) for the methods, the loss
and the regimes.

  python -m pytest -q tests/methods/test_supervised.py tests/methods/test_shared_kernels.py
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from unpaired_seg import rng as rng_lib
from unpaired_seg.methods import averaging
from unpaired_seg.methods.base import Method, count_parameters
from unpaired_seg.methods.supervised.parts import (
    CLASS_WEIGHTS, REGIMES, SupervisedEMAState, SupervisedState, default_csa_layers,
    deep_supervision_logits, labelled_class_weights, mask_unlabelled, norm_spec,
    select_params_like, sharing_from_config)
from unpaired_seg.nn.norms import norm_collection, stats_collection
from unpaired_seg.nn.registry import build_network
from unpaired_seg.nn.unet import DEEP_SUPERVISION
from unpaired_seg.ops import losses, precision
from unpaired_seg.optim import learning_rate_schedule, make_optimizer


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

    Bias-corrected, as Adam's moments, per leaf (`averaging.ema_weight`): at a leaf's n-th update,
    with d = train.ema_decay, ema <- (1 - w_n) ema + w_n p, w_n = (1 - d) / (1 - d**n). The stored
    average is then sum_i d**(n-i) p_i / sum_i d**(n-i) over the leaf's own values so far, with no
    zero start to correct at prediction time: w_1 = 1 (the first average is the first trained
    value, the initial weights drop out), w_n -> 1 - d. A warm-up of the decay (TF's
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
    d = jnp.float32(self.ema_decay)   # float32 throughout: see `averaging.ema_weight`
    mover = functools.partial(averaging.ema_mover, d)
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
    opt_state = select_params_like(opt_state, state.opt_state, keep, params_def)
    out = {"loss": metrics["loss"],
           "active_modality": jnp.asarray(self.modalities.index(m), jnp.float32)}
    for o in self.modalities:
      out[f"seg_{o}"] = metrics.get(f"seg_{o}", jnp.zeros((), jnp.float32))
    if "weight_decay" in metrics:
      out["weight_decay"] = metrics["weight_decay"]
    return params, stats, opt_state, grads, out
