"""MMSDNet / DAFNet: disentangle anatomy and modality, align (TPS transformer), fuse (maximum).

Per modality j and a partner slice (or k candidate slices) of the other modality i, one step
trains, in this order and each with its own Adam:
  generator      anatomy encoders f_A, modality encoder f_M (VAE), segmentor h, decoder g (FiLM or
                 SPADE), spatial transformer (TPS), pair weighting; loss
                   w_kl KL + w_sup (sup(h(s_j)) + sum_c w_c sup(h(STN(s_i^c -> s_j))))
                   + w_adv_mask adv_M + w_rec (L1(g(s_j, z_j)) + sum_c w_c L1(g(deformed_c, z_j)))
                   + w_adv_image adv_I + w_z_rec L1(f_M(g(s_j, z~N)), z)
                 (the conference model also trains on the fused anatomy max(s_j, deformed));
  mask D         one LS-GAN discriminator on masks (background excluded), real = one-hot labels
                 of labelled slices of every modality, fake = softmax(h(s)) of own and deformed s;
  image D        one per modality (DAFNet only), real = images, fake = reconstructions.
The discriminators are trained on the fakes of the generator pass of the same step (stop-gradient).
Unlabelled slices (`labelled` = 0, semi-supervised or zero-shot target) enter only through the
reconstruction, KL, z-reconstruction and adversarial terms: the supervised terms of a slice use its
own label, so the zero-shot target learns its anatomy through the source direction (its deformed
anatomy must segment the source's label).

Not the authors' (options): `weights.align` adds a registration term that trains the transformer
only (1 - soft Dice of the partner's organ masks warped onto the slice's, `align_target='masks'`, or
of the anatomies), and `stn_trained_by='align'` leaves the transformer to that term alone: the
other losses still reach the encoders through the warp, but not the transformer (trained by every
loss, it and a label-free encoder can shift against each other and still lower them).
`warp_gradient='identity'` goes further: the other losses see the warped factor, but its gradient
goes to the partner's anatomy as if unwarped (straight-through), so an encoder learns in its own
image's frame and cannot leave the warp to make up for an offset of its own.
`stn_start` holds the transformer at the identity for the first steps.

Stochastic weight averaging (`mmsdnet.swa_start`): a running mean of the generator's parameters and
batch-norm statistics from that step on; `predict` (validation, checkpoints' evaluation, test) uses
it, training continues on the raw weights.

  python -m unpaired_seg.main --config=configs/mmsdnet.py --workdir=/tmp/mmsdnet
  python -m unpaired_seg.main --config=configs/dafnet.py:pairing=auto,tiny --workdir=/tmp/dafnet
"""

import functools
from collections.abc import Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from unpaired_seg import config_schema as cs
from unpaired_seg.methods import mmsdnet_pairing as pairing_lib
from unpaired_seg.methods.base import ExtraResults, Method, count_parameters
from unpaired_seg.nn import disentangle
from unpaired_seg.nn import discriminators as disc_lib
from unpaired_seg.nn import stn as stn_lib
from unpaired_seg.nn.sharing import NormSpec
from unpaired_seg.ops import losses, precision, similarity, tps

VARIANTS = ("mmsdnet", "dafnet")
DECODERS = ("film", "spade")

cs.register_section("mmsdnet", {
    # Anatomy U-Nets: 'mmsdnet' two separate ones, 'dafnet' per-modality encoders, shared rest.
    "variant": cs.choice(*VARIANTS),
    "decoder": cs.choice(*DECODERS),
    "pairing": cs.choice(*pairing_lib.PAIRINGS),
    "num_candidates": cs.positive_int(),      # k of 'auto' and 'cross_subject'
    "pair_window": cs.non_negative_int(),     # +- slices of 'auto' and 'random'
    "stn": cs.BOOL,
    # Partner candidates get their own slice's augmentation (pairs stay aligned) or none.
    "augment_partners": cs.BOOL,
    "train_on_fused": cs.BOOL,                # conference model: losses on the fused anatomy too
    "anatomy_features": cs.positive_int(),
    "anatomy_depth": cs.positive_int(),
    "num_anatomy": cs.positive_int(),
    "binarize": cs.choice("onehot_argmax", "round"),
    # Running-average decay of the batch-norm statistics (Keras' 0.99; short runs need less).
    "bn_momentum": cs.number(0.0, 1.0),
    "z_dim": cs.positive_int(),
    "modality_features": cs.positive_int(),
    "modality_hidden": cs.positive_int(),
    "decoder_features": cs.positive_int(),
    "spade_hidden": cs.positive_int(),
    "spade_upsamples": cs.non_negative_int(),
    "segmentor_features": cs.positive_int(),
    "stn_features": cs.positive_int(),
    "stn_hidden": cs.positive_int(),
    "pair_hidden": cs.positive_int(),
    "mask_disc_features": cs.positive_int(),
    "image_disc": cs.BOOL,
    "image_disc_features": cs.positive_int(),
    "disc_padding": cs.choice("VALID", "SAME"),
    "spectral": cs.choice(*disc_lib.SPECTRAL_MODES),
    # Per-class Dice + CE (paper) or the authors' code's pooled foreground Dice + CE.
    "supervised": cs.choice("paper", "code"),
    # 'align' (not the authors'; 0 = off): a registration term that trains the transformer only
    # (its inputs and targets held fixed): 1 - soft Dice between each slice and its partner warped
    # onto it, of the two anatomies ('anatomy') or of their organ masks ('masks': the label of a
    # labelled slice, else the segmentor's prediction; per organ, background left out).
    "align_target": cs.choice("anatomy", "masks"),
    # What trains the transformer: every loss (the authors'), or the 'align' term alone (the other
    # losses still train the encoders through the warp, but not the transformer).
    "stn_trained_by": cs.choice("all", "align"),
    # What the other losses' gradients see of the warp (not the authors' when 'identity'): 'warp'
    # (the authors') differentiates through it into the partner's encoder, the transformer and its
    # inputs; 'identity' passes the warped factor forward but its gradient to the partner's anatomy
    # as if unwarped (straight-through), so no encoder can lean on the warp: the warp is then
    # trained by the 'align' term alone.
    "warp_gradient": cs.choice("warp", "identity"),
    # 'mean_offset' (not the authors'; 0 = off): the squared control-point offsets averaged over the
    # batch's pairs (per direction, normalised [0, 1] units); trains the transformer only. A warp
    # that every pair shares is a bias of an encoder, not a misalignment of the pairs.
    "weights": {k: cs.number(0.0) for k in ("kl", "sup", "adv_mask", "rec", "adv_image", "z_rec",
                                            "align", "mean_offset")},
    # 'stn': the spatial transformer's own Adam rate inside the generator step (0 = 'generator').
    "learning_rate": {k: cs.number(0.0) for k in ("generator", "stn", "mask_disc", "image_disc")},
    "swa_start": cs.non_negative_int(),
    # Not the authors': the transformer stays the identity (and untrained) before this step.
    "stn_start": cs.non_negative_int(),
    "analysis": cs.BOOL,                      # disentanglement.json, traversal.png after training
    "analysis_slices": cs.positive_int(),     # test slices per modality for the analysis
})


def default_section(variant: str = "dafnet") -> ml_collections.ConfigDict:
  """The authors' settings of the journal ('dafnet') or conference ('mmsdnet') model."""
  journal = variant == "dafnet"
  return ml_collections.ConfigDict(dict(
      variant=variant, decoder="film", pairing="expert", num_candidates=3, pair_window=2,
      stn=True, augment_partners=False, train_on_fused=not journal, anatomy_features=64,
      anatomy_depth=4, num_anatomy=8,
      binarize="onehot_argmax", bn_momentum=0.99, z_dim=8, modality_features=16, modality_hidden=32,
      decoder_features=8, spade_hidden=128, spade_upsamples=5, segmentor_features=64,
      stn_features=20, stn_hidden=100, pair_hidden=5,
      mask_disc_features=64 if journal else 4, image_disc=journal, image_disc_features=64,
      disc_padding="VALID", spectral="paper", supervised="paper", align_target="masks",
      stn_trained_by="all", warp_gradient="warp",
      weights=dict(kl=0.1, sup=10.0, adv_mask=1.0, rec=1.0 if journal else 10.0,
                   adv_image=1.0 if journal else 0.0, z_rec=1.0, align=0.0, mean_offset=0.0),
      learning_rate=dict(generator=1e-4, stn=0.0, mask_disc=1e-4, image_disc=1e-4),
      swa_start=0, stn_start=0, analysis=True, analysis_slices=64))


# ================================================================================================
# Networks.
# ================================================================================================


class Generator(nn.Module):
  """Everything but the discriminators; each part is called through its own method."""
  settings: ml_collections.FrozenConfigDict
  num_classes: int
  modalities: tuple[str, ...]

  def setup(self):
    s = self.settings
    norm = NormSpec(kind="batch", momentum=s.bn_momentum, epsilon=1e-3)
    self.anatomy_encoder = disentangle.AnatomyEncoder(
        self.modalities, variant=s.variant, features=s.anatomy_features, depth=s.anatomy_depth,
        num_anatomy=s.num_anatomy, binarize=s.binarize, norm=norm)
    self.modality_encoder = disentangle.ModalityEncoder(
        z_dim=s.z_dim, features=s.modality_features, hidden=s.modality_hidden)
    self.segmentor = disentangle.Segmentor(self.num_classes, self.modalities,
                                           features=s.segmentor_features, norm=norm)
    if s.decoder == "film":
      self.decoder = disentangle.FiLMDecoder(features=s.decoder_features)
    else:
      self.decoder = disentangle.SPADEDecoder(features=s.decoder_features, hidden=s.spade_hidden,
                                              num_upsamples=s.spade_upsamples)
    self.transformer = stn_lib.SpatialTransformer(features=s.stn_features, hidden=s.stn_hidden)
    self.pair_weighting = disentangle.PairWeighting(hidden=s.pair_hidden)

  def __call__(self, x: jax.Array, k: int):
    """Touches every part (and every modality's blocks) so that `init` creates them all."""
    s = self.anatomy(x, self.modalities[0], False)
    for m in self.modalities[1:]:
      self.anatomy(x, m, False)
    z, _, _ = self.encode_modality(s, x, False)
    self.segment(s, self.modalities[0], False)
    self.decode(s, z)
    warped, _ = self.transformer(s, s)
    self.weigh(jnp.ones((x.shape[0], k), jnp.float32))
    return warped

  def anatomy(self, x, modality, train):
    return self.anatomy_encoder(x, modality=modality, train=train)

  def encode_modality(self, s, x, sample):
    return self.modality_encoder(s, x, sample=sample)

  def segment(self, s, modality, train):
    return self.segmentor(s, modality=modality, train=train)

  def decode(self, s, z):
    return self.decoder(s, z)

  def displacements(self, moving, fixed):
    return self.transformer(moving, fixed)[1]

  def weigh(self, scores):
    return self.pair_weighting(scores)


@flax.struct.dataclass
class MMSDNetState:
  step: jax.Array
  params: dict        # {'generator': {...}, 'mask_disc': {...}, 'image_disc': {modality: {...}}}
  stats: dict         # {'generator': stats_* collections, 'mask_disc': spectral, 'image_disc': ...}
  opt_state: dict     # one optax state per part
  swa_params: dict    # running mean of params['generator']
  swa_stats: dict     # running mean of stats['generator'] (batch-norm statistics)
  swa_count: jax.Array


def _split(variables: dict) -> tuple[dict, dict]:
  """Trainable collections ('params', 'norm_*') and the rest (running statistics, 'spectral')."""
  params = {k: v for k, v in variables.items() if k == "params" or k.startswith("norm_")}
  stats = {k: v for k, v in variables.items() if k not in params and k != "intermediates"}
  return params, stats


def swa_update(average, value, count: jax.Array, active: jax.Array):
  """One step of the running mean: (average, count) -> (new average, new count).

  While not `active` the average tracks `value` and the count stays 0; from the first active step
  on, average_n = average_{n-1} + (value - average_{n-1}) / n, the mean of the n values so far.
  """
  new_count = jnp.where(active, count + 1, 0)
  scale = 1.0 / jnp.maximum(new_count, 1).astype(jnp.float32)

  def leaf(a, v):
    mean = a + (v - a) * scale.astype(a.dtype)
    return jnp.where(active, mean, v)
  return jax.tree.map(leaf, average, value), new_count


def straight_through_warp(moving: jax.Array, warped: jax.Array) -> jax.Array:
  """`warped` forward; backward, the gradient goes to `moving` as if the warp were the identity.

  Nothing reaches the transformer or its inputs through the result, and the partner's encoder
  learns in its own image's frame: it cannot drift and leave the warp to make up for it.
  """
  return moving + jax.lax.stop_gradient(warped - moving)


def generator_optimizer(learning_rate: float, stn_learning_rate: float = 0.0
                        ) -> optax.GradientTransformation:
  """Adam over the generator; the spatial transformer at its own rate when `stn_learning_rate` > 0.

  The transformer's offsets are unbounded: at the rate that trains the encoders quickly (1e-3 and
  more) Adam's steps of nearly the full rate on noisy gradients move the control points by a
  large part of the image within a few hundred steps, so it can need a smaller one.
  """
  if not stn_learning_rate or stn_learning_rate == learning_rate:
    return optax.adam(learning_rate)

  def labels(params):
    def collection(name, tree):
      if name != "params":
        return jax.tree.map(lambda _: "rest", tree)
      return {module: jax.tree.map(lambda _, m=module: "stn" if m == "transformer" else "rest",
                                   sub) for module, sub in tree.items()}
    return {name: collection(name, tree) for name, tree in params.items()}

  return optax.multi_transform({"rest": optax.adam(learning_rate),
                                "stn": optax.adam(stn_learning_rate)}, labels)


class _Stack:
  """Arrays concatenated along the batch axis, and the way to split a result of the same rows."""

  def __init__(self, parts: Sequence[jax.Array]):
    self.parts = list(parts)
    self.value = jnp.concatenate(self.parts) if len(self.parts) > 1 else self.parts[0]

  def split(self, stacked: jax.Array) -> list[jax.Array]:
    sizes = [p.shape[0] for p in self.parts]
    bounds = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]
    return jnp.split(stacked, bounds)


# ================================================================================================
# The plug-in.
# ================================================================================================


class MMSDNet(Method):
  """The disentangle-align-fuse method; `config.mmsdnet` chooses the conference or journal model."""

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int,
               modalities: Sequence[str], num_data_shards: int = 1):
    if "mmsdnet" not in config:
      raise cs.ConfigError(f"config method {config.method!r} needs a 'mmsdnet' section "
                           "(configs/mmsdnet.py or configs/dafnet.py)")
    if len(modalities) != 2:
      raise cs.ConfigError(f"config key 'data.modalities': {config.method} pairs exactly two "
                           f"modalities, got {tuple(modalities)}")
    if config.data.context_slices:
      raise cs.ConfigError(f"config key 'data.context_slices': {config.method} is 2D, use 0")
    if config.mmsdnet.stn_trained_by == "align" and not config.mmsdnet.weights.align:
      raise cs.ConfigError("config key 'mmsdnet.stn_trained_by': 'align' trains the transformer "
                           "by the registration term alone; set 'mmsdnet.weights.align' > 0")
    if config.mmsdnet.warp_gradient == "identity" and not config.mmsdnet.weights.align:
      raise cs.ConfigError("config key 'mmsdnet.warp_gradient': 'identity' leaves the "
                           "transformer to the registration term; set 'mmsdnet.weights.align' > 0")
    self.config = config
    self.settings = ml_collections.FrozenConfigDict(config.mmsdnet)
    s = self.settings
    self.modalities = tuple(modalities)
    self.num_classes = num_classes
    self.seed = config.seed
    self.k = pairing_lib.num_candidates(s.pairing, s.num_candidates)
    # Batch norm statistics are global over the data-parallel devices (synchronised).
    del num_data_shards
    self.generator = Generator(s, num_classes, self.modalities)
    self.mask_disc = disc_lib.Discriminator(features=s.mask_disc_features, spectral=s.spectral,
                                            exclude_background=True, padding=s.disc_padding)
    self.image_disc = disc_lib.Discriminator(features=s.image_disc_features, spectral=s.spectral,
                                             padding=s.disc_padding)
    self.use_image_disc = bool(s.image_disc)
    self.augment_partners = bool(s.augment_partners)   # read by the trainer's augmentation
    self.compute_dtype = precision.compute_dtype(config.train.get("compute_dtype", "float32"))
    self.tx = {"generator": generator_optimizer(s.learning_rate.generator, s.learning_rate.stn),
               "mask_disc": optax.adam(s.learning_rate.mask_disc),
               "image_disc": optax.adam(s.learning_rate.image_disc)}
    self._disc_mutable = [disc_lib.SPECTRAL_COLLECTION] + (
        [disc_lib.PENALTY_COLLECTION] if s.spectral == "code" else [])

  # -- state ----------------------------------------------------------------------------------
  def init(self, rng: jax.Array, example_batch: dict) -> MMSDNetState:
    x = jnp.asarray(example_batch[self.modalities[0]]["image"])
    g_rng, m_rng, *i_rngs = jax.random.split(rng, 2 + len(self.modalities))
    gen_vars = jax.jit(functools.partial(self.generator.init, k=self.k))(g_rng, x)
    gen_params, gen_stats = _split(dict(gen_vars))
    masks = jnp.zeros(x.shape[:3] + (self.num_classes,), jnp.float32)
    mask_params, mask_stats = _split(dict(jax.jit(self.mask_disc.init)(m_rng, masks)))
    params = {"generator": gen_params, "mask_disc": mask_params, "image_disc": {}}
    stats = {"generator": gen_stats, "mask_disc": mask_stats, "image_disc": {}}
    if self.use_image_disc:
      for m, r in zip(self.modalities, i_rngs):
        p, st = _split(dict(jax.jit(self.image_disc.init)(r, x)))
        params["image_disc"][m], stats["image_disc"][m] = p, st
    opt_state = {name: self.tx[name].init(params[name]) for name in self.tx}
    return MMSDNetState(step=jnp.zeros((), jnp.int32), params=params, stats=stats,
                        opt_state=opt_state,
                        # Copies: the trainer donates the state, and one buffer cannot go twice.
                        swa_params=jax.tree.map(jnp.copy, gen_params),
                        swa_stats=jax.tree.map(jnp.copy, gen_stats),
                        swa_count=jnp.zeros((), jnp.int32))

  def parameter_counts(self, state: MMSDNetState) -> dict[str, int]:
    counts = {"generator": count_parameters(state.params["generator"]),
              "mask_discriminator": count_parameters(state.params["mask_disc"]),
              "image_discriminators": count_parameters(state.params["image_disc"])}
    counts["trainable_total"] = sum(counts.values())
    return counts

  def describe(self) -> dict:
    s = self.settings
    return {"network": "MMSDNet" if s.variant == "mmsdnet" else "DAFNet",
            "anatomy_variant": s.variant, "decoder": s.decoder, "pairing": s.pairing,
            "candidates": self.k, "stn": bool(s.stn), "image_discriminator": self.use_image_disc,
            "spectral": s.spectral, "supervised": s.supervised, "weights": s.weights.to_dict(),
            "swa_start": s.swa_start}

  # -- forward pieces -------------------------------------------------------------------------
  def _gen(self, params, stats, method, *args, train=False, rngs=None):
    """Applies one generator part; in training the batch-norm statistics are updated."""
    params, args = self._cast_in(params, args)
    variables = {**params, **stats}
    fn = getattr(Generator, method)
    if method in ("anatomy", "segment"):
      args = args + (train,)
    if not train:
      return precision.to_float32(self.generator.apply(variables, *args, method=fn,
                                                       rngs=rngs)), stats
    mutable = [k for k in stats if k.startswith("stats_")]
    out, updated = self.generator.apply(variables, *args, method=fn, rngs=rngs, mutable=mutable)
    return precision.to_float32(out), {**stats, **precision.to_float32(updated)}

  def _cast_in(self, params, args):
    """`train.compute_dtype`: the networks compute with cast copies of the float32 variables."""
    if self.compute_dtype == jnp.float32:
      return params, args
    return (precision.cast_floating(params, self.compute_dtype),
            precision.cast_floating(args, self.compute_dtype))

  def _align(self, params, stats, moving, fixed, active=None, values=None):
    """`values` (default: `moving`) warped with the transformer's displacements of `moving` onto
    `fixed`; unwarped while `active` is False (a traced bool: no gradient reaches the transformer
    then) or with the transformer off."""
    values = moving if values is None else values
    if not self.settings.stn:
      return values
    displacements = self._gen(params, stats, "displacements", moving, fixed)[0]
    warped = tps.thin_plate_spline(values, displacements.astype(values.dtype))
    return warped if active is None else jnp.where(active, warped, values)

  def fused_probabilities(self, params, stats, image, modality, partner):
    """Multi-input prediction: [B, H, W, C] image, [B, k, H, W, C] partner slices -> [B, H, W, K].

    The partner's anatomy is aligned to the image's, fused by maximum and segmented; with k > 1
    candidates the k predictions are summed with the pair-weighting network's weights.
    """
    other = self.other(modality)
    b, k = partner.shape[:2]
    s_j, _ = self._gen(params, stats, "anatomy", image, modality)
    s_p, _ = self._gen(params, stats, "anatomy", partner.reshape((b * k,) + partner.shape[2:]),
                       other)
    s_rep = jnp.repeat(s_j, k, axis=0)                                   # [B k, H, W, A]
    deformed = self._align(params, stats, s_p, s_rep)
    fused = stn_lib.max_fusion(s_rep, deformed)
    logits, _ = self._gen(params, stats, "segment", fused, modality)
    probs = jax.nn.softmax(logits.astype(jnp.float32), -1).reshape((b, k) + logits.shape[1:])
    weights = self._pair_weights(params, stats, s_rep, deformed, b, k)   # [B, k]
    return jnp.einsum("bk,bkhwc->bhwc", weights, probs)

  def _pair_weights(self, params, stats, s_rep, deformed, b, k):
    if k == 1:
      return jnp.ones((b, 1), jnp.float32)
    scores = similarity.soft_dice_per_sample(s_rep, deformed).reshape(b, k)
    return self._gen(params, stats, "weigh", scores)[0]

  def other(self, modality: str) -> str:
    return self.modalities[1 - self.modalities.index(modality)]

  def predict(self, state: MMSDNetState, image: jax.Array, modality: str) -> jax.Array:
    """Single input: own anatomy -> segmentor, with the averaged (SWA) weights."""
    s, _ = self._gen(state.swa_params, state.swa_stats, "anatomy", image, modality)
    return self._gen(state.swa_params, state.swa_stats, "segment", s, modality)[0]

  def predict_displacements(self, state: MMSDNetState, image: jax.Array, modality: str,
                            partner: jax.Array) -> jax.Array:
    """[B, K, 2] control-point offsets that align `partner` [B, H, W, C] (the other modality's
    slices) onto `image` [B, H, W, C], with the SWA weights; zeros with the transformer off."""
    s_j, _ = self._gen(state.swa_params, state.swa_stats, "anatomy", image, modality)
    s_p, _ = self._gen(state.swa_params, state.swa_stats, "anatomy", partner, self.other(modality))
    if not self.settings.stn:
      points = stn_lib.SpatialTransformer.grid_size ** 2
      return jnp.zeros((image.shape[0], points, 2), jnp.float32)
    return self._gen(state.swa_params, state.swa_stats, "displacements", s_p, s_j)[0]

  def predict_multi(self, state: MMSDNetState, image: jax.Array, modality: str,
                    partner: jax.Array) -> jax.Array:
    """Multi input (fused anatomy), class probabilities [B, H, W, K], with the SWA weights."""
    return self.fused_probabilities(state.swa_params, state.swa_stats, image, modality, partner)

  # -- losses ---------------------------------------------------------------------------------
  def _supervised_per_sample(self, logits, labels):
    """[N, H, W, K] logits, [N, H, W] labels -> [N] supervised loss per sample."""
    def one(lg, lb):
      lg, lb = lg[None], lb[None]
      if self.settings.supervised == "code":
        return losses.pooled_dice_loss(lg, lb) + losses.cross_entropy_loss(lg, lb)
      return losses.dice_ce_loss(lg, lb)
    return jax.vmap(one)(logits, labels)

  def _supervised(self, logits, labels, labelled):
    if self.settings.supervised == "code":
      return (losses.pooled_dice_loss(logits, labels, sample_weight=labelled)
              + losses.cross_entropy_loss(logits, labels, sample_weight=labelled))
    return losses.dice_ce_loss(logits, labels, sample_weight=labelled)

  def _disc_scores(self, disc, params, stats, x, update: bool):
    params, (x,) = self._cast_in(params, (x,))
    variables = {**params, **stats}
    if not update:
      return disc.apply(variables, x).astype(jnp.float32), stats, jnp.zeros((), jnp.float32)
    scores, updated = disc.apply(variables, x, mutable=self._disc_mutable)
    # The power-iteration vectors and penalties back in float32, as the state holds them.
    scores, updated = precision.to_float32((scores, updated))
    penalty = disc_lib.collected_penalty(updated)
    new = {k: v for k, v in updated.items() if k != disc_lib.PENALTY_COLLECTION}
    return scores, {**stats, **new}, penalty

  def generator_loss(self, gen_params, gen_stats, disc_params, disc_stats, batch, rng,
                     step=None):
    """The generator's weighted loss; aux = (new stats, metrics, fakes for the discriminators).

    Both directions go through each network in one batched pass (one anatomy pass per modality,
    one pass of the transformer, segmentor, modality encoder and decoder): the step compiles
    several times faster than with a pass per direction and term.
    """
    s = self.settings
    w = s.weights
    mods, k = self.modalities, self.k
    stats = gen_stats
    key_sample, key_prior = jax.random.split(rng)
    x = {m: batch[m]["image"] for m in mods}
    y = {m: batch[m]["label"] for m in mods}
    labelled = {m: batch[m]["labelled"].astype(jnp.float32) for m in mods}
    n = {m: x[m].shape[0] for m in mods}

    # Anatomy: one pass per modality over its own slices and the candidates it gives the other.
    own, cand = {}, {}
    for m in mods:
      o = self.other(m)
      partner = batch[o]["partner_image"]                                  # [N_o, k, H, W, C]
      stacked = jnp.concatenate([x[m], partner.reshape((-1,) + partner.shape[2:])])
      factors, stats = self._gen(gen_params, stats, "anatomy", stacked, m, train=True)
      own[m], cand[o] = factors[:n[m]], factors[n[m]:]                     # cand[o]: [N_o k, ...]

    # Align every candidate onto its slice's anatomy and weigh the k candidates.
    fixed = _Stack([jnp.repeat(own[m], k, axis=0) for m in mods])
    stn_active = None if step is None or not s.stn_start else step >= s.stn_start
    warp_params = gen_params
    if s.stn_trained_by == "align":   # no gradient of these terms reaches the transformer
      warp_params = {**gen_params, "params": {
          **gen_params["params"],
          "transformer": jax.lax.stop_gradient(gen_params["params"]["transformer"])}}
    moving = jnp.concatenate([cand[m] for m in mods])
    deformed = self._align(warp_params, stats, moving, fixed.value, stn_active)
    if s.warp_gradient == "identity":
      deformed = straight_through_warp(moving, deformed)
    deformed = fixed.split(deformed)
    rep = dict(zip(mods, fixed.parts))
    scores = similarity.soft_dice_per_sample(fixed.value, jnp.concatenate(deformed))
    if k == 1:
      pair_w = {m: jnp.ones((n[m], 1), jnp.float32) for m in mods}
    else:
      weights = self._gen(gen_params, stats, "weigh", scores.reshape(-1, k))[0]
      pair_w = dict(zip(mods, _Stack([jnp.zeros((n[m], k)) for m in mods]).split(weights)))
    deformed = dict(zip(mods, deformed))

    # Modality vectors of every slice (one VAE pass).
    z_stack = _Stack([x[m] for m in mods])
    z, mean, logvar = self._gen(gen_params, stats, "encode_modality",
                                jnp.concatenate([own[m] for m in mods]), z_stack.value, True,
                                rngs={"sample": key_sample})[0]
    z, mean, logvar = (dict(zip(mods, z_stack.split(v))) for v in (z, mean, logvar))

    # Segment and decode every anatomy in one pass each: own, deformed (and fused) per modality.
    names = ["deformed"] + (["fused"] if s.train_on_fused else [])
    anatomies = {(m, "own"): own[m] for m in mods}
    for m in mods:
      anatomies[(m, "deformed")] = deformed[m]
      if s.train_on_fused:
        anatomies[(m, "fused")] = stn_lib.max_fusion(rep[m], deformed[m])
    keys = list(anatomies)
    seg_stack = _Stack([anatomies[key] for key in keys])
    logits, stats = self._gen(gen_params, stats, "segment", seg_stack.value, mods[0], train=True)
    logits = dict(zip(keys, seg_stack.split(logits)))
    z_prior = {m: jax.random.normal(jax.random.fold_in(key_prior, i), z[m].shape, z[m].dtype)
               for i, m in enumerate(mods)}
    codes = [z[m] if name == "own" else jnp.repeat(z[m], k, axis=0) for m, name in keys]
    dec_stack = _Stack([anatomies[key] for key in keys] + [own[m] for m in mods])
    decoded = dec_stack.split(self._gen(gen_params, stats, "decode", dec_stack.value,
                                        jnp.concatenate(codes + [z_prior[m] for m in mods]))[0])
    y_prior = dict(zip(mods, decoded[len(keys):]))
    decoded = dict(zip(keys, decoded[:len(keys)]))

    # z reconstruction: re-encode the prior samples' images with the anatomy and mean heads. The
    # pass normalises with its batch statistics but does not update the running ones: those must
    # describe real images, or inference (which uses them) sees a mixture with decoded images.
    prior_anatomy = []
    for m in mods:
      prior_anatomy.append(self._gen(gen_params, stats, "anatomy", y_prior[m], m, train=True)[0])
    z_back = self._gen(gen_params, stats, "encode_modality", jnp.concatenate(prior_anatomy),
                       jnp.concatenate([y_prior[m] for m in mods]), False)[0][1]
    z_back = dict(zip(mods, z_stack.split(z_back)))

    # Adversarial terms: one mask discriminator pass over every predicted mask.
    probs = {key: jax.nn.softmax(v.astype(jnp.float32), -1) for key, v in logits.items()}
    mask_scores = dict(zip(keys, seg_stack.split(self._disc_scores(
        self.mask_disc, disc_params["mask_disc"], disc_stats["mask_disc"],
        jnp.concatenate([probs[key] for key in keys]), update=False)[0])))

    metrics, total = {}, jnp.zeros((), jnp.float32)
    fakes = {"masks": jax.lax.stop_gradient(jnp.concatenate([probs[key] for key in keys])),
             "images": {}}
    for m in mods:
      norm = jnp.maximum(jnp.sum(labelled[m]), 1.0)
      sup = self._supervised(logits[(m, "own")], y[m], labelled[m])
      metrics[f"sup_own_{m}"] = sup
      rec = losses.l1_loss(decoded[(m, "own")], x[m])
      x_rep = jnp.repeat(x[m], k, axis=0)
      y_rep = jnp.repeat(y[m], k, axis=0)
      for name in names:
        per = self._supervised_per_sample(logits[(m, name)], y_rep).reshape(n[m], k)
        sup = sup + jnp.sum(labelled[m][:, None] * pair_w[m] * per) / norm
        per_rec = jnp.mean(jnp.abs(decoded[(m, name)] - x_rep).reshape(n[m], k, -1), axis=-1)
        rec = rec + jnp.mean(jnp.sum(pair_w[m] * per_rec, axis=1))
      kl = losses.kl_divergence_gaussian(mean[m], logvar[m])
      z_rec = jnp.mean(jnp.abs(z_back[m] - z_prior[m]))
      adv_mask = losses.lsgan_generator_loss(
          jnp.concatenate([mask_scores[(m, name)] for name in ["own"] + names]))
      images = jnp.concatenate([decoded[(m, name)] for name in ["own"] + names])
      adv_image = jnp.zeros((), jnp.float32)
      if self.use_image_disc:
        scores_i = self._disc_scores(self.image_disc, disc_params["image_disc"][m],
                                     disc_stats["image_disc"][m], images, update=False)[0]
        adv_image = losses.lsgan_generator_loss(scores_i)
      fakes["images"][m] = jax.lax.stop_gradient(images)
      total = total + (w.kl * kl + w.sup * sup + w.adv_mask * adv_mask + w.rec * rec
                       + w.adv_image * adv_image + w.z_rec * z_rec)
      metrics.update({f"kl_{m}": kl, f"sup_{m}": sup, f"adv_mask_{m}": adv_mask, f"rec_{m}": rec,
                      f"adv_image_{m}": adv_image, f"z_rec_{m}": z_rec,
                      f"pair_weight_max_{m}": jnp.mean(jnp.max(pair_w[m], axis=1))})
    if w.align > 0 and s.stn:
      align = self._alignment_loss(gen_params, stats, cand, fixed.value, probs, y, labelled,
                                   stn_active)
      total = total + w.align * align
      metrics["align"] = align
    if w.mean_offset > 0 and s.stn:
      shared = self._mean_offset_loss(gen_params, stats, cand, fixed, stn_active)
      total = total + w.mean_offset * shared
      metrics["mean_offset"] = shared
    metrics["generator_loss"] = total
    return total, (stats, metrics, fakes)

  def _alignment_loss(self, params, stats, cand, fixed, probs, y, labelled, active):
    """The optional registration term (`weights.align`); trains the transformer only.

    Every input of the transformer and every target is held fixed (stop-gradient), so the
    encoders cannot make the term easy (e.g. by turning every anatomy channel on). 'anatomy':
    1 - soft Dice (pooled over channels) of each slice's anatomy and its candidates' warped onto
    it. 'masks': the candidates' organ masks (the segmentor's softmax of their anatomy) warped with
    the transformer's displacements, against the slice's mask (its one-hot label when labelled,
    else the softmax of its own anatomy's segmentation); 1 - soft Dice per organ and sample,
    background left out, averaged.
    """
    mods, k = self.modalities, self.k
    moving = jax.lax.stop_gradient(jnp.concatenate([cand[m] for m in mods]))
    fixed = jax.lax.stop_gradient(fixed)
    if self.settings.align_target == "anatomy":
      moved = self._align(params, stats, moving, fixed, active)
      return 1.0 - jnp.mean(similarity.soft_dice_per_sample(fixed, moved))
    # Candidates' masks: a segmentor pass over their (unwarped) anatomy, batch statistics not kept.
    cand_logits = self._gen(params, stats, "segment", moving, mods[0], train=True)[0]
    cand_masks = jax.nn.softmax(cand_logits.astype(jnp.float32), -1)[..., 1:]
    cand_masks = jax.lax.stop_gradient(cand_masks)
    moved = self._align(params, stats, moving, fixed, active, values=cand_masks)
    targets = []
    for m in mods:
      one_hot = jax.nn.one_hot(y[m], self.num_classes, dtype=jnp.float32)
      mask = jnp.where(labelled[m][:, None, None, None] > 0, one_hot, probs[(m, "own")])
      targets.append(jnp.repeat(mask[..., 1:], k, axis=0))
    target = jax.lax.stop_gradient(jnp.concatenate(targets))
    return 1.0 - jnp.mean(similarity.soft_dice_per_class(moved, target))

  def _mean_offset_loss(self, params, stats, cand, fixed: "_Stack", active):
    """The optional `weights.mean_offset` term; trains the transformer only (inputs held fixed).

    Per direction (partners of each modality's slices) the control-point offsets are averaged over
    the batch's pairs; the term is the mean square of that average field, 0 while `active` is
    False. The misalignments of independent pairs average out; an offset shared by every pair is
    the transformer making up for an encoder's bias (e.g. a label-free modality's organs segmented
    too large), which then moves the partners' labels away from the slices'.
    """
    moving = jax.lax.stop_gradient(jnp.concatenate([cand[m] for m in self.modalities]))
    displacements = self._gen(params, stats, "displacements", moving,
                              jax.lax.stop_gradient(fixed.value))[0].astype(jnp.float32)
    fields = [jnp.mean(d, axis=0) for d in fixed.split(displacements)]    # [K, 2] per direction
    loss = jnp.mean(jnp.stack([jnp.square(f) for f in fields]))
    return loss if active is None else jnp.where(active, loss, 0.0)

  def mask_disc_loss(self, params, stats, real_masks, real_weight, fake_masks):
    """LS-GAN loss of the mask discriminator; real masks weighted by `real_weight` [N]."""
    real, stats, pen_r = self._disc_scores(self.mask_disc, params, stats, real_masks, update=True)
    fake, stats, pen_f = self._disc_scores(self.mask_disc, params, stats, fake_masks, update=True)
    real_term = jnp.sum(real_weight * jnp.square(real[:, 0] - 1.0)) / jnp.maximum(
        jnp.sum(real_weight), 1.0)
    loss = 0.5 * (real_term + jnp.mean(jnp.square(fake)))
    return loss + 0.5 * (pen_r + pen_f), stats

  def image_disc_loss(self, params, stats, real_images, fake_images):
    real, stats, pen_r = self._disc_scores(self.image_disc, params, stats, real_images, update=True)
    fake, stats, pen_f = self._disc_scores(self.image_disc, params, stats, fake_images, update=True)
    return losses.lsgan_discriminator_loss(real, fake) + 0.5 * (pen_r + pen_f), stats

  # -- updates --------------------------------------------------------------------------------
  def generator_update(self, state: MMSDNetState, batch: dict, rng: jax.Array):
    """One Adam step of the generator; returns (state, metrics, fakes)."""
    grad_fn = jax.grad(self.generator_loss, has_aux=True)
    grads, (gen_stats, metrics, fakes) = grad_fn(
        state.params["generator"], state.stats["generator"], state.params, state.stats, batch, rng,
        state.step)
    updates, opt = self.tx["generator"].update(grads, state.opt_state["generator"],
                                               state.params["generator"])
    params = {**state.params, "generator": optax.apply_updates(state.params["generator"], updates)}
    metrics["generator_grad_norm"] = optax.tree.norm(grads)
    state = state.replace(params=params, stats={**state.stats, "generator": gen_stats},
                          opt_state={**state.opt_state, "generator": opt})
    return state, metrics, fakes

  def real_masks(self, batch: dict) -> tuple[jax.Array, jax.Array]:
    """One-hot labels of every modality's slices [N, H, W, K] and their `labelled` weights [N]."""
    masks = jnp.concatenate([jax.nn.one_hot(batch[m]["label"], self.num_classes)
                             for m in self.modalities])
    weight = jnp.concatenate([batch[m]["labelled"].astype(jnp.float32) for m in self.modalities])
    return masks, weight

  def mask_disc_update(self, state: MMSDNetState, real_masks, real_weight, fake_masks):
    grad_fn = jax.value_and_grad(self.mask_disc_loss, has_aux=True)
    (loss, stats), grads = grad_fn(state.params["mask_disc"], state.stats["mask_disc"],
                                   real_masks, real_weight, fake_masks)
    updates, opt = self.tx["mask_disc"].update(grads, state.opt_state["mask_disc"],
                                               state.params["mask_disc"])
    state = state.replace(
        params={**state.params,
                "mask_disc": optax.apply_updates(state.params["mask_disc"], updates)},
        stats={**state.stats, "mask_disc": stats},
        opt_state={**state.opt_state, "mask_disc": opt})
    return state, loss

  def image_disc_update(self, state: MMSDNetState, real_images: dict, fake_images: dict):
    """One Adam step of every modality's image discriminator (one optimiser over all of them)."""
    def loss_fn(params, stats):
      total, new_stats = jnp.zeros((), jnp.float32), {}
      for m in self.modalities:
        loss, new_stats[m] = self.image_disc_loss(params[m], stats[m], real_images[m],
                                                  fake_images[m])
        total = total + loss
      return total, new_stats
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params["image_disc"], state.stats["image_disc"])
    updates, opt = self.tx["image_disc"].update(grads, state.opt_state["image_disc"],
                                                state.params["image_disc"])
    state = state.replace(
        params={**state.params,
                "image_disc": optax.apply_updates(state.params["image_disc"], updates)},
        stats={**state.stats, "image_disc": stats},
        opt_state={**state.opt_state, "image_disc": opt})
    return state, loss

  def extra_batch_shapes(self, image_shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Each slice's k partner candidates of the other modality."""
    return {"partner_image": (self.k,) + tuple(image_shape)}

  def train_step(self, state: MMSDNetState, batch: dict, rng: jax.Array, variant=None):
    """Generator, then mask discriminator, then image discriminators; then the SWA average."""
    del variant  # one compiled step
    state, metrics, fakes = self.generator_update(state, batch, rng)
    real, real_weight = self.real_masks(batch)
    state, metrics["mask_disc_loss"] = self.mask_disc_update(state, real, real_weight,
                                                             fakes["masks"])
    if self.use_image_disc:
      state, metrics["image_disc_loss"] = self.image_disc_update(
          state, {m: batch[m]["image"] for m in self.modalities}, fakes["images"])
    step = state.step + 1
    active = step > self.settings.swa_start
    swa_params, count = swa_update(state.swa_params, state.params["generator"], state.swa_count,
                                   active)
    swa_stats, _ = swa_update(state.swa_stats, state.stats["generator"], state.swa_count, active)
    metrics["loss"] = metrics["generator_loss"]
    metrics["swa_count"] = count.astype(jnp.float32)
    return state.replace(step=step, swa_params=swa_params, swa_stats=swa_stats,
                         swa_count=count), metrics

  # -- host side ------------------------------------------------------------------------------
  def host_batch(self, data, step: int, rows: slice | None = None) -> dict:
    """Each modality's sampled slices with their partner candidates; a pure function of `step`."""
    return pairing_lib.host_batch(data, step, pairing=self.settings.pairing, k=self.k,
                                  window=self.settings.pair_window, seed=self.seed, rows=rows)

  def extra_evaluations(self, state, data, *, config, workdir, settings, checkpoint_step):
    """Multi-input test metrics and the disentanglement analysis (see `mmsdnet_eval`)."""
    from unpaired_seg.methods import mmsdnet_eval  # matplotlib only after training
    del checkpoint_step
    return ExtraResults(summary=mmsdnet_eval.extra_evaluations(
        self, state, data, config=config, workdir=workdir, settings=settings))


mmsdnet = MMSDNet
dafnet = MMSDNet
