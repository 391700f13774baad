"""Pure jax.numpy operations (no Flax): losses, warps, sampling."""
