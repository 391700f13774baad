"""Chilopod (UMMKD's MSBN): every kernel shared, normalisation per modality, mixed batches.

The UMMKD training settings live here and the other settings of its Table II (joint_kd,
y_shaped, x_shaped, ummkd) start from this file: Dice + the code's class-weighted, clipped CE,
L2 weight decay 1e-4 on kernels and norm parameters, batch norm (decay 0.9, epsilon 1e-3),
Adam lr 1e-4 decayed by 5% every 1000 steps, 8 + 8 slices per step.

  python -m unpaired_seg.main --config=configs/chilopod.py --workdir=runs/chilopod
  python -m unpaired_seg.main --config=configs/chilopod.py:net=dilated --workdir=runs/chilopod_d

Arguments: tiny; net=unet|dilated (dilated: UMMKD's 2.5D Network-1, three adjacent slices).
"""

from configs import common

ARGS = dict(tiny=False, net="unet")


def ummkd_settings(config, net: str) -> None:
  """UMMKD's loss, optimiser and normalisation, on a U-Net or its dilated network."""
  config.loss.class_weights = "batch"
  config.loss.weight_decay = 1e-4
  config.model.norm.update(kind="batch", momentum=0.9, epsilon=1e-3)
  config.train.learning_rate = 1e-4
  config.train.lr_decay.update(rate=0.95, every=1000)
  config.train.regime = "mixed"
  if net == "dilated":
    config.model.name = "dilated"
    config.model.dropout = 0.25          # keep probability 0.75
    config.data.context_slices = 1       # 2.5D: the middle slice and one neighbour each side
  elif net != "unet":
    raise ValueError(f"config argument net={net!r}: expected 'unet' or 'dilated'")


def shrink_dilated(config) -> None:
  """A dilated net that runs in seconds: four narrow stages, head of 2 channels per class."""
  config.model.widths = (4, 8, 8, 8)
  config.model.head_channels = 8


def get_config(arg=None, method="chilopod"):
  args = common.parse_arg(arg, **ARGS)
  config = common.get_base_config(tiny=args.tiny)
  config.method = method
  ummkd_settings(config, args.net)
  if args.tiny:
    config.train.learning_rate = 2e-3
    if args.net == "dilated":
      shrink_dilated(config)
  return config
