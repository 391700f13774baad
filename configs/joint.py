"""UNet-both: one network, every kernel and norm shared, mixed batches of all modalities.

  python -m unpaired_seg.main --config=configs/joint.py --workdir=runs/joint
  python -m unpaired_seg.main --config=configs/joint.py:tiny --workdir=/tmp/joint_tiny
  python -m unpaired_seg.main --config=configs/joint.py:data=/tmp/abdomen_ctmr_2mm --workdir=runs/real
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, tiny=False, data="")
  config = common.get_base_config(tiny=args.tiny)
  if args.data:  # a dataset written by `python -m unpaired_seg.prepare`
    common.use_prepared_data(config, args.data)
  config.method = "joint"
  return config
