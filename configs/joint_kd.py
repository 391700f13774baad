"""Joint + KD: one network (every kernel and norm shared, mixed batch) with UMMKD's KD term.

  python -m unpaired_seg.main --config=configs/joint_kd.py --workdir=runs/joint_kd
"""

from configs import chilopod


def get_config(arg=None):
  config = chilopod.get_config(arg, method="joint_kd")
  config.loss.kd_weight = 0.5
  return config
