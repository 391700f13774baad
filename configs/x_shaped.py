"""X-shaped: per-modality encoders and decoders (input and head included); only the bottleneck
shared. Normalisation per modality. UMMKD's training settings (see chilopod.py).

  python -m unpaired_seg.main --config=configs/x_shaped.py --workdir=runs/x_shaped
"""

from configs import chilopod


def get_config(arg=None):
  return chilopod.get_config(arg, method="x_shaped")
