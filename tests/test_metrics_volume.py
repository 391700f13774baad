"""Tests of unpaired_seg.metrics on label volumes: per-class metrics, aggregation, settings, JSON.

The metrics of one pair of masks are tested in tests/test_metrics.py.

  python -m pytest -q tests/test_metrics_volume.py
"""

import json
import math

import numpy as np
import pytest

from unpaired_seg import metrics

SQRT2 = math.sqrt(2.0)
CLASS_NAMES = ("background", "liver", "kidney", "spleen")
SPACING = (1.5, 1.0, 2.0)


def _toy_case():
  """liver in both (ref shifted by one voxel on axis 0), kidney in ref only, spleen in neither."""
  ref = np.zeros((10, 8, 6), np.uint8)
  pred = np.zeros((10, 8, 6), np.uint8)
  ref[2:6, 2:5, 1:4] = 1  # 36 voxels
  pred[3:7, 2:5, 1:4] = 1  # 36 voxels, overlap 27
  ref[7:9, 6:8, 4:6] = 2
  return pred, ref


def test_evaluate_volume_toy():
  pred, ref = _toy_case()
  result = metrics.evaluate_volume(
      pred, ref, CLASS_NAMES, SPACING,
      metrics=("dice", "per_slice_dice", "hausdorff", "hd95", "assd", "surface_dice"),
      surface_tolerance_mm=1.5)
  assert list(result) == ["liver", "kidney", "spleen"]
  liver = result["liver"]
  assert liver["dice"] == pytest.approx(2 * 27 / 72)
  assert liver["hausdorff"] == pytest.approx(1.5)  # a shift of one 1.5 mm voxel
  liver_ref, liver_pred = ref == 1, pred == 1
  assert liver["hd95"] == pytest.approx(metrics.hd95(liver_pred, liver_ref, SPACING))
  assert liver["assd"] == pytest.approx(metrics.assd(liver_pred, liver_ref, SPACING))
  assert liver["surface_dice"] == pytest.approx(1.0)  # every distance is <= 1.5 mm
  # Slices along the last axis: 0, 4 and 5 hold no liver (1 each); 1..3 hold 4x3 vs 4x3 voxels
  # with overlap 3x3 (2 * 9 / 24 = 3/4 each).
  assert liver["per_slice_dice"] == pytest.approx((3 * 1 + 3 * 3 / 4) / 6)
  kidney = result["kidney"]
  assert kidney["dice"] == 0.0 and kidney["surface_dice"] == 0.0
  assert all(math.isnan(kidney[m]) for m in ("hausdorff", "hd95", "assd"))
  spleen = result["spleen"]
  assert all(math.isnan(spleen[m]) for m in ("dice", "hausdorff", "hd95", "assd", "surface_dice"))
  assert spleen["per_slice_dice"] == 1.0
  # A {label: name} mapping of the foreground gives the same result.
  mapped = metrics.evaluate_volume(pred, ref, {1: "liver", 2: "kidney", 3: "spleen"}, SPACING,
                                   metrics=("dice", "hausdorff"))
  assert mapped["liver"] == {"dice": liver["dice"], "hausdorff": liver["hausdorff"]}


def test_evaluate_volume_input_errors():
  pred, ref = _toy_case()
  with pytest.raises(ValueError, match="ref_labels"):
    metrics.evaluate_volume(pred, ref * 63, CLASS_NAMES, SPACING)  # raw grey values
  with pytest.raises(ValueError, match="metrics"):
    metrics.evaluate_volume(pred, ref, CLASS_NAMES, SPACING, metrics=("dice", "hd"))
  with pytest.raises(ValueError, match="spacing"):
    metrics.evaluate_volume(pred, ref, CLASS_NAMES, (1.0, 1.0))
  with pytest.raises(ValueError, match="shapes differ"):
    metrics.evaluate_volume(pred[:-1], ref, CLASS_NAMES, SPACING)
  with pytest.raises(ValueError, match="class_names"):
    metrics.evaluate_volume(pred, ref, ("background", "liver", "liver", "spleen"), SPACING)
  with pytest.raises(ValueError, match="pred_labels"):
    metrics.evaluate_volume(pred.astype(np.float32), ref, CLASS_NAMES, SPACING)


def test_aggregate_by_hand():
  nan = math.nan
  per_case = {
      "case_a": {"liver": {"dice": 0.8, "hd95": 4.0}, "kidney": {"dice": 0.0, "hd95": nan},
                 "spleen": {"dice": nan, "hd95": nan}},
      "case_b": {"liver": {"dice": 0.6, "hd95": 2.0}, "kidney": {"dice": 0.5, "hd95": 3.0},
                 "spleen": {"dice": nan, "hd95": nan}},
      "case_c": {"liver": {"dice": 0.7, "hd95": None}, "kidney": {"dice": 1.0, "hd95": nan},
                 "spleen": {"dice": nan, "hd95": nan}},
  }
  summary = metrics.aggregate(per_case)
  assert summary["per_class"]["liver"]["dice"] == pytest.approx(0.7)
  assert summary["per_class"]["liver"]["hd95"] == pytest.approx(3.0)
  assert summary["per_class"]["kidney"]["dice"] == pytest.approx(0.5)
  assert summary["per_class"]["kidney"]["hd95"] == pytest.approx(3.0)
  assert math.isnan(summary["per_class"]["spleen"]["dice"])
  # Class means (0.7, 0.5) and (3.0, 3.0); the all-NaN spleen is left out.
  assert summary["mean"]["dice"] == pytest.approx(0.6)
  assert summary["mean"]["hd95"] == pytest.approx(3.0)
  # Sample std: liver dice (0.8, 0.6, 0.7) -> 0.1; hd95 (4, 2) -> sqrt(2); one value -> NaN.
  assert summary["std"]["liver"]["dice"] == pytest.approx(0.1)
  assert summary["std"]["liver"]["hd95"] == pytest.approx(SQRT2)
  assert math.isnan(summary["std"]["kidney"]["hd95"])
  assert summary["count"]["liver"] == {"dice": 3, "hd95": 2}
  assert summary["count"]["spleen"] == {"dice": 0, "hd95": 0}

  all_nan = metrics.aggregate({"a": {"spleen": {"dice": nan}}})
  assert math.isnan(all_nan["mean"]["dice"])
  with pytest.raises(ValueError, match="case_b"):
    metrics.aggregate({"case_a": {"liver": {"dice": 1.0}}, "case_b": {"kidney": {"dice": 1.0}}})
  with pytest.raises(ValueError, match="per_case"):
    metrics.aggregate({})


def test_evaluate_aggregate_and_json_round_trip():
  pred, ref = _toy_case()
  settings = dict(metrics=("dice", "hd95", "assd"), surface_tolerance_mm=2.0)
  per_case = {
      "case_0": metrics.evaluate_volume(pred, ref, CLASS_NAMES, SPACING, **settings),
      "case_1": metrics.evaluate_volume(ref, ref, CLASS_NAMES, SPACING, **settings),
  }
  summary = {
      "settings": metrics.metric_settings(**settings),
      "per_case": per_case,
      "aggregate": metrics.aggregate(per_case),
  }
  text = json.dumps(metrics.to_jsonable(summary), allow_nan=False)
  loaded = json.loads(text)
  assert loaded["per_case"]["case_0"]["spleen"]["dice"] is None
  assert loaded["per_case"]["case_0"]["kidney"]["hd95"] is None
  assert loaded["per_case"]["case_0"]["kidney"]["dice"] == 0.0
  assert loaded["aggregate"]["per_class"]["spleen"]["assd"] is None
  # liver: (54/72 + 1) / 2; kidney: (0 + 1) / 2.
  assert loaded["aggregate"]["per_class"]["liver"]["dice"] == pytest.approx((0.75 + 1) / 2)
  assert loaded["aggregate"]["per_class"]["kidney"]["dice"] == pytest.approx(0.5)
  assert loaded["aggregate"]["mean"]["dice"] == pytest.approx(((0.75 + 1) / 2 + 0.5) / 2)
  # Re-aggregating what was read back (None for NaN) gives the same numbers.
  again = metrics.to_jsonable(metrics.aggregate(loaded["per_case"]))
  assert again == loaded["aggregate"]


def test_to_jsonable():
  obj = {
      "nan": float("nan"), "np_nan": np.float32("nan"), "inf": np.inf, "f32": np.float32(0.5),
      "i64": np.int64(3), "flag": np.bool_(True), 7: (1.0, np.nan), np.int32(2): "two",
      "arr": np.array([[1.0, np.nan]]), "none": None, "nested": {"x": [np.float64(2.5)]},
  }
  out = metrics.to_jsonable(obj)
  assert out == {
      "nan": None, "np_nan": None, "inf": None, "f32": 0.5, "i64": 3, "flag": True,
      "7": [1.0, None], "2": "two", "arr": [[1.0, None]], "none": None, "nested": {"x": [2.5]},
  }
  assert type(out["f32"]) is float and type(out["i64"]) is int and type(out["flag"]) is bool
  assert json.loads(json.dumps(out, allow_nan=False)) == out
  with pytest.raises(ValueError, match="to_jsonable"):
    metrics.to_jsonable({"bad": object()})
  with pytest.raises(ValueError, match="to_jsonable"):
    metrics.to_jsonable({(1, 2): 1.0})


def test_metric_settings_record():
  settings = metrics.metric_settings(
      metrics=("dice", "hd95", "surface_dice"), surface_tolerance_mm=1.5,
      hd95_variant="pooled", slice_axis=0)
  assert settings["metrics"] == ["dice", "hd95", "surface_dice"]
  assert settings["units"] == "mm"
  assert settings["hd95_variant"]["name"] == "pooled"
  assert settings["assd_variant"]["name"] == "mean_of_directed_means"
  assert settings["surface_dice"]["tolerance_mm"] == 1.5
  assert settings["per_slice_dice"]["slice_axis"] == 0
  assert "face-connectivity" in settings["surface"]
  assert settings["empty_policy"] == metrics.EMPTY_POLICY
  json.dumps(settings, allow_nan=False)
  # The record is a copy: editing it leaves the module's policy alone.
  settings["empty_policy"]["one_empty"]["dice"] = 1.0
  assert metrics.EMPTY_POLICY["one_empty"]["dice"] == 0.0
  with pytest.raises(ValueError, match="assd_variant"):
    metrics.metric_settings(assd_variant="mean")
  with pytest.raises(ValueError, match="surface_tolerance_mm"):
    metrics.metric_settings(surface_tolerance_mm=float("nan"))
