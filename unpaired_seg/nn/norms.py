"""Normalisation whose parameters and statistics live in per-group Flax collections.

A *norm group* is a modality name (`mr`, `ct`, ...) or `shared` when the modalities share one set.
For group `g` the affine parameters are in collection `norm_<g>` and the running statistics in
`stats_<g>`, always under the SAME module path, so the trees of two modalities have the same
structure and a pass for one modality cannot touch another's variables:

  variables = model.init(rng, x, group='mr', train=False)      # creates norm_mr, norm_ct, stats_...
  y, upd = model.apply(variables, x, group='mr', train=True, mutable=['stats_mr'])

Every group is created at init whatever group the init call names, so nothing depends on which
modality happened to be used to initialise.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

NORM_KINDS = ("batch", "instance", "layer", "group", "none")


def norm_collection(group: str) -> str:
  """The collection holding a group's trainable scale and bias."""
  return f"norm_{group}"


def stats_collection(group: str) -> str:
  """The collection holding a group's running statistics (batch norm only)."""
  return f"stats_{group}"


class ModalityNorm(nn.Module):
  """Batch, instance, layer or group normalisation with per-group variables.

  Attributes:
    groups: every norm group of the model; all are created at init.
    kind: one of NORM_KINDS.
    momentum: running-average decay of batch statistics (new = m * old + (1 - m) * batch).
    epsilon: added to the variance.
    num_groups: channel groups for `kind='group'` (reduced to a divisor of the channels).
    stat_shards: batch norm statistics are computed over this many equal, contiguous slices of
      the batch separately. 1 (default) uses the whole global batch: under `jax.jit` with the batch
      sharded over devices this is synchronised batch norm. Setting it to the number of data-parallel
      devices gives per-device statistics, as unsynchronised multi-GPU batch norm would.
  """
  groups: Sequence[str]
  kind: str = "batch"
  momentum: float = 0.9
  epsilon: float = 1e-5
  num_groups: int = 8
  stat_shards: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, group: str, train: bool) -> jax.Array:
    if self.kind not in NORM_KINDS:
      raise ValueError(f"model.norm.kind must be one of {NORM_KINDS}, got {self.kind!r}")
    if group not in self.groups:
      raise ValueError(f"norm group {group!r} is not one of this model's groups {tuple(self.groups)}")
    if self.kind == "none":
      return x
    # Statistics and the affine map in float32 whatever the compute dtype (a bfloat16 mean and
    # variance lose the digits that batch norm divides by); the output in the input's dtype.
    dtype = x.dtype
    x = x.astype(jnp.float32)
    channels = x.shape[-1]
    if self.is_initializing():
      # Create every group's variables now, so each modality's tree exists and has one structure.
      created = {g: self._variables_of(g, channels) for g in self.groups}
      scale, bias, stats = created[group]
    else:
      scale, bias, stats = self._variables_of(group, channels)

    if self.kind == "batch":
      y = self._batch_norm(x, stats, train)
    else:
      y = self._sample_norm(x)
    y = y * scale.value.astype(jnp.float32) + bias.value.astype(jnp.float32)
    return y.astype(dtype)

  def _variables_of(self, group: str, channels: int):
    dtype = jnp.float32
    scale = self.variable(norm_collection(group), "scale", lambda: jnp.ones((channels,), dtype))
    bias = self.variable(norm_collection(group), "bias", lambda: jnp.zeros((channels,), dtype))
    stats = None
    if self.kind == "batch":
      stats = (
          self.variable(stats_collection(group), "mean", lambda: jnp.zeros((channels,), dtype)),
          self.variable(stats_collection(group), "var", lambda: jnp.ones((channels,), dtype)),
      )
    return scale, bias, stats

  def _batch_norm(self, x: jax.Array, stats, train: bool) -> jax.Array:
    ra_mean, ra_var = stats
    if not train:
      return (x - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
    shards = self.stat_shards
    if x.shape[0] % shards:
      raise ValueError(f"batch of {x.shape[0]} does not split into model.norm.stat_shards={shards}")
    # [S, B/S, *spatial, C]: statistics per shard, over its samples and positions.
    xs = x.reshape((shards, x.shape[0] // shards) + x.shape[1:])
    axes = tuple(range(1, xs.ndim - 1))
    mean = jnp.mean(xs, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xs - mean), axis=axes, keepdims=True)
    y = ((xs - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    if not self.is_initializing():
      # Assigning raises for a group whose stats collection is not mutable: that is the isolation.
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * jnp.mean(mean, axis=axes + (0,)).reshape(-1)
      ra_var.value = m * ra_var.value + (1 - m) * jnp.mean(var, axis=axes + (0,)).reshape(-1)
    return y

  def _sample_norm(self, x: jax.Array) -> jax.Array:
    spatial = tuple(range(1, x.ndim - 1))
    if self.kind == "instance":
      axes, xg = spatial, x
    elif self.kind == "layer":
      axes, xg = spatial + (x.ndim - 1,), x
    else:  # group
      channels = x.shape[-1]
      groups = _largest_divisor_at_most(channels, self.num_groups)
      xg = x.reshape(x.shape[:-1] + (groups, channels // groups))
      axes = spatial + (xg.ndim - 1,)
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
    return ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)


def _largest_divisor_at_most(n: int, k: int) -> int:
  for d in range(min(n, k), 0, -1):
    if n % d == 0:
      return d
  return 1
