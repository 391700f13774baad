"""Networks from `config.model`: block lists, keys, errors, per-modality statistics isolation."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from unpaired_seg import rng
from unpaired_seg.nn.dilated import DilatedResNet
from unpaired_seg.nn.presets import sharing_preset
from unpaired_seg.nn.registry import NETWORK_KEYS, build_network, network_blocks
from unpaired_seg.nn.resfcn import ResFCN
from unpaired_seg.nn.sharing import NormSpec, Sharing
from unpaired_seg.nn.unet import UNet

MODALITIES = ("mr", "ct")
NORM = NormSpec("batch")


def _model_config(name, ndim=2):
  return ml_collections.ConfigDict(dict(
      name=name, features=2, depth=2, ndim=ndim, sharing="",
      filters=(2, 4, 4), units_per_scale=1, strides=(1, 2, 2), dropout=0.1,
      widths=(2, 2, 4, 4), head_channels=1))


_SOWN = {"resfcn": {"init", "enc1", "enc2", "dec1", "dec0"},
         "dilated": {"enc0", "enc1", "enc2", "enc3", "bottleneck", "dec1"}}
_INPUT = {"unet": (2, 8, 8, 1), "resfcn": (2, 8, 8, 1), "dilated": (2, 8, 8, 3)}


def _build(name, preset="chilopod", **overrides):
  config = _model_config(name)
  config.update(overrides)
  sharing = sharing_preset(preset, network_blocks(config), MODALITIES)
  return build_network(config, num_classes=3, sharing=sharing, norm=NORM)


def _shapes(model, x_shape, modality="mr"):
  init = functools.partial(model.init, modality=modality, train=False)
  return jax.eval_shape(init, rng.prng_key(0), jnp.zeros(x_shape))


@pytest.mark.parametrize("name", sorted(NETWORK_KEYS))
def test_network_blocks_are_the_networks_top_level_modules(name):
  model = _build(name, "joint")
  variables = _shapes(model, _INPUT[name])
  assert set(variables["params"]) == set(network_blocks(_model_config(name)))


@pytest.mark.parametrize("name", sorted(_SOWN))
def test_block_outputs_are_sown_as_features(name):
  """'<block>_features' in 'intermediates' (the class-specific affinity reads them)."""
  model = _build(name, "joint")
  variables = _shapes(model, _INPUT[name])
  apply = functools.partial(model.apply, modality="mr", train=False, mutable=["intermediates"])
  _, sown = jax.eval_shape(apply, variables, jnp.zeros(_INPUT[name]))
  assert set(sown["intermediates"]) == {f"{b}_features" for b in _SOWN[name]}


def test_each_name_builds_its_network_with_the_configured_keys():
  unet = _build("unet")
  assert isinstance(unet, UNet) and (unet.features, unet.depth) == (2, 2)
  resfcn = _build("resfcn", strides=((1, 1), (2, 2), (2, 1)))
  assert isinstance(resfcn, ResFCN) and resfcn.dropout == 0.1
  p = _shapes(resfcn, (1, 8, 4, 1))["params"]
  assert p["init"]["kernel"].shape == (3, 3, 1, 2)
  assert p["enc2"]["unit0"]["conv0"]["kernel"].shape == (4, 3, 4, 4)   # stride (2, 1)
  dilated = _build("dilated")
  assert isinstance(dilated, DilatedResNet) and dilated.dropout_rate == 0.1
  assert tuple(dilated.units) == (1, 1, 2, 2)                          # UMMKD's pattern
  p = _shapes(dilated, _INPUT["dilated"])["params"]
  assert p["dec0"]["conv"]["kernel"].shape == (3, 3, 4, 64 * 1)        # head_channels=1
  default_head = _build("dilated", head_channels=0)
  p = _shapes(default_head, _INPUT["dilated"])["params"]
  assert p["dec0"]["conv"]["kernel"].shape == (3, 3, 4, 64 * 8 * 3)    # 8 * classes


def test_errors_name_the_key():
  config = _model_config("resnet")
  with pytest.raises(ValueError, match="'model.name'.*'resnet'"):
    network_blocks(config)
  config = ml_collections.ConfigDict(dict(name="resfcn", ndim=2, units_per_scale=1))
  with pytest.raises(ValueError, match="'model.filters'"):
    network_blocks(config)
  with pytest.raises(ValueError, match="'bottleneck'"):
    build_network(_model_config("resfcn"), 3, Sharing(MODALITIES, ("bottleneck",)), NORM)
  with pytest.raises(ValueError, match="'enc9'"):
    build_network(_model_config("unet"), 3, Sharing(MODALITIES, ("enc0", "enc9")), NORM)


@pytest.mark.parametrize("name", sorted(NETWORK_KEYS))
@pytest.mark.parametrize("preset", ["chilopod", "individual"])
def test_statistics_of_one_modality_stay_isolated(name, preset):
  model = _build(name, preset, dropout=0.0)
  x = jnp.zeros(_INPUT[name])
  variables = _shapes(model, _INPUT[name])
  apply = functools.partial(model.apply, modality="ct", train=True)
  # A CT pass may write CT statistics ...
  _, updated = jax.eval_shape(functools.partial(apply, mutable=["stats_ct"]), variables, x)
  assert set(updated) == {"stats_ct"}
  assert jax.tree.structure(updated["stats_ct"]) == jax.tree.structure(variables["stats_ct"])
  # ... but a CT pass allowed to write only MR statistics fails on the first CT write.
  with pytest.raises(Exception, match="stats_ct"):
    jax.eval_shape(functools.partial(apply, mutable=["stats_mr"]), variables, x)


@pytest.mark.parametrize("ndim,shape", [(2, (2, 16, 16, 1)), (3, (2, 16, 16, 8, 1))])
def test_unet_forward_and_backward_2d_and_3d(ndim, shape):
  config = _model_config("unet", ndim=ndim)
  model = build_network(config, 3, sharing_preset("y_shaped", network_blocks(config), MODALITIES),
                        NORM)
  x = jnp.asarray(np.random.default_rng(0).standard_normal(shape), jnp.float32)
  variables = jax.jit(functools.partial(model.init, modality="mr", train=False))(
      rng.prng_key(0), x)
  params = {k: v for k, v in variables.items() if not k.startswith("stats_")}
  stats = {k: v for k, v in variables.items() if k.startswith("stats_")}

  def loss_fn(params):
    logits, upd = model.apply({**params, **stats}, x, modality="ct", train=True,
                              mutable=["stats_ct"])
    return jnp.mean(jnp.square(logits - 1.0)), (logits, upd)

  (loss, (logits, upd)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
  assert logits.shape == shape[:-1] + (3,) and np.isfinite(float(loss))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  # y_shaped: a CT pass trains the CT encoder and the shared decoder, never the MR encoder.
  g = grads["params"]
  assert all(float(jnp.abs(a).sum()) > 0 for a in jax.tree.leaves((g["enc0_ct"], g["dec0"])))
  assert all(float(jnp.abs(a).sum()) == 0 for a in jax.tree.leaves(g["enc0_mr"]))
  # The CT running statistics moved; the MR ones were not even returned.
  assert set(upd) == {"stats_ct"}
  moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), upd["stats_ct"], stats["stats_ct"])
  assert any(jax.tree.leaves(moved))
