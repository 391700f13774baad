"""Mixed precision as a cast of the variables at the network's door, in pure jax.numpy.

`train.compute_dtype = 'bfloat16'` runs the networks' arithmetic in bfloat16 (the matmul and
convolution units of TPUs and recent GPUs run it several times faster than float32) while
everything that accumulates stays float32: the parameters and optimiser moments (the optimiser
updates the float32 copy; the gradient flows back through the cast), the running statistics
and normalisation arithmetic (`nn.norms.ModalityNorm` computes in float32), and the losses,
which see float32 logits.

  dtype = precision.compute_dtype(config.train.compute_dtype)   # jnp.float32 or jnp.bfloat16
  variables = precision.cast_floating(params, dtype)            # stats are left as they are
"""

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(name: str):
  """The dtype of `train.compute_dtype` ('float32' or 'bfloat16')."""
  if name not in DTYPES:
    raise ValueError(f"config key 'train.compute_dtype': {name!r} is not one of {sorted(DTYPES)}")
  return DTYPES[name]


def cast_floating(tree, dtype):
  """Every floating-point leaf of `tree` cast to `dtype`; integer and bool leaves as they are."""
  def cast(x):
    if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype:
      return x.astype(dtype)
    return x
  return jax.tree.map(cast, tree)


def to_float32(tree):
  """Every floating-point leaf of `tree` in float32 (what the losses and metrics read)."""
  return cast_floating(tree, jnp.float32)
