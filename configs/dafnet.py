"""DAFNet (the journal model): per-modality encoding paths with a shared U-Net decoder, image
discriminators, the journal's loss weights (0.1 KL + 10 sup + 1 adv_M + 1 rec + 1 adv_I + 1 z_rec).

Same arguments and CPU sizing as configs/mmsdnet.py:

  python -m unpaired_seg.main --config=configs/dafnet.py --workdir=/tmp/dafnet
  python -m unpaired_seg.main --config=configs/dafnet.py:decoder=spade,pairing=auto,tiny \
      --workdir=/tmp/dafnet_tiny
"""

from configs import mmsdnet


def get_config(arg=None):
  return mmsdnet.build(arg, "dafnet")
