"""Every named sharing setting builds exactly the shared / per-modality variables it claims."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unpaired_seg import rng
from unpaired_seg.nn.dilated import DilatedResNet, dilated_blocks
from unpaired_seg.nn.presets import SHARING_PRESETS, block_roles, sharing_preset
from unpaired_seg.nn.resfcn import ResFCN, resfcn_blocks
from unpaired_seg.nn.sharing import NormSpec
from unpaired_seg.nn.unet import UNet, unet_blocks

MODALITIES = ("mr", "ct")
NORM = NormSpec("batch")

# Tiny networks: (block names, builder, example input).
NETWORKS = {
    "unet": (unet_blocks(2),
             lambda s: UNet(num_classes=3, sharing=s, features=2, depth=2, norm=NORM),
             (1, 8, 8, 1)),
    "resfcn": (resfcn_blocks(4),
               lambda s: ResFCN(num_classes=3, sharing=s, filters=(2, 2, 4, 4), units_per_scale=1,
                                strides=(1, 2, 2, 2), norm=NORM),
               (1, 8, 8, 1)),
    "dilated": (dilated_blocks(4),
                lambda s: DilatedResNet(num_classes=3, sharing=s, widths=(2, 2, 4, 4),
                                        units=(1, 1, 2, 2), head_channels=1, norm=NORM),
                (1, 8, 8, 3)),
}

# The per-modality blocks each preset must give, written out by hand per network.
_UNET_ENC = ["enc0", "enc1"]
_UNET_DEC = ["dec1", "dec0", "head"]
_RES_ENC = ["init", "enc1", "enc2"]          # enc3, the deepest scale, is the middle
_RES_DEC = ["dec2", "dec1", "dec0", "head"]
_DIL_ENC = ["init", "enc0", "enc1", "enc2", "enc3"]
_DIL_DEC = ["dec1", "dec0", "head"]
EXPECTED = {
    "unet": {
        "individual": _UNET_ENC + ["bottleneck"] + _UNET_DEC,
        "joint": [], "chilopod": [],
        "y_shaped": _UNET_ENC,
        "x_shaped": _UNET_ENC + _UNET_DEC,
        "dualstream_v1": _UNET_ENC + ["bottleneck"],
        "dualstream_v2": ["enc0"],
        "dualstream_v3": _UNET_DEC,
        "dualstream_v4": _UNET_ENC + _UNET_DEC,
    },
    "resfcn": {
        "individual": _RES_ENC + ["enc3"] + _RES_DEC,
        "joint": [], "chilopod": [],
        "y_shaped": _RES_ENC,
        "x_shaped": _RES_ENC + _RES_DEC,
        "dualstream_v1": _RES_ENC + ["enc3"],
        "dualstream_v2": ["init", "enc1"],
        "dualstream_v3": _RES_DEC,
        "dualstream_v4": _RES_ENC + _RES_DEC,
    },
    "dilated": {
        "individual": _DIL_ENC + ["bottleneck"] + _DIL_DEC,
        "joint": [], "chilopod": [],
        "y_shaped": _DIL_ENC,
        "x_shaped": _DIL_ENC + _DIL_DEC,
        "dualstream_v1": _DIL_ENC + ["bottleneck"],
        "dualstream_v2": ["init", "enc0"],
        "dualstream_v3": _DIL_DEC,
        "dualstream_v4": _DIL_ENC + _DIL_DEC,
    },
}


def test_every_preset_is_checked():
  assert set(SHARING_PRESETS) == set(EXPECTED["unet"]) == set(EXPECTED["resfcn"])
  assert set(EXPECTED["dilated"]) == set(SHARING_PRESETS)


@functools.cache
def _variables(network: str, preset: str):
  """Shapes of every variable (no compile: eval_shape)."""
  blocks, build, shape = NETWORKS[network]
  model = build(sharing_preset(preset, blocks, MODALITIES))
  init = functools.partial(model.init, modality="mr", train=False)
  return jax.eval_shape(init, rng.prng_key(0), jnp.zeros(shape))


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


@pytest.mark.parametrize("network", sorted(NETWORKS))
@pytest.mark.parametrize("preset", sorted(SHARING_PRESETS))
def test_preset_builds_the_parameter_tree_it_claims(network, preset):
  blocks = NETWORKS[network][0]
  sharing = sharing_preset(preset, blocks, MODALITIES)
  expected = EXPECTED[network][preset]
  assert sorted(sharing.per_modality_blocks) == sorted(expected)
  v = _variables(network, preset)
  params = v["params"]
  for block in blocks:
    copies = {f"{block}_{m}" for m in MODALITIES}
    if block in expected:
      assert copies <= set(params) and block not in params, (block, sorted(params))
      # The copies have the same structure: one network definition, two modalities.
      assert (jax.tree.structure(params[f"{block}_mr"])
              == jax.tree.structure(params[f"{block}_ct"]))
    else:
      assert block in params and not copies & set(params), (block, sorted(params))
  if preset == "joint":
    assert set(v) == {"params", "norm_shared", "stats_shared"}
  else:
    assert set(v) == {"params", "norm_mr", "norm_ct", "stats_mr", "stats_ct"}
    # Shared blocks hold both modalities' norms under the same module names; a modality's own
    # copy of a block holds only that modality's norms.
    def renamed(tree, m):
      return {k[: -len(m) - 1] if k.endswith(f"_{m}") else k: x for k, x in tree.items()}
    assert (jax.tree.structure(renamed(v["norm_mr"], "mr"))
            == jax.tree.structure(renamed(v["norm_ct"], "ct")))
    for m, other in (("mr", "ct"), ("ct", "mr")):
      assert not any(k.endswith(f"_{other}") for k in v[f"norm_{m}"]), sorted(v[f"norm_{m}"])


@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_parameter_counts_follow_the_sharing(network):
  kernels = {p: _count(_variables(network, p)["params"]) for p in SHARING_PRESETS}
  joint = _variables(network, "joint")
  chilopod = _variables(network, "chilopod")
  assert kernels["individual"] == 2 * kernels["joint"]
  # Chilopod: the joint kernels plus one norm set per modality instead of one shared set.
  assert kernels["chilopod"] == kernels["joint"]
  assert _count(chilopod["norm_mr"]) == _count(chilopod["norm_ct"]) == _count(joint["norm_shared"])
  assert _count(chilopod["norm_mr"]) > 0
  assert kernels["x_shaped"] > kernels["y_shaped"] > kernels["chilopod"]
  assert kernels["dualstream_v1"] > kernels["y_shaped"]       # the middle too
  assert kernels["dualstream_v4"] == kernels["x_shaped"]
  assert jax.tree.structure(_variables(network, "dualstream_v4")) == jax.tree.structure(
      _variables(network, "x_shaped"))
  assert kernels["joint"] < kernels["dualstream_v2"] < kernels["dualstream_v1"]
  assert kernels["joint"] < kernels["dualstream_v3"] < kernels["individual"]


def test_block_roles():
  assert block_roles(unet_blocks(2)) == {
      "enc0": ("encoder", "first_encoder"), "enc1": ("encoder",), "bottleneck": ("middle",),
      "dec1": ("decoder",), "dec0": ("decoder",), "head": ("head",)}
  roles = block_roles(resfcn_blocks(3))
  assert roles == {"init": ("input",), "enc1": ("encoder", "first_encoder"),
                   "enc2": ("middle",), "dec1": ("decoder",), "dec0": ("decoder",),
                   "head": ("head",)}
  assert block_roles(dilated_blocks(2))["bottleneck"] == ("middle",)
  assert block_roles(dilated_blocks(2))["enc1"] == ("encoder",)


def test_preset_without_plain_encoder():
  # Two scales: the only encoder block is the middle, so V2 keeps just the input apart.
  sharing = sharing_preset("dualstream_v2", resfcn_blocks(2), MODALITIES)
  assert sharing.per_modality_blocks == ("init",)


def test_bad_names_are_named():
  with pytest.raises(ValueError, match="'w_shaped'"):
    sharing_preset("w_shaped", unet_blocks(2), MODALITIES)
  with pytest.raises(ValueError, match="'middle_block'"):
    sharing_preset("y_shaped", ("enc0", "middle_block", "head"), MODALITIES)
  with pytest.raises(ValueError, match="modalities"):
    sharing_preset("y_shaped", unet_blocks(2), ())
