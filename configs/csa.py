"""CSA (Chen et al.): Chilopod + the class-specific affinity loss, lambda 0.5.

Per class, the channel affinity between two adjacent layers of the features masked by the
class's ground truth, compared between the two modalities (see ops/losses/cross_modal.py csa_loss).

  python -m unpaired_seg.main --config=configs/csa.py --workdir=runs/csa
"""

from configs import affinity


def get_config(arg=None):
  return affinity.get_config(arg, method="csa", class_specific=True)
