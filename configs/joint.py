"""UNet-both: one network, every kernel and norm shared, mixed batches of all modalities.

  python -m unpaired_seg.main --config=configs/joint.py --workdir=runs/joint
  python -m unpaired_seg.main --config=configs/joint.py:tiny --workdir=/tmp/joint_tiny
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, tiny=False)
  config = common.get_base_config(tiny=args.tiny)
  config.method = "joint"
  return config
