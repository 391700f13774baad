"""Affinity (Chen et al.'s ablation): Chilopod + the affinity loss without class masks.

L = (Dice_1 + Dice_2) + (CE_1 + CE_2) + lambda L_aff, lambda 0.5, between two adjacent layers in
the middle of the network (loss.csa_layers; () = the bottleneck and the next decoder block).
Adam lr 1e-4 decayed by 5% every 1000 steps, batch 8 per modality.

  python -m unpaired_seg.main --config=configs/affinity.py --workdir=runs/affinity
"""

from configs import common


def get_config(arg=None, method="affinity", class_specific=False):
  args = common.parse_arg(arg, tiny=False)
  config = common.get_base_config(tiny=args.tiny)
  config.method = method
  config.loss.csa_weight = 0.5
  config.loss.csa_class_specific = class_specific
  config.train.learning_rate = 2e-3 if args.tiny else 1e-4
  config.train.lr_decay.update(rate=0.95, every=1000)
  config.train.regime = "mixed"
  return config
