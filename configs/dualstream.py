"""DualStream (Valindria et al.): a residual FCN with per-modality streams, alternate batches.

variant=v1: per-modality encoder, shared decoder; v2: separate streams only at the input and the
first-scale units; v3: shared encoder, per-modality decoders; v4 ("X-shaped", the paper's best):
per-modality encoders sharing only the last scale, per-modality decoders. Dice loss only, one MR
step then one CT step, Adam lr 1e-4 (beta 0.9 / 0.999, epsilon 1e-5). The paper's 3D 64^3 patches
are 2D slices here.

  python -m unpaired_seg.main --config=configs/dualstream.py:variant=v4 --workdir=runs/ds_v4
  python -m unpaired_seg.main --config=configs/dualstream.py:variant=v1,tiny --workdir=/tmp/ds
"""

from configs import common

VARIANTS = ("v1", "v2", "v3", "v4")


def get_config(arg=None):
  args = common.parse_arg(arg, tiny=False, variant="v4")
  if args.variant not in VARIANTS:
    raise ValueError(f"config argument variant={args.variant!r}: expected one of {VARIANTS}")
  config = common.get_base_config(tiny=args.tiny)
  config.method = "dualstream"
  config.model.name = "resfcn"
  config.model.sharing = f"dualstream_{args.variant}"
  config.loss.ce_weight = 0.0
  config.train.regime = "alternate"
  config.train.learning_rate = 1e-4
  config.train.adam_epsilon = 1e-5
  if args.tiny:
    config.model.filters = (4, 8, 8)
    config.model.strides = (1, 2, 2)
    config.model.units_per_scale = 1
    config.train.learning_rate = 2e-3
  return config
