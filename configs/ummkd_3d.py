"""UMMKD's 3D setting ("Network-2"): a 3D U-Net on patches, kernels shared, norms per modality.

As in the authors' code, knowledge distillation is off in 3D (so this is Chilopod in 3D); the
paper's patches are 256 x 256 x 8 with batch 4, Adam lr 1e-4 decayed by 5% every 500 steps.
Training draws 3D patches of data.image_size x train.patch_slices (data/patches.py); evaluation
predicts each volume with overlapping windows of that one shape.

  python -m unpaired_seg.main --config=configs/ummkd_3d.py --workdir=runs/ummkd_3d
  python -m unpaired_seg.main --config=configs/ummkd_3d.py:tiny --workdir=/tmp/ummkd_3d
"""

from configs import chilopod, common


def get_config(arg=None):
  args = common.parse_arg(arg, tiny=False)
  config = chilopod.get_config("tiny" if args.tiny else None, method="chilopod")
  config.model.ndim = 3
  config.model.depth = 3
  config.train.patch_slices = 8
  config.train.batch_size = 4
  config.train.lr_decay.update(rate=0.95, every=500)
  config.data.augment.enabled = False     # the on-device augmentation is 2D
  config.data.context_slices = 0
  if args.tiny:
    config.model.depth = 2
    config.train.patch_slices = 4
    config.train.batch_size = 2
  return config
