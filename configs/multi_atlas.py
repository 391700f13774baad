"""Multi-atlas segmentation: k labelled volumes of the other modality registered onto each test
volume (mutual-information affine, then B-spline; SimpleITK), labels fused by majority vote.

  python -m unpaired_seg.baselines --config=configs/multi_atlas.py --workdir=runs/multi_atlas
  python -m unpaired_seg.baselines --config=configs/multi_atlas.py:tiny --workdir=/tmp/ma_tiny
  python -m unpaired_seg.baselines --config=configs/multi_atlas.py:data=/tmp/abdomen_ctmr_2mm \\
      --config.baseline.target=mr --workdir=runs/multi_atlas_mr

Works on unpaired data (atlases are other subjects). Arguments: `tiny`, `data=<prepared folder>`.
"""

from configs import common
from unpaired_seg.baselines import section


def get_config(arg=None):
  return baseline_config("multi_atlas", arg)


def baseline_config(method: str, arg=None, **section_defaults):
  """The base config with a `baseline` section, for `method` (shared by the baseline configs)."""
  args = common.parse_arg(arg, tiny=False, data="")
  config = common.get_base_config(tiny=args.tiny)
  if args.data:  # a dataset written by `python -m unpaired_seg.prepare`
    common.use_prepared_data(config, args.data)
  config.method = method
  config.baseline = section.default_section(**section_defaults)
  if not args.data:
    # The phantom's volumes are a tenth of the abdominal ones': a larger share keeps the number
    # of mutual-information samples (~10,000) alike.
    config.baseline.sampling = 0.1
  if args.tiny:
    section.shrink_to_tiny(config.baseline)
  # Nothing is trained: no checkpoint to choose, so no validation subject is needed.
  config.eval.checkpoint = "latest"
  config.eval.metrics = ("dice", "hd95", "assd")
  return config
