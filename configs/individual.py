"""UNet-single: one network per modality (nothing shared), trained side by side.

  python -m unpaired_seg.main --config=configs/individual.py --workdir=runs/individual
"""

from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, tiny=False, data="")
  config = common.get_base_config(tiny=args.tiny)
  if args.data:  # a dataset written by `python -m unpaired_seg.prepare`
    common.use_prepared_data(config, args.data)
  config.method = "individual"
  return config
