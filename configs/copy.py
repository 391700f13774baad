"""Copy: the same subject's labels in the other modality, resampled onto the target volume's grid
through world coordinates (what the scanner geometry says; no registration).

  python -m unpaired_seg.baselines --config=configs/copy.py --workdir=runs/copy

Needs paired data: the default is the paired phantom. Arguments: `tiny`, `data=<prepared folder>`.
"""

from configs import multi_atlas


def get_config(arg=None):
  config = multi_atlas.baseline_config("copy", arg)
  config.data.phantom.mode = "paired"
  return config
