"""MMSDNet / DAFNet: disentangle anatomy and modality, align (TPS transformer), fuse (maximum).

Per modality j and a partner slice (or k candidate slices) of the other modality i, one step
trains, in this order and each with its own Adam:
  generator      anatomy encoders f_A, modality encoder f_M (VAE), segmentor h, decoder g (FiLM or
                 SPADE), spatial transformer (TPS), pair weighting; loss
                   w_kl KL + w_sup (sup(h(s_j)) + sum_c w_c sup(h(STN(s_i^c -> s_j))))
                   + w_adv_mask adv_M + w_rec (L1(g(s_j, z_j)) + sum_c w_c L1(g(deformed_c, z_j)))
                   + w_adv_image adv_I + w_z_rec L1(f_M(g(s_j, z~N)), z)
                 (the conference model also trains on the fused anatomy max(s_j, deformed));
  mask D         one LS-GAN discriminator on masks (background excluded), real = one-hot labels
                 of labelled slices of every modality, fake = softmax(h(s)) of own and deformed s;
  image D        one per modality (DAFNet only), real = images, fake = reconstructions.
The discriminators are trained on the fakes of the generator pass of the same step (stop-gradient).
Unlabelled slices (`labelled` = 0, semi-supervised or zero-shot target) enter only through the
reconstruction, KL, z-reconstruction and adversarial terms: the supervised terms of a slice use its
own label, so the zero-shot target learns its anatomy through the source direction (its deformed
anatomy must segment the source's label).

Not the authors' (options, the `mmsdnet.transformer` sub-section): `align_weight` adds a
registration term that trains the transformer only (1 - soft Dice of the partner's organ masks
warped onto the slice's, `align_target='masks'`, or of the anatomies), and `trained_by='align'`
leaves the transformer to that term alone: the other losses still reach the encoders through the
warp, but not the transformer (trained by every loss, it and a label-free encoder can shift
against each other and still lower them). `warp_gradient='identity'` goes further: the other
losses see the warped factor, but its gradient goes to the partner's anatomy as if unwarped
(straight-through), so an encoder learns in its own image's frame and cannot leave the warp to
make up for an offset of its own. `mean_offset_weight` penalises the warp every pair of a batch
shares; `start` holds the transformer at the identity for the first steps.

Stochastic weight averaging (`mmsdnet.swa_start`): a running mean of the generator's parameters and
batch-norm statistics from that step on; `predict` (validation, checkpoints' evaluation, test) uses
it, training continues on the raw weights.

Modules: `config` (the section), `networks` (the generator, the state), `terms` (the loss terms,
pure jnp), `generator_loss` (the generator's forward pass and loss), `method` (the plug-in),
`pairing` (host-side partner slices), `evaluation` (multi input, alignment, disentanglement).

  python -m unpaired_seg.main --config=configs/mmsdnet.py --workdir=/tmp/mmsdnet
  python -m unpaired_seg.main --config=configs/dafnet.py:pairing=auto,tiny --workdir=/tmp/dafnet
"""

from unpaired_seg.methods.mmsdnet.config import default_section, register_config
from unpaired_seg.methods.mmsdnet.method import MMSDNet

__all__ = ["MMSDNet", "default_section", "register_config", "mmsdnet", "dafnet"]

mmsdnet = MMSDNet
dafnet = MMSDNet
