"""MMSDNet (the conference model): separate anatomy U-Nets, FiLM decoder, mask discriminator only.

Runs on the embedded phantom in PAIRED mode (the same subjects in MR and CT, expert pairs), sized
for a 2-core CPU (64 x 64 slices, narrow networks); the authors' widths are in
`unpaired_seg.methods.mmsdnet.default_section`; why each setting differs from theirs:
experiments/results/mmsdnet_config.md.

  python -m unpaired_seg.main --config=configs/mmsdnet.py --workdir=/tmp/mmsdnet
  python -m unpaired_seg.main --config=configs/mmsdnet.py:tiny --workdir=/tmp/mmsdnet_tiny
  python -m unpaired_seg.main --config=configs/mmsdnet.py:label_fraction=0,target=ct,stn=off \
      --workdir=/tmp/mmsdnet_zero_shot

Arguments: decoder=film|spade, label_fraction=<fraction of the target's training subjects that
keep labels> (with target=<modality>, default ct; 1 = fully labelled), pairing=expert|auto|random|
cross_subject (cross_subject switches the phantom to unpaired subjects), stn=on|off,
misalignment=<the paired phantom's in-plane deformation between MR and CT as a multiple of the
default's ~2 voxels, 0..4>, tiny.
"""

from configs import common
from unpaired_seg.methods import mmsdnet as mmsdnet_lib


def build(arg, variant: str):
  """The config of `variant` ('mmsdnet' or 'dafnet') with the shared `:arg` settings."""
  args = common.parse_arg(arg, tiny=False, decoder="film", label_fraction=1.0, target="ct",
                          pairing="expert", stn=True, misalignment=1.0)
  config = common.get_base_config(tiny=args.tiny)
  config.method = variant
  section = mmsdnet_lib.default_section(variant)
  section.decoder = args.decoder
  section.pairing = args.pairing
  section.stn = args.stn

  data = config.data
  data.phantom.mode = "unpaired" if args.pairing == "cross_subject" else "paired"
  if args.misalignment != 1:
    if data.phantom.mode != "paired":
      raise ValueError("configs/mmsdnet.py: argument 'misalignment' needs a paired phantom, not "
                       f"pairing={args.pairing}")
    data.phantom.pair_misalignment = float(args.misalignment)
  # The authors' only augmentation: every slice rotated within +-20 degrees, nothing else.
  data.augment.update(rotate_deg=20.0, p_rotate=1.0, scale=(1.0, 1.0), p_scale=0.0, p_noise=0.0,
                      p_blur=0.0, p_brightness=0.0, p_contrast=0.0, p_lowres=0.0, p_gamma=0.0,
                      p_gamma_inverted=0.0)
  if args.label_fraction < 1.0:
    data.target_modality = args.target
    data.label_fraction = args.label_fraction

  # Each choice's figures, and the commands they came from: experiments/results/mmsdnet_config.md.
  # CPU size: 64 x 64 phantom slices, the anatomy U-Net a quarter of the authors' width (narrower
  # learned too slowly for a CPU budget), the other networks narrower still.
  section.update(anatomy_features=16, anatomy_depth=4, segmentor_features=16, modality_features=8,
                 modality_hidden=16, decoder_features=8, spade_hidden=32, spade_upsamples=4,
                 stn_features=8, stn_hidden=32, image_disc_features=8,
                 mask_disc_features=4 if variant == "mmsdnet" else 8)
  # The transformer keeps the authors' 1e-4: at the generator's 2e-3 its unbounded offsets drift.
  section.learning_rate.update(generator=2e-3, stn=1e-4, mask_disc=1e-3, image_disc=1e-3)
  # Keras' 0.99 leaves a quarter of the initial statistics in after 130 steps: evaluation (which
  # uses the running statistics) of a run of a few hundred steps needs a faster average.
  section.bn_momentum = 0.9
  # Partner slices move with their own slice's augmentation, so pairs stay aligned.
  section.augment_partners = True
  # The transformer stays the identity until the labelled modality has anchored the anatomies
  # (trained from step 0, it and the label-free target's encoder shift against each other).
  section.transformer.start = 300
  # The transformer is trained by a registration term alone (not the authors'): the partner's organ
  # masks warped onto the slice's (labels where there are, else the segmentor's prediction); it
  # registers misaligned pairs, which it did not when trained by every loss.
  section.transformer.update(align_weight=1.0, align_target="masks", trained_by="align")
  section.analysis_slices = 48
  config.model.depth = section.anatomy_depth
  config.train.batch_size = 4
  config.train.steps = 1000
  config.train.log_every = 50
  config.train.eval_every = 250
  config.train.checkpoint_every = 250
  section.swa_start = 700
  config.eval.max_val_cases = 2

  if args.tiny:
    section.update(anatomy_features=4, anatomy_depth=2, segmentor_features=8, modality_features=4,
                   modality_hidden=8, decoder_features=4, spade_hidden=8, spade_upsamples=4,
                   stn_features=4, stn_hidden=8, pair_hidden=5, mask_disc_features=2,
                   image_disc_features=2, disc_padding="SAME", swa_start=4, analysis_slices=8)
    section.transformer.start = 0
    config.model.depth = 2
    config.train.steps = 8
    config.train.log_every = 2
    config.train.eval_every = 4
    config.train.checkpoint_every = 4
    config.eval.metrics = ("dice",)
  config.mmsdnet = section
  return config


def get_config(arg=None):
  return build(arg, "mmsdnet")
