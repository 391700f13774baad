"""The `mmsdnet` config section: its schema, the authors' defaults and the checks across its keys.

The options of how the spatial transformer is trained that are not the authors' are one
sub-section, `mmsdnet.transformer`; its defaults are the authors' transformer, trained by every
loss from step 0.

  python -m unpaired_seg.main --config=configs/mmsdnet.py --config.mmsdnet.transformer.start=0 \
      --workdir=/tmp/mmsdnet
"""

import ml_collections

from unpaired_seg import config_schema as cs
from unpaired_seg.methods.mmsdnet import pairing as pairing_lib
from unpaired_seg.nn import discriminators as disc_lib

VARIANTS = ("mmsdnet", "dafnet")
DECODERS = ("film", "spade")

TRANSFORMER_SCHEMA = {
    # 1 - soft Dice between each slice and its partner warped onto it, a registration term that
    # trains the transformer only (its inputs and targets held fixed); 0 = off. Of the two
    # anatomies ('anatomy') or of their organ masks ('masks': the label of a labelled slice, else
    # the segmentor's prediction; per organ, background left out).
    "align_weight": cs.number(0.0),
    "align_target": cs.choice("anatomy", "masks"),
    # What trains the transformer: every loss (the authors'), or the align term alone (the other
    # losses still train the encoders through the warp, but not the transformer).
    "trained_by": cs.choice("all", "align"),
    # What the other losses' gradients see of the warp: 'warp' (the authors') differentiates
    # through it into the partner's encoder, the transformer and its inputs; 'identity' passes the
    # warped factor forward but its gradient to the partner's anatomy as if unwarped
    # (straight-through), so no encoder can lean on the warp: the align term alone trains it.
    "warp_gradient": cs.choice("warp", "identity"),
    # The squared control-point offsets averaged over the batch's pairs (per direction, normalised
    # [0, 1] units); trains the transformer only; 0 = off. A warp that every pair shares is a bias
    # of an encoder, not a misalignment of the pairs.
    "mean_offset_weight": cs.number(0.0),
    # The transformer stays the identity (and untrained) before this step.
    "start": cs.non_negative_int(),
}

SCHEMA = {
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
    "weights": {k: cs.number(0.0) for k in ("kl", "sup", "adv_mask", "rec", "adv_image", "z_rec")},
    # 'stn': the spatial transformer's own Adam rate inside the generator step (0 = 'generator').
    "learning_rate": {k: cs.number(0.0) for k in ("generator", "stn", "mask_disc", "image_disc")},
    "swa_start": cs.non_negative_int(),
    "transformer": TRANSFORMER_SCHEMA,        # not the authors': how the transformer is trained
    "analysis": cs.BOOL,                      # disentanglement.json, traversal.png after training
    "analysis_slices": cs.positive_int(),     # test slices per modality for the analysis
}


def register_config() -> None:
  """Declares the `mmsdnet` section to `config_schema` (idempotent; `validate` calls it)."""
  cs.register_section("mmsdnet", SCHEMA)


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
      disc_padding="VALID", spectral="paper", supervised="paper",
      weights=dict(kl=0.1, sup=10.0, adv_mask=1.0, rec=1.0 if journal else 10.0,
                   adv_image=1.0 if journal else 0.0, z_rec=1.0),
      learning_rate=dict(generator=1e-4, stn=0.0, mask_disc=1e-4, image_disc=1e-4),
      swa_start=0,
      transformer=dict(align_weight=0.0, align_target="masks", trained_by="all",
                       warp_gradient="warp", mean_offset_weight=0.0, start=0),
      analysis=True, analysis_slices=64))


def check(config: ml_collections.ConfigDict, modalities) -> None:
  """The checks that involve more than one key (each key alone is the schema's); ConfigError."""
  if "mmsdnet" not in config:
    raise cs.ConfigError(f"config method {config.method!r} needs a 'mmsdnet' section "
                         "(configs/mmsdnet.py or configs/dafnet.py)")
  if len(modalities) != 2:
    raise cs.ConfigError(f"config key 'data.modalities': {config.method} pairs exactly two "
                         f"modalities, got {tuple(modalities)}")
  if config.data.context_slices:
    raise cs.ConfigError(f"config key 'data.context_slices': {config.method} is 2D, use 0")
  t = config.mmsdnet.transformer
  if t.trained_by == "align" and not t.align_weight:
    raise cs.ConfigError("config key 'mmsdnet.transformer.trained_by': 'align' trains the "
                         "transformer by the registration term alone; set "
                         "'mmsdnet.transformer.align_weight' > 0")
  if t.warp_gradient == "identity" and not t.align_weight:
    raise cs.ConfigError("config key 'mmsdnet.transformer.warp_gradient': 'identity' leaves the "
                         "transformer to the registration term; set "
                         "'mmsdnet.transformer.align_weight' > 0")
