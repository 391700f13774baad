"""Registration of the same subject's other modality: its image registered onto the target image
(mutual-information affine, then B-spline; SimpleITK), its labels warped by nearest neighbour.

  python -m unpaired_seg.baselines --config=configs/register.py --workdir=runs/register

Needs paired data: the default is the paired phantom. Arguments: `tiny`, `data=<prepared folder>`.
"""

from configs import multi_atlas


def get_config(arg=None):
  # The scanner geometry is the start: the same subject, imaged in one world frame.
  config = multi_atlas.baseline_config("register", arg, init="identity")
  config.data.phantom.mode = "paired"
  return config
