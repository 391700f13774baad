"""The MMSDNet/DAFNet plug-in: state, the three updates of a step, SWA, prediction, host batches.

The generator's loss is `generator_loss.py`, its terms `terms.py`, the networks `networks.py`,
the config section `config.py`; see the package docstring for the method.

  python -m pytest -q tests/methods/test_mmsdnet.py
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from unpaired_seg.methods import averaging
from unpaired_seg.methods.base import ExtraResults, Method, count_parameters
from unpaired_seg.methods.mmsdnet import config as config_lib
from unpaired_seg.methods.mmsdnet import generator_loss as generator_lib
from unpaired_seg.methods.mmsdnet import pairing as pairing_lib
from unpaired_seg.methods.mmsdnet import terms
from unpaired_seg.methods.mmsdnet.networks import (Generator, MMSDNetState, generator_optimizer,
                                                   split_variables)
from unpaired_seg.nn import discriminators as disc_lib
from unpaired_seg.nn import stn as stn_lib
from unpaired_seg.ops import losses, precision, similarity, tps


class MMSDNet(Method):
  """The disentangle-align-fuse method; `config.mmsdnet` chooses the conference or journal model."""

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int,
               modalities: Sequence[str], num_data_shards: int = 1):
    config_lib.check(config, modalities)
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
    gen_params, gen_stats = split_variables(dict(gen_vars))
    masks = jnp.zeros(x.shape[:3] + (self.num_classes,), jnp.float32)
    mask_params, mask_stats = split_variables(dict(jax.jit(self.mask_disc.init)(m_rng, masks)))
    params = {"generator": gen_params, "mask_disc": mask_params, "image_disc": {}}
    stats = {"generator": gen_stats, "mask_disc": mask_stats, "image_disc": {}}
    if self.use_image_disc:
      for m, r in zip(self.modalities, i_rngs):
        p, st = split_variables(dict(jax.jit(self.image_disc.init)(r, x)))
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
            "transformer": s.transformer.to_dict(), "swa_start": s.swa_start}

  # -- forward pieces -------------------------------------------------------------------------
  def apply_generator(self, params, stats, part: str, *args, train=False, rngs=None):
    """Applies one generator part (a `Generator` method); in training the batch-norm statistics
    are updated: (output, stats)."""
    params, args = self._cast_in(params, args)
    variables = {**params, **stats}
    fn = getattr(Generator, part)
    if part in ("anatomy", "segment"):
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

  def warp(self, params, stats, moving, fixed, active=None, values=None):
    """`values` (default: `moving`) warped with the transformer's displacements of `moving` onto
    `fixed`; unwarped while `active` is False (a traced bool: no gradient reaches the transformer
    then) or with the transformer off."""
    values = moving if values is None else values
    if not self.settings.stn:
      return values
    displacements = self.apply_generator(params, stats, "displacements", moving, fixed)[0]
    warped = tps.thin_plate_spline(values, displacements.astype(values.dtype))
    return warped if active is None else jnp.where(active, warped, values)

  def fused_probabilities(self, params, stats, image, modality, partner):
    """Multi-input prediction: [B, H, W, C] image, [B, k, H, W, C] partner slices -> [B, H, W, K].

    The partner's anatomy is aligned to the image's, fused by maximum and segmented; with k > 1
    candidates the k predictions are summed with the pair-weighting network's weights.
    """
    other = self.other(modality)
    b, k = partner.shape[:2]
    s_j, _ = self.apply_generator(params, stats, "anatomy", image, modality)
    s_p, _ = self.apply_generator(params, stats, "anatomy",
                                  partner.reshape((b * k,) + partner.shape[2:]), other)
    s_rep = jnp.repeat(s_j, k, axis=0)                                   # [B k, H, W, A]
    deformed = self.warp(params, stats, s_p, s_rep)
    fused = stn_lib.max_fusion(s_rep, deformed)
    logits, _ = self.apply_generator(params, stats, "segment", fused, modality)
    probs = jax.nn.softmax(logits.astype(jnp.float32), -1).reshape((b, k) + logits.shape[1:])
    weights = self._pair_weights(params, stats, s_rep, deformed, b, k)   # [B, k]
    return jnp.einsum("bk,bkhwc->bhwc", weights, probs)

  def _pair_weights(self, params, stats, s_rep, deformed, b, k):
    if k == 1:
      return jnp.ones((b, 1), jnp.float32)
    scores = similarity.soft_dice_per_sample(s_rep, deformed).reshape(b, k)
    return self.apply_generator(params, stats, "weigh", scores)[0]

  def other(self, modality: str) -> str:
    return self.modalities[1 - self.modalities.index(modality)]

  def predict(self, state: MMSDNetState, image: jax.Array, modality: str) -> jax.Array:
    """Single input: own anatomy -> segmentor, with the averaged (SWA) weights."""
    s, _ = self.apply_generator(state.swa_params, state.swa_stats, "anatomy", image, modality)
    return self.apply_generator(state.swa_params, state.swa_stats, "segment", s, modality)[0]

  def predict_displacements(self, state: MMSDNetState, image: jax.Array, modality: str,
                            partner: jax.Array) -> jax.Array:
    """[B, K, 2] control-point offsets that align `partner` [B, H, W, C] (the other modality's
    slices) onto `image` [B, H, W, C], with the SWA weights; zeros with the transformer off."""
    params, stats = state.swa_params, state.swa_stats
    s_j, _ = self.apply_generator(params, stats, "anatomy", image, modality)
    s_p, _ = self.apply_generator(params, stats, "anatomy", partner, self.other(modality))
    if not self.settings.stn:
      points = stn_lib.SpatialTransformer.grid_size ** 2
      return jnp.zeros((image.shape[0], points, 2), jnp.float32)
    return self.apply_generator(params, stats, "displacements", s_p, s_j)[0]

  def predict_multi(self, state: MMSDNetState, image: jax.Array, modality: str,
                    partner: jax.Array) -> jax.Array:
    """Multi input (fused anatomy), class probabilities [B, H, W, K], with the SWA weights."""
    return self.fused_probabilities(state.swa_params, state.swa_stats, image, modality, partner)

  # -- losses ---------------------------------------------------------------------------------
  def disc_scores(self, disc, params, stats, x, update: bool):
    """A discriminator's scores of `x`: (scores, stats, penalty); `update` runs the power
    iterations (and the code's penalty) and returns their new state."""
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
    See `generator_loss.generator_loss`."""
    return generator_lib.generator_loss(self, gen_params, gen_stats, disc_params, disc_stats,
                                        batch, rng, step)

  def mask_disc_loss(self, params, stats, real_masks, real_weight, fake_masks):
    """LS-GAN loss of the mask discriminator; real masks weighted by `real_weight` [N]."""
    real, stats, pen_r = self.disc_scores(self.mask_disc, params, stats, real_masks, update=True)
    fake, stats, pen_f = self.disc_scores(self.mask_disc, params, stats, fake_masks, update=True)
    loss = terms.mask_discriminator(real, fake, real_weight)
    return loss + 0.5 * (pen_r + pen_f), stats

  def image_disc_loss(self, params, stats, real_images, fake_images):
    real, stats, pen_r = self.disc_scores(self.image_disc, params, stats, real_images, update=True)
    fake, stats, pen_f = self.disc_scores(self.image_disc, params, stats, fake_images, update=True)
    return losses.lsgan_discriminator_loss(real, fake) + 0.5 * (pen_r + pen_f), stats

  # -- updates --------------------------------------------------------------------------------
  def _apply_updates(self, state: MMSDNetState, part: str, grads, stats) -> MMSDNetState:
    """One Adam step of `part` ('generator', 'mask_disc' or 'image_disc') and its new stats."""
    updates, opt = self.tx[part].update(grads, state.opt_state[part], state.params[part])
    return state.replace(
        params={**state.params, part: optax.apply_updates(state.params[part], updates)},
        stats={**state.stats, part: stats}, opt_state={**state.opt_state, part: opt})

  def generator_update(self, state: MMSDNetState, batch: dict, rng: jax.Array):
    """One Adam step of the generator; returns (state, metrics, fakes)."""
    grad_fn = jax.grad(self.generator_loss, has_aux=True)
    grads, (gen_stats, metrics, fakes) = grad_fn(
        state.params["generator"], state.stats["generator"], state.params, state.stats, batch, rng,
        state.step)
    metrics["generator_grad_norm"] = optax.tree.norm(grads)
    return self._apply_updates(state, "generator", grads, gen_stats), metrics, fakes

  def real_masks(self, batch: dict) -> tuple[jax.Array, jax.Array]:
    """One-hot labels of every modality's slices [N, H, W, K] and their `labelled` weights [N]."""
    return terms.real_masks(batch, self.modalities, self.num_classes)

  def mask_disc_update(self, state: MMSDNetState, real_masks, real_weight, fake_masks):
    grad_fn = jax.value_and_grad(self.mask_disc_loss, has_aux=True)
    (loss, stats), grads = grad_fn(state.params["mask_disc"], state.stats["mask_disc"],
                                   real_masks, real_weight, fake_masks)
    return self._apply_updates(state, "mask_disc", grads, stats), loss

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
    return self._apply_updates(state, "image_disc", grads, stats), loss

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
    swa_params, count = averaging.swa_update(state.swa_params, state.params["generator"],
                                             state.swa_count, active)
    swa_stats, _ = averaging.swa_update(state.swa_stats, state.stats["generator"],
                                        state.swa_count, active)
    metrics["loss"] = metrics["generator_loss"]
    metrics["swa_count"] = count.astype(jnp.float32)
    return state.replace(step=step, swa_params=swa_params, swa_stats=swa_stats,
                         swa_count=count), metrics

  # -- host side ------------------------------------------------------------------------------
  def host_batch(self, data, step: int, rows: slice | None = None) -> dict:
    """Each modality's sampled slices with their partner candidates; a pure function of `step`."""
    return pairing_lib.host_batch(data, step, pairing=self.settings.pairing, k=self.k,
                                  window=self.settings.pair_window, seed=self.seed, rows=rows)

  def extra_evaluations(self, state, data, *, config, workdir, settings,
                        checkpoint_step: int) -> ExtraResults:
    """Multi-input test metrics, the alignment of the partner labels and the disentanglement
    analysis (see `evaluation.py`); the analysis' files for the trainer to write."""
    from unpaired_seg.methods.mmsdnet import evaluation  # matplotlib only after training
    del workdir, checkpoint_step
    return evaluation.extra_evaluations(self, state, data, config=config, settings=settings)
