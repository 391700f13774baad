"""Supervised segmentation over one network definition with a configurable amount of sharing.

The shared-kernel family of unpaired multi-modal segmentation, as plug-ins of one class:

  individual  one network per modality (UNet-single): every block and norm per modality
  joint       one network (UNet-both): every kernel and one set of norm statistics shared; all
              modalities go through it in one mixed batch
  joint_kd    joint + UMMKD's knowledge distillation between the modalities
  y_shaped    per-modality encoders, shared bottleneck, decoder and head
  x_shaped    per-modality encoders and decoders; only the bottleneck shared
  dualstream  DualStream V1..V4 (`model.sharing` = dualstream_v1 .. dualstream_v4), alternate
              single-modality batches
  chilopod    every kernel shared, normalisation per modality (UMMKD's MSBN)
  ummkd       chilopod + knowledge distillation (alpha / 2 * L_kd)
  affinity    chilopod + the affinity loss between two nearby layers, one all-ones mask
  csa         chilopod + the class-specific affinity loss (Chen et al.)

Loss (config section `loss`):
  sum_m [dice_weight * Dice_m + ce_weight * CE_m]
    + kd_weight / 2 * L_kd            (kd_weight = UMMKD's alpha; 0 switches it off)
    + csa_weight * L_csa              (lambda; 0 switches it off)
    + weight_decay * L2(kernels and norm parameters)   (eta; tf.nn.l2_loss convention)
  `loss.class_weights = 'batch'` replaces the CE by the UMMKD code's: class weights
  1 - n_c / N counted over the labelled pixels of the modality's batch, probabilities clipped to
  [loss.ce_clip, 1].

Training regimes (`train.regime`):
  mixed      every step sees a batch of every modality (UMMKD, CSA: 8 + 8) and sums their losses.
  alternate  one modality per step, in `data.modalities` order: step s trains modality
             s mod M (DualStream: one MR step, then one CT step). The batch still holds every
             modality (the host batch stays a pure function of the step, so resuming is exact);
             the trainer compiles one step per modality (`step_variants`) and picks the step's
             on the host (`variant_of_step`), which runs that modality's forward and backward
             pass only. As an optimiser that skips
             variables without a gradient (TF's Adam), the inactive modality's per-modality
             kernels, norm parameters, their Adam moments and its running statistics are left
             exactly as they were; shared kernels take an ordinary Adam step.

Optimiser and schedule (`train.optimizer`, `train.lr_schedule`, `train.grad_clip`, ...) are
built by `unpaired_seg/optim.py`. `train.ema_decay` > 0 keeps an exponential moving average of
the weights and the running statistics in the state (`SupervisedEMAState`, the maths in
`methods/averaging.py`); `predict`, and so validation, the best checkpoint's choice and the test,
then use the averages.

Modules: `parts` (the states and the loss helpers), `method` (the `Supervised` class), `volumes`
(`PatchSupervised`, the 3D variant); here the plug-ins of the registry.

  python -m unpaired_seg.main --config=configs/ummkd.py --workdir=runs/ummkd
  python -m unpaired_seg.main --config=configs/dualstream.py:variant=v2,tiny --workdir=/tmp/ds
"""

import ml_collections

from unpaired_seg.methods.supervised.method import Supervised
from unpaired_seg.methods.supervised.parts import (SupervisedEMAState, SupervisedState,
                                                   labelled_class_weights)
from unpaired_seg.methods.supervised.volumes import PatchSupervised
# learning_rate_schedule: also importable from here, where it lived before optim.py.
from unpaired_seg.optim import learning_rate_schedule

__all__ = ["Supervised", "PatchSupervised", "SupervisedState", "SupervisedEMAState",
           "labelled_class_weights", "learning_rate_schedule", "individual", "joint", "joint_kd",
           "y_shaped", "x_shaped", "dualstream", "chilopod", "ummkd", "affinity", "csa"]


def _method(default_sharing: str, kd: bool = False, csa: str | None = None,
            sharing_prefix: str = ""):
  def create(config: ml_collections.ConfigDict, *args, **kwargs):
    cls = PatchSupervised if config.model.ndim == 3 else Supervised
    return cls(config, *args, default_sharing=default_sharing, kd=kd, csa=csa,
               sharing_prefix=sharing_prefix, **kwargs)
  return create


individual = _method("individual")
joint = _method("joint")
joint_kd = _method("joint", kd=True)
y_shaped = _method("y_shaped")
x_shaped = _method("x_shaped")
dualstream = _method("dualstream_v4", sharing_prefix="dualstream_")
chilopod = _method("chilopod")
ummkd = _method("chilopod", kd=True)
affinity = _method("chilopod", csa="plain")
csa = _method("chilopod", csa="class_specific")
