"""MMSDNet/DAFNet on the host: pairing, the configs and their section, the test-time batching.

Nothing here compiles a network; the tiny paired phantom is the session's (conftest.py).

  python -m pytest -q tests/methods/test_mmsdnet_host.py
"""

import json
import types

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common, dafnet, mmsdnet
from unpaired_seg import config_schema, methods, rng, train
from unpaired_seg.data import loader
from unpaired_seg.methods.mmsdnet import evaluation as mmsdnet_eval
from unpaired_seg.methods.mmsdnet import pairing as pairing_lib


# ------------------------------------------------------------------------------------------------
# Pairing (host side, no JAX).
# ------------------------------------------------------------------------------------------------


def _host(data, step, pairing, k=3):
  return pairing_lib.host_batch(data, step, pairing=pairing,
                                k=pairing_lib.num_candidates(pairing, k), window=2, seed=0)


@pytest.mark.parametrize("pairing", pairing_lib.PAIRINGS)
def test_pairing_is_a_pure_function_of_the_step(mmsdnet_phantom, pairing):
  a, b, c = (_host(mmsdnet_phantom.data, s, pairing) for s in (3, 3, 4))
  chex.assert_trees_all_equal(a, b)
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


def _check_partner_images(data, batch, j, i):
  for row, (cases, slices) in enumerate(zip(batch[j]["partner_case"], batch[j]["partner_slice"])):
    for n, (c, s) in enumerate(zip(cases, slices)):
      np.testing.assert_array_equal(batch[j]["partner_image"][row, n, ..., 0],
                                    data.cases["train"][i][c].image[:, :, s])


def test_expert_pairs_are_the_same_subject_and_slice(mmsdnet_phantom):
  data = mmsdnet_phantom.data
  for step in range(3):
    batch = _host(data, step, "expert")
    for j, i in (("mr", "ct"), ("ct", "mr")):
      assert batch[j]["partner_image"].shape[1] == 1
      for ci, z, pc, ps in zip(batch[j]["case_index"], batch[j]["slice_index"],
                               batch[j]["partner_case"][:, 0], batch[j]["partner_slice"][:, 0]):
        assert data.cases["train"][j][ci].subject == data.cases["train"][i][pc].subject
        assert ps == z
      _check_partner_images(data, batch, j, i)


def test_auto_and_random_candidates_stay_within_two_slices_of_the_expert_pair(mmsdnet_phantom):
  data = mmsdnet_phantom.data
  for step in range(4):
    auto = _host(data, step, "auto", k=3)
    shuffled = _host(data, step, "random")
    for j, i in (("mr", "ct"), ("ct", "mr")):
      assert auto[j]["partner_slice"].shape == (len(auto[j]["slice_index"]), 3)
      for z, slices, cases in zip(auto[j]["slice_index"], auto[j]["partner_slice"],
                                  auto[j]["partner_case"]):
        assert z in slices                    # the expert slice is always a candidate
        assert np.all(np.abs(slices - z) <= 2)
        assert len(set(cases)) == 1
      assert np.all(np.abs(shuffled[j]["partner_slice"][:, 0] - shuffled[j]["slice_index"]) <= 2)
      _check_partner_images(data, auto, j, i)


def test_cross_subject_candidates_are_other_subjects_at_the_same_relative_position(mmsdnet_phantom):
  data = mmsdnet_phantom.data
  batch = _host(data, 5, "cross_subject", k=2)
  for j, i in (("mr", "ct"), ("ct", "mr")):
    for ci, z, cases, slices in zip(batch[j]["case_index"], batch[j]["slice_index"],
                                    batch[j]["partner_case"], batch[j]["partner_slice"]):
      case = data.cases["train"][j][ci]
      for c, s in zip(cases, slices):
        partner = data.cases["train"][i][c]
        assert partner.subject != case.subject
        assert s == round(z * (partner.num_slices - 1) / (case.num_slices - 1))
  assert pairing_lib.relative_slice(5, 11, 21) == 10
  assert pairing_lib.relative_slice(0, 1, 9) == 0


def test_expert_pairing_on_unpaired_data_is_a_clear_error(mmsdnet_phantom):
  unpaired = types.SimpleNamespace(**vars(mmsdnet_phantom.data))
  unpaired.manifest = types.SimpleNamespace(paired=False, name="unpaired_set")
  with pytest.raises(config_schema.ConfigError, match="cross_subject"):
    _host(unpaired, 0, "expert")


# ------------------------------------------------------------------------------------------------
# Configs.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module", [mmsdnet, dafnet])
@pytest.mark.parametrize("arg", ["", "tiny,decoder=spade,stn=off",
                                 "label_fraction=0,target=ct,pairing=auto",
                                 "tiny,pairing=cross_subject,label_fraction=0.5,target=mr"])
def test_configs_validate_and_follow_their_arguments(module, arg):
  config = module.get_config(arg)
  config_schema.validate(config, methods.REGISTRY)
  args = dict(item.split("=") for item in arg.split(",") if "=" in item)
  section = config.mmsdnet
  assert section.decoder == args.get("decoder", "film")
  assert section.stn == (args.get("stn", "on") == "on")
  # The CPU-sized configs hold the transformer at the identity for 300 of their 1000 steps.
  assert section.transformer.start == (0 if "tiny" in arg else 300) < config.train.steps
  assert section.pairing == args.get("pairing", "expert")
  expected_mode = "unpaired" if section.pairing == "cross_subject" else "paired"
  assert config.data.phantom.mode == expected_mode
  if "label_fraction" in args:
    assert config.data.target_modality == args["target"]
    assert config.data.label_fraction == float(args["label_fraction"])
  journal = module is dafnet
  assert section.image_disc == journal
  assert section.weights.rec == (1.0 if journal else 10.0)
  assert section.weights.adv_image == (1.0 if journal else 0.0)
  assert (section.weights.kl, section.weights.sup, section.weights.z_rec) == (0.1, 10.0, 1.0)


def test_misalignment_argument_reaches_the_phantom_and_its_cache_folder(tmp_path, monkeypatch):
  monkeypatch.setenv("UNPAIRED_SEG_CACHE", str(tmp_path))
  assert mmsdnet.get_config("tiny").data.phantom.pair_misalignment == 1.0
  config = mmsdnet.get_config("tiny,misalignment=2.5")
  config_schema.validate(config, methods.REGISTRY)
  assert config.data.phantom.pair_misalignment == 2.5
  manifest = loader.resolve_dataset(config)
  assert manifest.phantom["pair_misalignment"] == 2.5
  assert manifest.root.name.endswith("_misalign2.5")
  with pytest.raises(ValueError, match="misalignment"):
    mmsdnet.get_config("tiny,misalignment=2,pairing=cross_subject")
  config.data.phantom.pair_misalignment = 7.0
  with pytest.raises(config_schema.ConfigError, match="data.phantom.pair_misalignment"):
    config_schema.validate(config, methods.REGISTRY)


def test_an_unknown_section_key_is_named():
  config = mmsdnet.get_config("tiny")
  config.mmsdnet.swa_begin = 3
  with pytest.raises(config_schema.ConfigError, match="mmsdnet.swa_begin"):
    config_schema.validate(config, methods.REGISTRY)


def test_the_trainer_moves_partners_with_their_slice_only_when_asked(mmsdnet_phantom):
  from unpaired_seg.data import augment as augment_lib
  config = mmsdnet_phantom.config.copy_and_resolve_references()
  method = methods.create(config, num_classes=len(mmsdnet_phantom.data.class_names),
                          modalities=mmsdnet_phantom.data.modalities)
  config.data.augment.update(enabled=True, rotate_deg=30.0)
  settings = augment_lib.Settings.from_config(config.data.augment)
  assert method.augment_partners                            # the configs ask for it
  # Each slice's partner is the slice itself: moved with it, it stays equal to it.
  batch = {m: {**b, "partner_image": jnp.asarray(b["image"])[:, None]}
           for m, b in jax.tree.map(jnp.asarray, method.host_batch(mmsdnet_phantom.data,
                                                                   0)).items()}
  out = {flag: jax.jit(lambda b, f=flag: train.augment_on_device(rng.prng_key(3), b, settings, f))(
      batch) for flag in (True, False)}
  for m in batch:
    moved = np.asarray(out[True][m]["image"])
    assert not np.allclose(moved, batch[m]["image"])      # the slices were rotated
    np.testing.assert_allclose(np.asarray(out[True][m]["partner_image"])[:, 0], moved,
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out[False][m]["partner_image"]),
                                  np.asarray(batch[m]["partner_image"]))


def test_padded_batches_cover_every_index_once_in_batches_of_one_shape():
  batches = list(mmsdnet_eval.padded_batches(5, 2))
  assert batches == [([0, 1], [0, 1]), ([2, 3], [2, 3]), ([4], [4, 4])]
  assert list(mmsdnet_eval.padded_batches(4, 4)) == [([0, 1, 2, 3], [0, 1, 2, 3])]
  assert list(mmsdnet_eval.padded_batches(0, 3)) == []


def test_predict_multi_volume_labels_every_slice_whatever_the_batch_size(mmsdnet_phantom):
  data = mmsdnet_phantom.data
  case, partners = data.cases["test"]["mr"][0], data.cases["test"]["ct"]
  partner_index = {c.subject: n for n, c in enumerate(partners)}
  shapes = set()

  def predict(state, images, modality, partner_images):
    # A stand-in model: class 1 where the image is above its slice's mean, else 0.
    shapes.add((images.shape, partner_images.shape))
    above = images[..., 0] > images[..., 0].mean(axis=(1, 2), keepdims=True)
    return np.stack([~above, above], axis=-1).astype(np.float32)

  image = case.image
  expected = (image > image.mean(axis=(0, 1), keepdims=True)).astype(np.uint8)
  for batch_size in (1, 3, case.num_slices + 2):
    shapes.clear()
    labels = mmsdnet_eval.predict_multi_volume(
        predict, None, case, partners, partner_index, modality="mr", partner_modality="ct",
        case_pos=0, pairing="expert", k=1, window=2, batch_size=batch_size)
    np.testing.assert_array_equal(labels, expected)
    h, w = image.shape[:2]
    assert shapes == {((batch_size, h, w, 1), (batch_size, 1, h, w, 1))}  # one shape, padded


# ------------------------------------------------------------------------------------------------
# The config section: its registration and the transformer's options' old keys.
# ------------------------------------------------------------------------------------------------


def test_validate_declares_the_method_sections_itself(monkeypatch):
  # As if no plug-in had been imported: validation must not depend on an import registering it.
  monkeypatch.setattr(config_schema, "_METHOD_SECTIONS", {})
  config = dafnet.get_config("tiny")
  config_schema.validate(config)
  assert set(config_schema._METHOD_SECTIONS) == {"mmsdnet"}
  config.mmsdnet.transformer.start_step = 3
  with pytest.raises(config_schema.ConfigError, match="mmsdnet.transformer.start_step"):
    config_schema.validate(config)


_OLD_KEYS = {"align_weight": ("weights", "align"), "mean_offset_weight": ("weights", "mean_offset"),
             "align_target": (None, "align_target"), "trained_by": (None, "stn_trained_by"),
             "warp_gradient": (None, "warp_gradient"), "start": (None, "stn_start")}


def _with_old_keys(tree: dict) -> dict:
  """A config.json of a run made before `mmsdnet.transformer`: its keys flat in the section."""
  old = json.loads(json.dumps(tree))
  section = old["mmsdnet"]
  for new, (parent, key) in _OLD_KEYS.items():
    (section[parent] if parent else section)[key] = section["transformer"][new]
  del section["transformer"]
  return old


def test_a_saved_config_with_the_old_transformer_keys_loads_under_the_new_ones():
  config = mmsdnet.get_config("label_fraction=0,target=ct")
  config.mmsdnet.transformer.update(mean_offset_weight=2.0, warp_gradient="identity")
  today = json.loads(json.dumps(config.to_dict()))
  old = _with_old_keys(today)
  assert old["mmsdnet"]["stn_start"] == 300 and old["mmsdnet"]["weights"]["align"] == 1.0
  with pytest.raises(config_schema.ConfigError, match="mmsdnet"):
    config_schema.validate(ml_collections.ConfigDict(old), methods.REGISTRY)
  moved = config_schema.with_added_keys(old)
  assert moved == today
  loaded = ml_collections.ConfigDict(moved)
  config_schema.validate(loaded, methods.REGISTRY)
  method = methods.create(loaded, num_classes=5, modalities=("mr", "ct"))
  assert method.describe()["transformer"] == dict(
      align_weight=1.0, align_target="masks", trained_by="align", warp_gradient="identity",
      mean_offset_weight=2.0, start=300)
  # Every new name is a key of today's section, every old one is gone from it.
  assert set(config_schema.RENAMED_KEYS.values()) == {
      f"mmsdnet.transformer.{k}" for k in today["mmsdnet"]["transformer"]}
  assert not {"align_target", "stn_trained_by", "warp_gradient", "stn_start"} & set(
      today["mmsdnet"]) and not {"align", "mean_offset"} & set(today["mmsdnet"]["weights"])


def test_a_new_key_wins_over_an_old_one_and_other_configs_are_left_alone():
  tree = {"mmsdnet": {"stn_start": 5, "transformer": {"start": 7}}, "train": {"steps": 3}}
  assert config_schema.with_added_keys(tree)["mmsdnet"] == {"transformer": {"start": 7}}
  joint = json.loads(json.dumps(common.get_base_config(tiny=True).to_dict()))
  assert "mmsdnet" not in config_schema.with_added_keys(joint)
