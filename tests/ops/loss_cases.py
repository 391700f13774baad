"""What the loss tests share: the losses under `jax.jit`, random cases, a float64 softmax.

  from tests.ops.loss_cases import SPATIAL, jl, np_softmax, random_case
"""

import inspect

import jax
import numpy as np

from unpaired_seg.ops import losses


class _Jitted:
  """The public losses under `jax.jit`, their non-array arguments static.

  The tests go through these: one compilation per call signature is much cheaper than eager
  op-by-op dispatch, and it is the jitted code that training runs.
  """

  _STATIC = ("include_background", "smooth", "reduction", "num_classes", "clip", "dice_weight",
             "ce_weight", "temperature", "absent", "class_specific", "eps", "include")

  def __getattr__(self, name):
    fn = getattr(losses, name)
    params = inspect.signature(fn).parameters
    jitted = jax.jit(fn, static_argnames=[a for a in self._STATIC if a in params])
    setattr(self, name, jitted)
    return jitted


jl = _Jitted()

# Spatial shapes of the 2D and 3D cases used throughout.
SPATIAL = {"2d": (4, 5), "3d": (3, 4, 2)}


def random_case(seed, batch=2, spatial=(4, 5), num_classes=3, scale=2.0):
  """Random logits [B, *spatial, C] (float32) and labels [B, *spatial] (int32)."""
  rng = np.random.default_rng(seed)
  logits = (scale * rng.standard_normal((batch, *spatial, num_classes))).astype(np.float32)
  labels = rng.integers(0, num_classes, size=(batch, *spatial)).astype(np.int32)
  return logits, labels


def np_softmax(vector):
  """Softmax of one 1-D vector, float64."""
  vector = np.asarray(vector, np.float64)
  shifted = np.exp(vector - vector.max())
  return shifted / shifted.sum()
