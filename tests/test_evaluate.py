"""Tiled volume inference, scoring in the source geometry, the summary and its per-case CSV.

  python -m pytest -q tests/test_evaluate.py

A fake "model" that reads the label an intensity encodes (tests/source_data.py) stands in for a
network, so every number can be derived without one.
"""

import csv
import io
import json

import chex
import jax
import jax.numpy as jnp
import nibabel as nib
import numpy as np
import pytest

from tests import source_data
from unpaired_seg import evaluate
from unpaired_seg import metrics
from unpaired_seg.data import dataset as ds
from unpaired_seg.data import geometry
from unpaired_seg.data import pipeline
from unpaired_seg.data import prepare

CLASSES = ("background", "liver", "right_kidney", "left_kidney", "spleen")
NONE = {"scheme": "none"}


def test_tile_starts_and_weights_by_hand():
  assert evaluate.tile_starts(4, 4, 0.5) == [0]
  assert evaluate.tile_starts(3, 4, 0.5) == [0]
  # 10 long, tiles of 4, step 2: starts 0, 2, 4, 6 (the last ends at the border).
  assert evaluate.tile_starts(10, 4, 0.5) == [0, 2, 4, 6]
  # 9 long: ceil(5 / 2) + 1 = 4 tiles spread evenly over [0, 5]: 0, 1.67, 3.33, 5 rounded.
  assert evaluate.tile_starts(9, 4, 0.5) == [0, 2, 3, 5]
  # No overlap: step 4, ceil(5 / 4) + 1 = 3 tiles over [0, 5]: 0, 2.5 (rounds to 2), 5.
  assert evaluate.tile_starts(9, 4, 0.0) == [0, 2, 5]
  w = evaluate.gaussian_weights((5, 4))
  assert w.shape == (5, 4) and w.dtype == np.float32
  # exp(-0.5 * (d / (n / 8))^2) per axis: the centre row (d = 0) times the column profile.
  np.testing.assert_allclose(w[2], np.exp(-0.5 * ((np.arange(4) - 1.5) / 0.5) ** 2), rtol=1e-6)
  np.testing.assert_allclose(w, w[::-1, ::-1])


def _pointwise_predictor(num_classes=5, channels=None):
  """probabilities = one-hot of the label encoded by the centre channel; jitted once."""
  shapes = []
  chex.clear_trace_counter()  # the counter is per function code, shared by every instance

  @jax.jit
  @chex.assert_max_traces(n=1)
  def probs(x):
    centre = x[..., x.shape[-1] // 2]
    labels = jnp.clip(jnp.rint((centre - source_data.INTENSITY_OFFSET) /
                               source_data.INTENSITY_STEP), 0, num_classes - 1)
    return jax.nn.one_hot(labels.astype(jnp.int32), num_classes)

  def predict(state, image, modality):
    del state, modality
    shapes.append(image.shape)
    if channels is not None:
      assert image.shape[-1] == channels
    return probs(image)

  return predict, shapes


@pytest.mark.parametrize("shape", [(21, 13, 5), (5, 6, 3), (8, 8, 4)],
                         ids=["tiled", "padded", "one_tile"])
def test_tiled_inference_equals_the_pointwise_model_everywhere(shape):
  rng = np.random.default_rng(0)
  image = (source_data.INTENSITY_STEP * rng.integers(0, 5, shape)
           + source_data.INTENSITY_OFFSET).astype(np.float32)
  predict, shapes = _pointwise_predictor(channels=3)
  got = evaluate.predict_volume(predict, None, "mr", image, tile_size=(8, 8), context_slices=1,
                                batch_size=6)
  assert got.dtype == np.uint8 and got.shape == shape
  np.testing.assert_array_equal(got, source_data.label_from_intensity(image))
  # One shape for every call: one compile (assert_max_traces above would fail otherwise).
  assert set(shapes) == {(6, 8, 8, 3)}


def test_overlapping_tiles_are_weighted_towards_their_centres():
  # A "model" that says class 1 near its tile's border and class 0 in the middle: with Gaussian
  # weights the middle of each tile wins wherever tiles overlap, so the volume's interior is 0.
  def predict(state, image, modality):
    b, h, w, _ = image.shape
    border = np.zeros((h, w), bool)
    border[:2] = border[-2:] = True
    border[:, :2] = border[:, -2:] = True
    probs = np.stack([~border, border], -1).astype(np.float32)
    return np.broadcast_to(probs, (b, h, w, 2))

  got = evaluate.predict_volume(predict, None, "mr", np.zeros((16, 16, 1), np.float32),
                                tile_size=(8, 8), context_slices=0, batch_size=4)
  assert got[4:12, 4:12].max() == 0            # every interior pixel is some tile's middle
  assert got[0, 0, 0] == 1                     # only one tile covers a corner


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  root = tmp_path_factory.mktemp("evaluate")
  source = source_data.write_abdomen_source(root / "src")
  resampled = prepare.prepare_abdomen_ctmr(source, root / "at2mm", spacing=(2.0, 2.0))
  kept = prepare.prepare_abdomen_ctmr(source, root / "kept", spacing=None)
  return source, resampled, kept


def _cases(manifest, modality):
  return pipeline.prepare_cases(ds.load_modality(manifest, modality), NONE, (8, 8),
                                manifest=manifest)


def test_source_labels_of_ct_are_btcv_mapped_to_the_shared_organs(prepared):
  source, manifest, _ = prepared
  for case in _cases(manifest, "ct"):
    raw = np.asarray(nib.load(str(case.source.label)).dataobj)
    assert set(np.unique(raw)) >= {7, 8}       # stomach and aorta are in the file...
    np.testing.assert_array_equal(case.source_label,
                                  source_data.shared_by_hand(raw, source_data.CT_TO_SHARED))
    assert case.source.label.parent == (source / "ct").resolve()


def test_a_perfect_prediction_is_perfect_in_the_source_geometry(prepared):
  source, _, kept = prepared
  for modality, affine, shape in (("mr", source_data.MR_AFFINE, source_data.MR_SHAPE),
                                  ("ct", source_data.CT_AFFINE, source_data.CT_SHAPE)):
    for case in _cases(kept, modality):
      pred, ref = evaluate.to_reference(case, case.grid_label, "source")
      assert ref.grid == "source" and pred.shape == ref.label.shape == shape
      np.testing.assert_allclose(ref.affine, affine)
      np.testing.assert_allclose(ref.spacing, np.abs(np.diag(affine)[:3]), rtol=1e-6)
      assert ref.slice_axis == 2
      np.testing.assert_array_equal(pred, ref.label)     # the reorientation is undone exactly
      scores = metrics.evaluate_volume(pred, ref.label, CLASSES, ref.spacing,
                                       metrics=("dice", "hd95"))
      present = [n for i, n in enumerate(CLASSES[1:], 1) if (ref.label == i).any()]
      assert present and all(scores[n] == {"dice": 1.0, "hd95": 0.0} for n in present)


def test_predictions_on_the_model_grid_reach_source_voxels_by_world_position(prepared):
  source, manifest, _ = prepared
  case = _cases(manifest, "ct")[0]
  rng = np.random.default_rng(1)
  on_model_grid = rng.integers(0, 5, case.grid_label.shape).astype(np.uint8)
  pred, ref = evaluate.to_reference(case, on_model_grid, "source")
  # Independently: each source voxel's centre in world mm, into the model grid's voxel indices,
  # nearest voxel (clamped at the border). Same answer wherever the nearest voxel is not a tie.
  src_affine = np.asarray(case.source.record.source_affine)
  index = np.stack(np.meshgrid(*[np.arange(n) for n in pred.shape], indexing="ij"), -1)
  world = index @ src_affine[:3, :3].T + src_affine[:3, 3]
  model = (world - case.affine[:3, 3]) @ np.linalg.inv(case.affine[:3, :3]).T
  nearest = np.clip(np.rint(model).astype(int), 0, np.array(on_model_grid.shape) - 1)
  expected = on_model_grid[nearest[..., 0], nearest[..., 1], nearest[..., 2]]
  ties = np.any(np.abs(np.abs(model - np.floor(model)) - 0.5) < 1e-6, axis=-1)
  assert ties.mean() < 0.5
  np.testing.assert_array_equal(pred[~ties], expected[~ties])


def test_evaluate_cases_scores_in_the_source_geometry(prepared, tmp_path):
  _, manifest, _ = prepared
  cases = {m: _cases(manifest, m) for m in ("mr", "ct")}
  predict, shapes = _pointwise_predictor()
  writer = evaluate.PredictionWriter(tmp_path / "predictions", per_modality=1)
  settings = {"surface_tolerance_mm": 1.5, "hd95_variant": "pooled",
              "assd_variant": "mean_of_directed_means"}
  names = ("dice", "hd95", "assd", "surface_dice", "per_slice_dice")
  result = evaluate.evaluate_cases(predict, None, cases, CLASSES, context_slices=0, batch_size=4,
                                   metrics=names, settings=settings, grid="source",
                                   on_prediction=writer)
  assert set(shapes) == {(4, 8, 8, 1)}          # MR 15 x 13 and CT 12 x 10 slices, 8 x 8 tiles
  for modality, block in result.items():
    assert block["grid"] == "source"
    for case in cases[modality]:
      # The same numbers by hand: the model's labels on the model grid, taken back to the source
      # file's grid, scored against the mapped source labels with the source spacing.
      on_model_grid = source_data.label_from_intensity(case.grid_image)
      back = geometry.to_source_grid(geometry.to_source_grid(on_model_grid, case.record),
                                     case.source.record)
      spacing = geometry.spacing_of(np.asarray(case.source.record.source_affine))
      expected = metrics.evaluate_volume(back, case.source_label, CLASSES, spacing, metrics=names,
                                         **settings)
      assert block["per_case"][case.case] == expected
    dice = [v["dice"] for c in block["per_case"].values() for v in c.values()
            if np.isfinite(v["dice"])]
    assert 0.5 < np.mean(dice) < 1.0             # resampled twice: good, not perfect
    assert block["per_class"] == metrics.aggregate(block["per_case"])["per_class"]
  # On the dataset's own (2 mm) grid the numbers differ: the geometry is really the source's.
  on_dataset = evaluate.evaluate_cases(predict, None, {"ct": cases["ct"]}, CLASSES,
                                       context_slices=0, batch_size=4, metrics=("hd95",),
                                       grid="dataset")
  assert on_dataset["ct"]["grid"] == "dataset"
  case = cases["ct"][0]
  expected = metrics.evaluate_volume(
      source_data.label_from_intensity(case.grid_image), case.grid_label, CLASSES, (2.0, 2.0, 3.0),
      metrics=("hd95",))
  assert on_dataset["ct"]["per_case"][case.case] == expected
  # The writer kept one case per modality, on the source grid with the source affine.
  index = json.loads((tmp_path / "predictions" / "index.json").read_text())
  assert {m: len(v) for m, v in index.items()} == {"mr": 1, "ct": 1}
  entry = index["ct"][cases["ct"][0].case]
  saved = nib.load(str(tmp_path / "predictions" / entry["prediction"]))
  assert saved.shape == source_data.CT_SHAPE
  np.testing.assert_allclose(saved.affine, source_data.CT_AFFINE, atol=1e-6)
  assert entry["image"] == str(cases["ct"][0].source.image) and entry["grid"] == "source"
  np.testing.assert_array_equal(
      np.asarray(nib.load(str(tmp_path / "predictions" / entry["reference"])).dataobj),
      cases["ct"][0].source_label)


def test_slice_axis_follows_the_acquisition_not_the_array_order():
  # Stored [Z, Y, X]: the slice (superior) axis is array axis 0 of the file.
  affine = np.array([[0., 0., 1.5, 0.], [0., 1.5, 0., 0.], [5.0, 0., 0., 0.], [0., 0., 0., 1.]])
  _, _, _, record = geometry.to_model_grid(np.zeros((4, 6, 7)), None, affine, None)
  assert evaluate._slice_axis(record) == 0


def test_a_moved_source_label_file_is_named(prepared, tmp_path):
  _, manifest, _ = prepared
  case = _cases(manifest, "mr")[0]
  case.source = pipeline.SourceGeometry(case.source.record, case.source.image,
                                        tmp_path / "gone.nii.gz", case.source.target_spacing,
                                        case.source.label_spec)
  with pytest.raises(FileNotFoundError, match="gone.nii.gz.*eval.grid=dataset"):
    evaluate.to_reference(case, case.grid_label, "source")


def test_summary_records_settings_policy_and_extras():
  result = {"mr": {"grid": "source", "mean": {"dice": 0.5}, "per_class": {}, "std": {},
                   "count": {}, "per_case": {"c1": {"liver": {"dice": 0.5, "hd95": float("nan")}}}}}
  out = evaluate.summary("joint", "toy", result, split="test", checkpoint_step=7,
                         checkpoint="best", metrics=("dice", "hd95", "per_slice_dice"),
                         settings={"surface_tolerance_mm": 3.0}, extra={"fold": 1})
  assert out["checkpoint"] == {"which": "best", "step": 7} and out["fold"] == 1
  settings = out["metric_settings"]
  assert settings["metrics"] == ["dice", "hd95", "per_slice_dice"]
  assert settings["surface_dice"]["tolerance_mm"] == 3.0 and settings["units"] == "mm"
  assert settings["empty_policy"] == metrics.EMPTY_POLICY
  assert "slice axis" in settings["per_slice_dice"]["slice_axis"]
  assert out["modalities"]["mr"]["per_case"]["c1"]["liver"]["hd95"] is None   # NaN -> null
  json.dumps(out, allow_nan=False)
  rows = list(csv.reader(io.StringIO(evaluate.per_case_csv(out["modalities"]))))
  assert rows == [["modality", "case", "class", "dice", "hd95"], ["mr", "c1", "liver", "0.5", ""]]


def test_the_real_data_preset_and_bad_eval_keys_validate_as_expected():
  from configs import common
  from unpaired_seg import config_schema, methods
  config = common.get_base_config()
  common.use_prepared_data(config, "/data/abdomen_ctmr_2mm")
  config_schema.validate(config, methods.REGISTRY)
  assert config.data.normalization == "ct=dataset_zscore" and config.data.root
  for key, value, pattern in (("metrics", ("dice", "hd96"), r"eval\.metrics"),
                              ("grid", "model", r"eval\.grid"),
                              ("tile_overlap", 1.0, r"eval\.tile_overlap")):
    bad = common.get_base_config()
    bad.eval[key] = value
    with pytest.raises(config_schema.ConfigError, match=pattern):
      config_schema.validate(bad, methods.REGISTRY)
  bad = common.get_base_config()
  bad.data.split.update(folds=3, fold=3)
  with pytest.raises(config_schema.ConfigError, match=r"data\.split\.fold"):
    config_schema.validate(bad, methods.REGISTRY)


def test_the_last_table_logged_is_the_3d_dice_and_per_slice_dice_says_what_it_is():
  block = {"grid": "source", "per_class": {"liver": {"dice": 0.8, "per_slice_dice": 0.9,
                                                     "hd95": 4.0}},
           "std": {"liver": {"dice": 0.1, "per_slice_dice": 0.05, "hd95": 1.0}},
           "mean": {"dice": 0.8, "per_slice_dice": 0.9, "hd95": 4.0}}
  text = evaluate.log_table({"mr": block}, ["background", "liver"],
                                ("dice", "hd95", "per_slice_dice"))
  titles = [line for line in text.splitlines() if "per class" in line]
  assert titles[-1] == "3D Dice per class (mean +- std over test volumes, source grid)"
  assert titles[0].startswith("3D HD95 (mm) per class")
  assert "not a 3D score" in titles[1]
  assert text.rstrip().splitlines()[-1].split()[:2] == ["mr", "0.800"]
