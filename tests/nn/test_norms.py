"""Per-modality normalisation collections: structure, isolation, and the four kinds."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unpaired_seg.nn.norms import ModalityNorm


class _Net(nn.Module):
  kind: str = "batch"
  stat_shards: int = 1

  @nn.compact
  def __call__(self, x, group, train):
    x = nn.Conv(6, (3, 3), use_bias=False)(x)
    return ModalityNorm(("mr", "ct"), kind=self.kind, stat_shards=self.stat_shards,
                        num_groups=3, name="norm")(x, group, train)


def _init(kind="batch", stat_shards=1, group="mr"):
  net = _Net(kind, stat_shards)
  x = jax.random.normal(jax.random.key(0), (4, 8, 8, 2))
  return net, x, net.init(jax.random.key(1), x, group=group, train=False)


def test_every_modality_is_created_whatever_init_saw():
  for group in ("mr", "ct"):
    _, _, v = _init(group=group)
    assert set(v) == {"params", "norm_mr", "norm_ct", "stats_mr", "stats_ct"}


def test_modalities_have_the_same_tree_structure():
  _, _, v = _init()
  assert jax.tree.structure(v["norm_mr"]) == jax.tree.structure(v["norm_ct"])
  assert jax.tree.structure(v["stats_mr"]) == jax.tree.structure(v["stats_ct"])
  assert jax.tree.map(jnp.shape, v["stats_mr"]) == jax.tree.map(jnp.shape, v["stats_ct"])


def test_mr_pass_cannot_write_ct_statistics():
  net, x, v = _init()
  with pytest.raises(Exception, match="stats_ct"):
    net.apply(v, x, group="ct", train=True, mutable=["stats_mr"])
  # The MR pass updates MR statistics and leaves CT's alone.
  _, upd = net.apply(v, x, group="mr", train=True, mutable=["stats_mr"])
  assert set(upd) == {"stats_mr"}
  assert not np.allclose(upd["stats_mr"]["norm"]["mean"], v["stats_mr"]["norm"]["mean"])


def test_ct_scale_is_used_only_for_ct():
  net, x, v = _init(kind="instance")
  v = jax.tree.map(lambda a: a, v)
  v["norm_ct"] = {"norm": {"scale": 3.0 * v["norm_ct"]["norm"]["scale"],
                           "bias": v["norm_ct"]["norm"]["bias"] + 1.0}}
  y_mr = net.apply(v, x, group="mr", train=True)
  y_ct = net.apply(v, x, group="ct", train=True)
  np.testing.assert_allclose(y_ct, 3.0 * y_mr + 1.0, rtol=1e-5, atol=1e-5)


def _reference(x, axes, eps=1e-5):
  mean = x.mean(axis=axes, keepdims=True)
  var = x.var(axis=axes, keepdims=True)
  return (x - mean) / np.sqrt(var + eps)


@pytest.mark.parametrize("kind", ["batch", "instance", "layer", "group"])
def test_kinds_match_numpy(kind):
  norm = ModalityNorm(("mr",), kind=kind, num_groups=2, momentum=0.5)
  x = np.asarray(jax.random.normal(jax.random.key(2), (3, 5, 4, 6))) * 2.0 + 1.0
  v = norm.init(jax.random.key(0), x, group="mr", train=False)
  y, upd = norm.apply(v, x, group="mr", train=True, mutable=["stats_mr"])
  if kind == "batch":
    expected = _reference(x, (0, 1, 2))
    # Running statistics move half way (momentum 0.5) from (0, 1) to the batch statistics.
    np.testing.assert_allclose(upd["stats_mr"]["mean"], 0.5 * x.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(upd["stats_mr"]["var"], 0.5 + 0.5 * x.var(axis=(0, 1, 2)),
                               rtol=1e-5)
  elif kind == "instance":
    expected = _reference(x, (1, 2))
  elif kind == "layer":
    expected = _reference(x, (1, 2, 3))
  else:
    xg = x.reshape(3, 5, 4, 2, 3)
    expected = _reference(xg, (1, 2, 4)).reshape(x.shape)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_eval_uses_running_statistics():
  norm = ModalityNorm(("mr",), kind="batch")
  x = np.full((2, 3, 3, 2), 5.0, np.float32)
  v = norm.init(jax.random.key(0), x, group="mr", train=False)
  v = {**v, "stats_mr": {"mean": jnp.array([1.0, 2.0]), "var": jnp.array([4.0, 16.0])}}
  y = norm.apply(v, x, group="mr", train=False)
  np.testing.assert_allclose(y[0, 0, 0], [(5 - 1) / np.sqrt(4 + 1e-5), (5 - 2) / np.sqrt(16 + 1e-5)],
                             rtol=1e-5)


def test_per_shard_statistics_equal_batch_norm_of_each_shard():
  """stat_shards=2 normalises each half of the batch with its own statistics (per-device BN)."""
  norm = ModalityNorm(("mr",), kind="batch", stat_shards=2)
  x = np.array(jax.random.normal(jax.random.key(3), (4, 3, 3, 2)))
  x[2:] = x[2:] * 5.0 + 3.0
  v = norm.init(jax.random.key(0), x, group="mr", train=False)
  y, _ = norm.apply(v, x, group="mr", train=True, mutable=["stats_mr"])
  np.testing.assert_allclose(y[:2], _reference(x[:2], (0, 1, 2)), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(y[2:], _reference(x[2:], (0, 1, 2)), rtol=1e-4, atol=1e-4)
  synced = ModalityNorm(("mr",), kind="batch", stat_shards=1)
  y_sync, _ = synced.apply(v, x, group="mr", train=True, mutable=["stats_mr"])
  np.testing.assert_allclose(y_sync, _reference(x, (0, 1, 2)), rtol=1e-4, atol=1e-4)
  assert not np.allclose(y_sync, y, atol=1e-2)


def test_unknown_group_is_named():
  norm = ModalityNorm(("mr",), kind="batch")
  x = np.zeros((2, 3, 3, 2), np.float32)
  with pytest.raises(ValueError, match="'ct'"):
    norm.init(jax.random.key(0), x, group="ct", train=False)
