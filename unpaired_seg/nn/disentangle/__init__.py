"""MMSDNet / DAFNet networks: anatomy and modality encoders, segmentor, decoders, pair weighting.

The disentangle-align-fuse models split an image x into a binary anatomy factor s = f_A(x)
[B, H, W, 8] and a modality vector z = f_M(s, x) [B, 8]; a segmentor h(s) gives the masks and a
decoder g(s, z) the image back. Architectures, widths, activations and initialisers follow the
authors' code; every width scales with a base width `features` whose default is theirs, so tests
and CPU configs can run tiny copies.

  modalities = ('mr', 'ct')
  encoder = AnatomyEncoder(modalities, variant='dafnet', features=8)
  variables = encoder.init(rng, x, modality='mr', train=False)   # creates every modality's blocks
  s, updates = encoder.apply(variables, x, modality='ct', train=True,
                             mutable=['stats_shared'])            # s: [B, H, W, 8], exactly 0/1
  z, mean, logvar = ModalityEncoder().apply(params, s, x, rngs={'sample': key})   # [B, 8] each
  image = FiLMDecoder().apply(params, s, z)                         # [B, H, W, 1] in [-1, 1]
  logits = Segmentor(num_classes, modalities).apply(variables, s, modality='mr', train=False)

Conventions: channels last; background is class 0 of the segmentor's logits (the authors put it
last); the segmentor returns LOGITS, the softmax belongs to the loss. Keras defaults are kept where
the authors relied on them: LeakyReLU slope 0.3, batch norm momentum 0.99 / epsilon 1e-3, Glorot
uniform kernels unless the authors asked for He normal, zero biases.

The package, by the model's parts: `anatomy` (f_A and h), `modality` (f_M), `decoders` (g: FiLM
and SPADE), `pairing` (the pair weighting) and `common` (initialisers, input checks, up-sampling).
Import the networks from here: `from unpaired_seg.nn import disentangle`.

  python -m pytest -q tests/nn/test_disentangle.py
"""

from unpaired_seg.nn.disentangle.anatomy import (ANATOMY_VARIANTS, KERAS_BATCH_NORM, AnatomyEncoder,
                                                 Segmentor, anatomy_sharing)
from unpaired_seg.nn.disentangle.common import upsample_nearest
from unpaired_seg.nn.disentangle.decoders import (SPADE, FiLMBlock, FiLMDecoder, SPADEBlock,
                                                  SPADEDecoder, resize_nearest)
from unpaired_seg.nn.disentangle.modality import ModalityEncoder
from unpaired_seg.nn.disentangle.pairing import PairWeighting

__all__ = [
    "ANATOMY_VARIANTS", "KERAS_BATCH_NORM", "SPADE", "AnatomyEncoder", "FiLMBlock", "FiLMDecoder",
    "ModalityEncoder", "PairWeighting", "SPADEBlock", "SPADEDecoder", "Segmentor",
    "anatomy_sharing", "resize_nearest", "upsample_nearest",
]
