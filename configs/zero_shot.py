"""Zero labels for one modality: `joint` trained on the other modality's labels, its images'
intensities randomised (GIN + IPA, SLAug's global and local location-scale), the target's images
unlabelled in every batch.

  python -m unpaired_seg.main --config=configs/zero_shot.py:data=/tmp/abdomen_ctmr_2mm,target=mr \
      --workdir=runs/zero_shot_mr
  python -m unpaired_seg.main --config=configs/zero_shot.py:tiny --workdir=/tmp/zero_shot_tiny

Arguments: data=<a prepared dataset> (default: the phantom), target=mr|ct (the modality without
labels; the other keeps all of them), tiny. The training recipe is Table II's (class-balanced
sampling, CT clipped to its foreground percentiles and z-scored, polynomial decay, EMA weights);
experiments/zero_shot_abdomen.py compares the randomisations.
"""

from configs import common


def randomization(config, kind: str) -> None:
  """`data.augment.intensity` for a kind: 'none', 'gin' (with IPA), 'slaug' (global + local) or
  'all' (each labelled sample draws GIN, else global, else local)."""
  settings = {"none": {},
              "gin": dict(p_gin=1.0, p_ipa=0.5),
              "slaug": dict(p_global=0.5, p_local=1.0),
              "all": dict(p_gin=0.4, p_ipa=0.5, p_global=0.3, p_local=0.5)}
  if kind not in settings:
    raise ValueError(f"randomization {kind!r} is not one of {sorted(settings)}")
  config.data.augment.intensity.update(settings[kind])


def recipe(config) -> None:
  """Table II's training recipe on real data."""
  config.data.oversample = "class"
  config.data.foreground_fraction = 0.33
  config.data.normalization = "ct=foreground_zscore"
  config.train.lr_schedule = "poly"
  config.train.ema_decay = 0.999


def get_config(arg=None):
  args = common.parse_arg(arg, tiny=False, data="", target="mr", randomization="all")
  config = common.get_base_config(tiny=args.tiny)
  if args.data:
    common.use_prepared_data(config, args.data)
    recipe(config)
  config.method = "joint"
  config.data.target_modality = args.target
  config.data.label_fraction = 0.0
  randomization(config, args.randomization)
  # No target labels in training, so none to pick a checkpoint by: the last one is the model.
  config.eval.checkpoint = "latest"
  return config
