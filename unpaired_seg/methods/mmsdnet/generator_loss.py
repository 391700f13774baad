"""The generator's loss of one MMSDNet/DAFNet step: its forward pass, stage by stage, and the terms.

Both directions go through each network in one batched pass (one anatomy pass per modality, one
pass of the transformer, segmentor, modality encoder and decoder): the step compiles several
times faster than with a pass per direction and term. The stages, in order, each a function:
  anatomies           own slices and the candidates each modality gives the other
  align_candidates    the candidates warped onto their slice's anatomy, and the pair weights
  modality_codes      z of every slice (one VAE pass)
  segment / decode    own, deformed (and fused) anatomies; the prior samples' images
  re_encode           z reconstruction of the prior samples
  mask_scores         the mask discriminator on every predicted mask
  modality_terms      a modality's weighed terms (`terms.py`)
and the transformer's optional terms (`config.mmsdnet.transformer`): `alignment_loss` and
`mean_offset_loss`. `method` is the `MMSDNet` plug-in, whose `apply_generator` runs one part of
the generator.

  python -m pytest -q tests/methods/test_mmsdnet.py -k "generator or alignment or offset"
"""

import dataclasses

import jax
import jax.numpy as jnp

from unpaired_seg.methods.mmsdnet import terms
from unpaired_seg.nn import stn as stn_lib
from unpaired_seg.ops import losses, similarity


@dataclasses.dataclass
class Forward:
  """What the stages hand on; dicts keyed by modality, or by (modality, 'own' / 'deformed' /
  'fused') for the anatomies the segmentor and the decoder see."""
  own: dict
  cand: dict            # cand[m]: [N_m k, H, W, A], the candidates of m's slices
  fixed: terms.Stack    # every modality's own anatomies, each repeated k times
  deformed: dict
  pair_weights: dict    # [N_m, k]
  names: list           # 'deformed' (and 'fused')
  anatomies: dict = None
  keys: list = None
  logits: dict = None
  decoded: dict = None
  z_prior: dict = None
  z_back: dict = None
  probs: dict = None
  mask_scores: dict = None


def generator_loss(method, params, stats, disc_params, disc_stats, batch, rng, step=None):
  """The generator's weighted loss; aux = (new stats, metrics, fakes for the discriminators)."""
  s, mods = method.settings, method.modalities
  key_sample, key_prior = jax.random.split(rng)
  own, cand, stats = anatomies(method, params, stats, batch)
  active = transformer_active(s.transformer, step)
  fw = align_candidates(method, params, stats, own, cand, active)
  codes = modality_codes(method, params, stats, fw, batch, key_sample)
  stats = segment(method, params, stats, fw)
  y_prior = decode(method, params, stats, fw, codes, key_prior)
  fw.z_back = re_encode(method, params, stats, y_prior)
  fw.mask_scores = mask_scores(method, fw, disc_params, disc_stats)
  metrics, total = {}, jnp.zeros((), jnp.float32)
  fakes = {"masks": jax.lax.stop_gradient(jnp.concatenate([fw.probs[key] for key in fw.keys])),
           "images": {}}
  for m in mods:
    values, images = modality_terms(method, m, fw, codes, batch, disc_params, disc_stats)
    fakes["images"][m] = jax.lax.stop_gradient(images)
    total = total + terms.weighted_sum(values, s.weights)
    metrics.update({f"{name}_{m}": v for name, v in values.items()})
  t = s.transformer
  if t.align_weight > 0 and s.stn:
    metrics["align"] = alignment_loss(method, params, stats, cand, fw.fixed.value, fw.probs,
                                      batch, active)
    total = total + t.align_weight * metrics["align"]
  if t.mean_offset_weight > 0 and s.stn:
    metrics["mean_offset"] = mean_offset_loss(method, params, stats, cand, fw.fixed, active)
    total = total + t.mean_offset_weight * metrics["mean_offset"]
  metrics["generator_loss"] = total
  return total, (stats, metrics, fakes)


def transformer_active(transformer, step):
  """None (always on), or a traced bool: whether `step` has reached `transformer.start`."""
  return None if step is None or not transformer.start else step >= transformer.start


def anatomies(method, params, stats, batch):
  """One anatomy pass per modality m over its slices and the candidates it gives the other:
  (own {m: [N_m, H, W, A]}, cand {o: [N_o k, H, W, A]}, stats)."""
  own, cand = {}, {}
  for m in method.modalities:
    o = method.other(m)
    partner = batch[o]["partner_image"]                                  # [N_o, k, H, W, C]
    n = batch[m]["image"].shape[0]
    stacked = jnp.concatenate([batch[m]["image"], partner.reshape((-1,) + partner.shape[2:])])
    factors, stats = method.apply_generator(params, stats, "anatomy", stacked, m, train=True)
    own[m], cand[o] = factors[:n], factors[n:]
  return own, cand, stats


def align_candidates(method, params, stats, own, cand, active) -> Forward:
  """Every candidate warped onto its slice's anatomy, and the weights of the k candidates."""
  s, mods, k = method.settings, method.modalities, method.k
  fixed = terms.Stack([jnp.repeat(own[m], k, axis=0) for m in mods])
  warp_params = params
  if s.transformer.trained_by == "align":   # no gradient of these terms reaches the transformer
    warp_params = {**params, "params": {
        **params["params"],
        "transformer": jax.lax.stop_gradient(params["params"]["transformer"])}}
  moving = jnp.concatenate([cand[m] for m in mods])
  deformed = method.warp(warp_params, stats, moving, fixed.value, active)
  if s.transformer.warp_gradient == "identity":
    deformed = terms.straight_through_warp(moving, deformed)
  deformed = fixed.split(deformed)
  n = {m: own[m].shape[0] for m in mods}
  if k == 1:
    pair_w = {m: jnp.ones((n[m], 1), jnp.float32) for m in mods}
  else:
    scores = similarity.soft_dice_per_sample(fixed.value, jnp.concatenate(deformed))
    weights = method.apply_generator(params, stats, "weigh", scores.reshape(-1, k))[0]
    pair_w = dict(zip(mods, terms.Stack([jnp.zeros((n[m], k)) for m in mods]).split(weights)))
  names = ["deformed"] + (["fused"] if s.train_on_fused else [])
  return Forward(own=own, cand=cand, fixed=fixed, deformed=dict(zip(mods, deformed)),
                 pair_weights=pair_w, names=names)


def modality_codes(method, params, stats, fw: Forward, batch, key) -> dict:
  """{'z', 'mean', 'logvar'}: {m: [N_m, Z]} of every slice, from one VAE pass."""
  mods = method.modalities
  stack = terms.Stack([batch[m]["image"] for m in mods])
  outputs = method.apply_generator(params, stats, "encode_modality",
                                   jnp.concatenate([fw.own[m] for m in mods]), stack.value, True,
                                   rngs={"sample": key})[0]
  return {name: dict(zip(mods, stack.split(v))) for name, v in zip(("z", "mean", "logvar"),
                                                                    outputs)}


def _anatomy_inputs(method, fw: Forward) -> dict:
  """{(m, 'own' / 'deformed' / 'fused'): anatomy}, in the order of the stacked passes."""
  out = {(m, "own"): fw.own[m] for m in method.modalities}
  for m in method.modalities:
    out[(m, "deformed")] = fw.deformed[m]
    if "fused" in fw.names:
      out[(m, "fused")] = stn_lib.max_fusion(fw.fixed.parts[method.modalities.index(m)],
                                             fw.deformed[m])
  return out


def segment(method, params, stats, fw: Forward):
  """One segmentor pass over every anatomy; fills fw.keys, fw.logits, fw.probs; new stats."""
  fw.anatomies = _anatomy_inputs(method, fw)
  fw.keys = list(fw.anatomies)
  stack = terms.Stack([fw.anatomies[key] for key in fw.keys])
  logits, stats = method.apply_generator(params, stats, "segment", stack.value,
                                         method.modalities[0], train=True)
  fw.logits = dict(zip(fw.keys, stack.split(logits)))
  fw.probs = {key: jax.nn.softmax(v.astype(jnp.float32), -1) for key, v in fw.logits.items()}
  return stats


def decode(method, params, stats, fw: Forward, codes: dict, key) -> dict:
  """One decoder pass over every anatomy with its slice's z, and over the own anatomies with
  prior samples z ~ N(0, I) (fw.z_prior); fills fw.decoded, returns the prior samples' images."""
  mods, k, z = method.modalities, method.k, codes["z"]
  fw.z_prior = {m: jax.random.normal(jax.random.fold_in(key, i), z[m].shape, z[m].dtype)
                for i, m in enumerate(mods)}
  with_code = [z[m] if name == "own" else jnp.repeat(z[m], k, axis=0) for m, name in fw.keys]
  stack = terms.Stack([fw.anatomies[key] for key in fw.keys] + [fw.own[m] for m in mods])
  codes_in = jnp.concatenate(with_code + [fw.z_prior[m] for m in mods])
  decoded = stack.split(method.apply_generator(params, stats, "decode", stack.value, codes_in)[0])
  fw.decoded = dict(zip(fw.keys, decoded[:len(fw.keys)]))
  return dict(zip(mods, decoded[len(fw.keys):]))


def re_encode(method, params, stats, y_prior: dict) -> dict:
  """The means re-encoded (anatomy and mean heads) from the prior samples' images.

  The pass normalises with its batch statistics but does not update the running ones: those must
  describe real images, or inference (which uses them) sees a mixture with decoded images.
  """
  mods = method.modalities
  anatomy = [method.apply_generator(params, stats, "anatomy", y_prior[m], m, train=True)[0]
             for m in mods]
  stack = terms.Stack([y_prior[m] for m in mods])
  z_back = method.apply_generator(params, stats, "encode_modality", jnp.concatenate(anatomy),
                                  stack.value, False)[0][1]
  return dict(zip(mods, stack.split(z_back)))


def mask_scores(method, fw: Forward, disc_params, disc_stats) -> dict:
  """The mask discriminator's scores of every predicted mask, in one pass, by anatomy key."""
  scores = method.disc_scores(
      method.mask_disc, disc_params["mask_disc"], disc_stats["mask_disc"],
      jnp.concatenate([fw.probs[key] for key in fw.keys]), update=False)[0]
  return dict(zip(fw.keys, terms.Stack([fw.logits[key] for key in fw.keys]).split(scores)))


def modality_terms(method, m: str, fw: Forward, codes: dict, batch, disc_params, disc_stats):
  """Modality m's terms ({name: value}, metrics too) and the images its image discriminator
  takes as fakes (own, deformed (and fused) reconstructions)."""
  s, k = method.settings, method.k
  x, y = batch[m]["image"], batch[m]["label"]
  labelled = batch[m]["labelled"].astype(jnp.float32)
  sup = terms.supervised(fw.logits[(m, "own")], y, labelled, s.supervised)
  values = {"sup_own": sup}
  rec = losses.l1_loss(fw.decoded[(m, "own")], x)
  x_rep, y_rep = jnp.repeat(x, k, axis=0), jnp.repeat(y, k, axis=0)
  for name in fw.names:
    per = terms.supervised_per_sample(fw.logits[(m, name)], y_rep, s.supervised)
    sup = sup + terms.candidate_supervised(per.reshape(x.shape[0], k), labelled,
                                           fw.pair_weights[m])
    rec = rec + terms.candidate_reconstruction(fw.decoded[(m, name)], x_rep, fw.pair_weights[m])
  values["kl"] = losses.kl_divergence_gaussian(codes["mean"][m], codes["logvar"][m])
  values.update(sup=sup, rec=rec, z_rec=terms.z_reconstruction(fw.z_back[m], fw.z_prior[m]))
  values["adv_mask"] = losses.lsgan_generator_loss(
      jnp.concatenate([fw.mask_scores[(m, name)] for name in ["own"] + fw.names]))
  images = jnp.concatenate([fw.decoded[(m, name)] for name in ["own"] + fw.names])
  values["adv_image"] = jnp.zeros((), jnp.float32)
  if method.use_image_disc:
    scores = method.disc_scores(method.image_disc, disc_params["image_disc"][m],
                                disc_stats["image_disc"][m], images, update=False)[0]
    values["adv_image"] = losses.lsgan_generator_loss(scores)
  values["pair_weight_max"] = jnp.mean(jnp.max(fw.pair_weights[m], axis=1))
  return values, images


def alignment_loss(method, params, stats, cand, fixed, probs, batch, active):
  """The optional registration term (`transformer.align_weight`); trains the transformer only.

  Every input of the transformer and every target is held fixed (stop-gradient), so the
  encoders cannot make the term easy (e.g. by turning every anatomy channel on). 'anatomy':
  1 - soft Dice (pooled over channels) of each slice's anatomy and its candidates' warped onto
  it. 'masks': the candidates' organ masks (the segmentor's softmax of their anatomy) warped with
  the transformer's displacements, against the slice's mask (its one-hot label when labelled,
  else the softmax of its own anatomy's segmentation); 1 - soft Dice per organ and sample,
  background left out, averaged.
  """
  mods = method.modalities
  moving = jax.lax.stop_gradient(jnp.concatenate([cand[m] for m in mods]))
  fixed = jax.lax.stop_gradient(fixed)
  if method.settings.transformer.align_target == "anatomy":
    return terms.anatomy_alignment(fixed, method.warp(params, stats, moving, fixed, active))
  # Candidates' masks: a segmentor pass over their (unwarped) anatomy, batch statistics not kept.
  cand_logits = method.apply_generator(params, stats, "segment", moving, mods[0], train=True)[0]
  cand_masks = jax.lax.stop_gradient(jax.nn.softmax(cand_logits.astype(jnp.float32), -1)[..., 1:])
  moved = method.warp(params, stats, moving, fixed, active, values=cand_masks)
  target = jnp.concatenate([
      terms.mask_targets(batch[m]["label"], batch[m]["labelled"].astype(jnp.float32),
                         probs[(m, "own")], method.num_classes, method.k) for m in mods])
  return terms.mask_alignment(moved, jax.lax.stop_gradient(target))


def mean_offset_loss(method, params, stats, cand, fixed: terms.Stack, active):
  """The optional `transformer.mean_offset_weight` term; trains the transformer only (inputs
  held fixed).

  Per direction (partners of each modality's slices) the control-point offsets are averaged over
  the batch's pairs; the term is the mean square of that average field, 0 while `active` is
  False. The misalignments of independent pairs average out; an offset shared by every pair is
  the transformer making up for an encoder's bias (e.g. a label-free modality's organs segmented
  too large), which then moves the partners' labels away from the slices'.
  """
  moving = jax.lax.stop_gradient(jnp.concatenate([cand[m] for m in method.modalities]))
  displacements = method.apply_generator(params, stats, "displacements", moving,
                                         jax.lax.stop_gradient(fixed.value))[0]
  displacements = displacements.astype(jnp.float32)
  return terms.mean_offset(fixed.split(displacements), active)
