"""Defaults shared by every method's config, and the `:arg` parser.

Each `configs/<method>.py` starts from `get_base_config(...)` and overrides only what differs:

  python -m unpaired_seg.main --config=configs/joint.py:tiny --workdir=/tmp/joint
  python -m unpaired_seg.main --config=configs/joint.py --config.train.steps=100 --workdir=/tmp/joint
"""

import dataclasses

import ml_collections

from unpaired_seg.data import randomize

ConfigDict = ml_collections.ConfigDict


def parse_arg(arg: str | None, **defaults) -> ConfigDict:
  """Parses 'tiny,variant=v1,label_fraction=0.5' into a ConfigDict over `defaults`.

  A bare word sets a boolean default to True. Every key must be one of `defaults`, and a value is
  converted to the type of its default, so a typo fails here with the key named.
  """
  result = ConfigDict(dict(defaults))
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is not one of {sorted(defaults)}")
    default = defaults[key]
    if not sep:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      result[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0", "on", "off"):
        raise ValueError(f"config argument {key}={value!r} is not a boolean")
      result[key] = value.lower() in ("true", "1", "on")
    else:
      try:
        result[key] = type(default)(value)
      except ValueError as e:
        raise ValueError(f"config argument {key}={value!r}: expected {type(default).__name__}") from e
  return result


def get_base_config(tiny: bool = False) -> ConfigDict:
  """Defaults: a 2D U-Net trained on the embedded phantom, sized for a 2-core CPU."""
  c = ConfigDict()
  c.method = "joint"
  c.seed = 0

  c.data = ConfigDict()
  c.data.dataset = "phantom"          # 'phantom' (generated on first use) or 'folder' (data.root)
  c.data.root = ""                    # dataset folder; for the phantom '' means the cache folder
  c.data.modalities = ("mr", "ct")    # modalities to train on, in this order
  # pair_misalignment: paired mode's in-plane deformation between modalities, x the default.
  c.data.phantom = ConfigDict(dict(mode="unpaired", num_subjects=20, shape=(64, 64, 24), seed=0,
                                   pair_misalignment=1.0))
  c.data.image_size = (64, 64)        # in-plane crop/pad size of the 2D slices
  c.data.context_slices = 0           # 0: 2D; 1: 2.5D (three adjacent slices as channels)
  c.data.foreground_fraction = 0.5    # share of sampled slices that contain a labelled structure
  # How those slices are drawn: 'foreground' (any labelled structure) or 'class' (a class drawn
  # uniformly first, then a slice or patch centre that contains it: nnU-Net's class balance).
  c.data.oversample = "foreground"
  # Semi-supervision: only `label_fraction` of the target modality's training SUBJECTS keep their
  # labels (0.0 = zero-shot); '' = every modality fully labelled.
  c.data.target_modality = ""
  c.data.label_fraction = 1.0
  # Per-subject split: fractions, or k-fold cross-validation with folds >= 2 (test = fold `fold`,
  # validation a `val` share of the subjects of the other folds).
  c.data.split = ConfigDict(dict(train=0.6, val=0.2, test=0.2, folds=0, fold=0))
  # Per-modality override of the manifest's normalisation, e.g. 'ct=dataset_zscore' (statistics of
  # the training split) or 'ct=clip_zscore:-200:300'; '' keeps the manifest's.
  c.data.normalization = ""
  c.data.crop = "body"                # training view cut around the body ('body') or the centre
  # On-device augmentation (data/augment.py, data/intensity.py): nnU-Net's transforms, probabilities
  # (per sample) and ranges. Spatial ones move image and label alike, intensity ones the image only.
  c.data.augment = ConfigDict(dict(
      enabled=True,
      rotate_deg=180.0, p_rotate=0.2,     # angle uniform in +-rotate_deg (nnU-Net 2D: 180)
      scale=(0.7, 1.4), p_scale=0.2,      # content zoom; shrinking and enlarging equally likely
      # Elastic deformation, off as in nnU-Net: uniform noise smoothed by a Gaussian of sigma (pixels),
      # times alpha.
      elastic=False, p_elastic=0.2, elastic_alpha=(0.0, 200.0), elastic_sigma=(9.0, 13.0),
      # Mirroring, each listed axis (0 up-down, 1 left-right) with p_mirror. None by default: left and
      # right kidney are different classes. flip=True is the older switch for axis 1.
      mirror_axes=(), p_mirror=0.5, flip=False,
      # nnU-Net's noise_variance=(0, 0.1) reaches np.random.normal as the standard deviation.
      p_noise=0.1, noise_std=(0.0, 0.1),
      p_blur=0.2, blur_sigma=(0.5, 1.0),                  # Gaussian sigma in pixels
      p_brightness=0.15, brightness=(0.75, 1.25),         # multiplier
      p_contrast=0.15, contrast=(0.75, 1.25),             # about the mean, clipped to [min, max]
      p_lowres=0.25, lowres_zoom=(0.5, 1.0),              # nearest down, linear up
      p_gamma=0.3, p_gamma_inverted=0.1, gamma=(0.7, 1.5), gamma_retain_stats=True,
      # Intensity randomisation of the samples whose label is used, so that a network trained on
      # one modality's labels reads another's images (data/randomize.py); each sample takes at most
      # one: GIN (a random shallow conv net, p_ipa of them two views under a smooth mask) or SLAug's
      # global / local (per class region) Bezier remap with location-scale. Off by default.
      # The defaults are RandomizeSettings' own, so that they are written once.
      intensity=ConfigDict(dataclasses.asdict(randomize.RandomizeSettings())),
  ))

  c.model = ConfigDict()
  c.model.name = "unet"
  # U-Net: the decoder's lower resolutions also predict and are trained (nnU-Net's deep
  # supervision, weights 1/2 per halving, normalised); inference reads the full-resolution head.
  c.model.deep_supervision = False
  c.model.features = 16
  c.model.depth = 4
  c.model.ndim = 2
  # Keys of the other networks (model.name 'resfcn' / 'dilated'), read only by their network.
  c.model.filters = (16, 64, 128, 256, 512)      # resfcn: channels per scale (DualStream)
  c.model.units_per_scale = 3                     # resfcn
  c.model.strides = (1, 2, 2, 2, 2)               # resfcn: per scale; the first must be 1
  c.model.widths = (16, 32, 64, 128, 256, 256, 512)   # dilated (UMMKD Network-1)
  c.model.head_channels = 0                       # dilated: 0 = 8 * classes
  c.model.dropout = 0.0                           # resfcn and dilated (UMMKD: 0.25)
  c.model.sharing = ""                # '' = the method's own sharing preset
  c.model.norm = ConfigDict(dict(kind="batch", momentum=0.9, epsilon=1e-5, num_groups=8,
                                 sync=True))

  c.loss = ConfigDict()
  c.loss.dice_weight = 1.0
  c.loss.ce_weight = 1.0
  c.loss.class_weights = "none"      # 'batch': the UMMKD code's 1 - n_c / N, probs clipped
  c.loss.ce_clip = 0.005             # lower clip of the probabilities with class_weights='batch'
  c.loss.kd_weight = 0.0             # alpha of (alpha / 2) * L_kd (UMMKD: 0.5); 0 = off
  c.loss.kd_temperature = 2.0
  c.loss.kd_absent = "skip"          # 'uniform': the authors' code (absent class = zero logits)
  c.loss.csa_weight = 0.0            # lambda of the affinity loss (Chen et al.: 0.5); 0 = off
  c.loss.csa_layers = ()             # two sown blocks; () = the network's middle pair
  c.loss.csa_class_specific = True   # False: the plain affinity (one all-ones mask)
  c.loss.weight_decay = 0.0          # eta of the L2 term on kernels and norm params (UMMKD: 1e-4)

  c.train = ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 8              # per modality, global (split over the data-parallel devices)
  # 'mixed': every step a batch of every modality; 'alternate': one modality per step (DualStream).
  c.train.regime = "mixed"
  c.train.adam_epsilon = 1e-8
  c.train.patch_slices = 8            # 3D networks (model.ndim=3): patches of image_size x this
  c.train.learning_rate = 2e-3
  # Optimiser and schedule of the supervised methods (unpaired_seg/optim.py; MMSDNet has its own).
  # nnU-Net's: optimizer='sgd', momentum=0.99, lr_schedule='poly', learning_rate=1e-2,
  # grad_clip=12 (and loss.weight_decay=3e-5).
  c.train.optimizer = "adam"          # 'adam', 'adamw' (decoupled decay on kernels) or 'sgd'
  c.train.momentum = 0.99             # sgd: Nesterov momentum
  c.train.adamw_weight_decay = 1e-4   # adamw: decoupled weight decay (times the learning rate)
  c.train.grad_clip = 0.0             # clip gradients to this global norm; 0 = off
  c.train.lr_schedule = "exponential"  # or 'poly': lr * (1 - step / steps) ** lr_poly_exponent
  c.train.lr_decay = ConfigDict(dict(rate=1.0, every=1000))  # lr * rate ** (step / every)
  c.train.lr_poly_exponent = 0.9
  c.train.lr_warmup_steps = 0         # linear ramp up to learning_rate, then the schedule
  # Exponential moving average of the weights (and norm statistics), bias-corrected; validation,
  # the best checkpoint and the test use it. 0 = off; e.g. 0.999.
  c.train.ema_decay = 0.0
  c.train.log_every = 50
  c.train.eval_every = 250
  c.train.checkpoint_every = 250
  c.train.keep_checkpoints = 2
  # Persistent compilation cache: 'auto' (~/.cache/unpaired_seg/jax_compilation_cache or
  # $UNPAIRED_SEG_CACHE/...), 'off', or a folder. A second run starts its first step in seconds.
  c.train.compilation_cache = "auto"
  # 'bfloat16' for accelerators: the networks' arithmetic in bfloat16; parameters, optimiser
  # state, normalisation statistics and the losses in float32 (ops/precision.py).
  c.train.compute_dtype = "float32"

  c.eval = ConfigDict()
  c.eval.batch_size = 32              # tiles (slices) per prediction call (one compile)
  c.eval.checkpoint = "best"          # 'best' (by validation Dice) or 'latest'
  c.eval.max_val_cases = 4            # validation volumes per modality during training
  # Test metrics per class per volume in 3D, in mm; per_slice_dice is the authors' 2D mode.
  c.eval.metrics = ("dice", "hd95", "assd", "per_slice_dice")
  c.eval.surface_tolerance_mm = 2.0   # of surface_dice
  c.eval.hd95_variant = "max_directed"
  c.eval.assd_variant = "mean_of_directed_means"
  c.eval.grid = "source"              # 'source': the source files' geometry (prepared data)
  c.eval.tile_overlap = 0.5           # inference tiles of data.image_size over larger slices
  c.eval.save_predictions = 2         # test volumes per modality saved for overlays (compare)

  if tiny:
    shrink_to_tiny(c)
  return c


def use_prepared_data(c: ConfigDict, root: str) -> None:
  """The real abdominal CT/MR set as `python -m unpaired_seg.prepare` writes it at 2 mm, CPU-sized.

  128 x 128 training views cut around the body (inference tiles the larger slices), CT z-scored
  with the training split's statistics (its intensities are already windowed to uint8), a narrow
  U-Net and 600 steps of 4 slices per modality: about seven minutes on two CPU cores.
  """
  c.data.dataset = "folder"
  c.data.root = root
  c.data.image_size = (128, 128)
  c.data.normalization = "ct=dataset_zscore"
  c.model.features = 8
  c.train.batch_size = 4
  c.train.steps = 600
  c.train.log_every = 25
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.eval.max_val_cases = 1
  # The dataset's own plan (python -m unpaired_seg.plan, data/plan.py), when it has one, replaces
  # these CPU-sized defaults; --config.<key> on the command line still overrides both.
  from unpaired_seg.data import plan as plan_lib
  found = plan_lib.read_plan(root)
  if found is not None:
    plan_lib.apply_plan(c, found, where=f"{root}/{plan_lib.PLAN_FILE}")


def shrink_to_tiny(c: ConfigDict) -> None:
  """Seconds on a CPU: tiny phantom, narrow network, a few steps. Used by tests and smoke runs."""
  c.data.phantom.num_subjects = 6
  c.data.phantom.shape = (32, 32, 12)
  c.data.image_size = (32, 32)
  c.data.split.update(train=0.5, val=0.25, test=0.25)
  c.model.features = 4
  c.model.depth = 2
  c.train.steps = 8
  c.train.batch_size = 4
  c.train.log_every = 2
  c.train.eval_every = 4
  c.train.checkpoint_every = 4
  c.eval.batch_size = 8
  c.eval.max_val_cases = 1
