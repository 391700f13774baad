"""MMSDNet/DAFNet's networks as one Flax module, the state of the method and the generator's Adam.

  generator = Generator(settings, num_classes=5, modalities=("mr", "ct"))
  anatomy = generator.apply(variables, x, "mr", False, method=Generator.anatomy)
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from unpaired_seg.nn import disentangle
from unpaired_seg.nn import stn as stn_lib
from unpaired_seg.nn.sharing import NormSpec


class Generator(nn.Module):
  """Everything but the discriminators; each part is called through its own method."""
  settings: ml_collections.FrozenConfigDict
  num_classes: int
  modalities: tuple[str, ...]

  def setup(self):
    s = self.settings
    norm = NormSpec(kind="batch", momentum=s.bn_momentum, epsilon=1e-3)
    self.anatomy_encoder = disentangle.AnatomyEncoder(
        self.modalities, variant=s.variant, features=s.anatomy_features, depth=s.anatomy_depth,
        num_anatomy=s.num_anatomy, binarize=s.binarize, norm=norm)
    self.modality_encoder = disentangle.ModalityEncoder(
        z_dim=s.z_dim, features=s.modality_features, hidden=s.modality_hidden)
    self.segmentor = disentangle.Segmentor(self.num_classes, self.modalities,
                                           features=s.segmentor_features, norm=norm)
    if s.decoder == "film":
      self.decoder = disentangle.FiLMDecoder(features=s.decoder_features)
    else:
      self.decoder = disentangle.SPADEDecoder(features=s.decoder_features, hidden=s.spade_hidden,
                                              num_upsamples=s.spade_upsamples)
    self.transformer = stn_lib.SpatialTransformer(features=s.stn_features, hidden=s.stn_hidden)
    self.pair_weighting = disentangle.PairWeighting(hidden=s.pair_hidden)

  def __call__(self, x: jax.Array, k: int):
    """Touches every part (and every modality's blocks) so that `init` creates them all."""
    s = self.anatomy(x, self.modalities[0], False)
    for m in self.modalities[1:]:
      self.anatomy(x, m, False)
    z, _, _ = self.encode_modality(s, x, False)
    self.segment(s, self.modalities[0], False)
    self.decode(s, z)
    warped, _ = self.transformer(s, s)
    self.weigh(jnp.ones((x.shape[0], k), jnp.float32))
    return warped

  def anatomy(self, x, modality, train):
    return self.anatomy_encoder(x, modality=modality, train=train)

  def encode_modality(self, s, x, sample):
    return self.modality_encoder(s, x, sample=sample)

  def segment(self, s, modality, train):
    return self.segmentor(s, modality=modality, train=train)

  def decode(self, s, z):
    return self.decoder(s, z)

  def displacements(self, moving, fixed):
    return self.transformer(moving, fixed)[1]

  def weigh(self, scores):
    return self.pair_weighting(scores)


@flax.struct.dataclass
class MMSDNetState:
  step: jax.Array
  params: dict        # {'generator': {...}, 'mask_disc': {...}, 'image_disc': {modality: {...}}}
  stats: dict         # {'generator': stats_* collections, 'mask_disc': spectral, 'image_disc': ...}
  opt_state: dict     # one optax state per part
  swa_params: dict    # running mean of params['generator']
  swa_stats: dict     # running mean of stats['generator'] (batch-norm statistics)
  swa_count: jax.Array


def split_variables(variables: dict) -> tuple[dict, dict]:
  """Trainable collections ('params', 'norm_*') and the rest (running statistics, 'spectral')."""
  params = {k: v for k, v in variables.items() if k == "params" or k.startswith("norm_")}
  stats = {k: v for k, v in variables.items() if k not in params and k != "intermediates"}
  return params, stats


def generator_optimizer(learning_rate: float, stn_learning_rate: float = 0.0
                        ) -> optax.GradientTransformation:
  """Adam over the generator; the spatial transformer at its own rate when `stn_learning_rate` > 0.

  The transformer's offsets are unbounded: at the rate that trains the encoders quickly (1e-3 and
  more) Adam's steps of nearly the full rate on noisy gradients move the control points by a
  large part of the image within a few hundred steps, so it can need a smaller one.
  """
  if not stn_learning_rate or stn_learning_rate == learning_rate:
    return optax.adam(learning_rate)

  def labels(params):
    def collection(name, tree):
      if name != "params":
        return jax.tree.map(lambda _: "rest", tree)
      return {module: jax.tree.map(lambda _, m=module: "stn" if m == "transformer" else "rest",
                                   sub) for module, sub in tree.items()}
    return {name: collection(name, tree) for name, tree in params.items()}

  return optax.multi_transform({"rest": optax.adam(learning_rate),
                                "stn": optax.adam(stn_learning_rate)}, labels)
