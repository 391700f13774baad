"""Y-shaped: per-modality encoders (input included), shared bottleneck, decoder and head.

Normalisation is per modality. UMMKD's training settings (see chilopod.py).

  python -m unpaired_seg.main --config=configs/y_shaped.py --workdir=runs/y_shaped
"""

from configs import chilopod


def get_config(arg=None):
  return chilopod.get_config(arg, method="y_shaped")
