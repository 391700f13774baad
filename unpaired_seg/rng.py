"""PRNG keys for the whole project.

Keys use the 'rbg' implementation: on CPU, XLA compiles threefry-based parameter initialisation
several times more slowly (10 s against 3 s for a small U-Net), and every run, test and benchmark pays
that once per network. The keys stay explicit and deterministic per seed.
"""

import jax

PRNG_IMPL = "rbg"


def prng_key(seed: int) -> jax.Array:
  """A typed PRNG key of the project's implementation."""
  return jax.random.key(seed, impl=PRNG_IMPL)
