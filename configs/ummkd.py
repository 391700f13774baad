"""UMMKD (Dou et al.): Chilopod + knowledge distillation, (alpha / 2) L_kd, alpha 0.5, T 2.

KD compares, per class, the softmax(T = 2) of the mean pre-softmax logits over the pixels of
that ground-truth class between the two modalities' batches, labelled slices only; a class absent
from either batch is skipped (kd_absent='uniform' for the authors' code).

The paper's network is the 2.5D dilated residual network (net=dilated, three adjacent slices).
The default here is the U-Net: on a 2-core CPU the dilated network (its 512-channel stages at
1/8 resolution and a 64 * classes * 8-channel pixel-shuffle head) is several times slower per
step at 96 x 96 than the 16-feature U-Net; see experiments/results/table2_abdomen.md.

  python -m unpaired_seg.main --config=configs/ummkd.py --workdir=runs/ummkd
  python -m unpaired_seg.main --config=configs/ummkd.py:net=dilated --workdir=runs/ummkd_dilated
  python -m unpaired_seg.main --config=configs/ummkd.py:tiny,net=dilated --workdir=/tmp/ummkd
"""

from configs import chilopod


def get_config(arg=None):
  config = chilopod.get_config(arg, method="ummkd")
  config.loss.kd_weight = 0.5
  config.loss.kd_temperature = 2.0
  return config
