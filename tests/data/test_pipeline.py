"""Normalisation, crop/pad, subject splits, leakage check and the deterministic slice sampler."""

import json

import numpy as np
import pytest

from unpaired_seg.data import phantom
from unpaired_seg.data import pipeline


def test_normalize_schemes_by_hand():
  x = np.array([0.0, 2.0, 4.0])
  np.testing.assert_allclose(pipeline.normalize_intensity(x, {"scheme": "zscore"}),
                             [-np.sqrt(1.5), 0.0, np.sqrt(1.5)], rtol=1e-6)
  np.testing.assert_allclose(pipeline.normalize_intensity(x, {"scheme": "minmax"}), [-1, 0, 1])
  # Clipped to [1, 3] -> [1, 2, 3] -> z-score of that.
  np.testing.assert_allclose(
      pipeline.normalize_intensity(x, {"scheme": "clip_zscore", "window": [1, 3]}),
      [-np.sqrt(1.5), 0.0, np.sqrt(1.5)], rtol=1e-6)
  np.testing.assert_array_equal(pipeline.normalize_intensity(x, {"scheme": "none"}), x)
  with pytest.raises(ValueError, match="mr/case_1.*'bogus'"):
    pipeline.normalize_intensity(x, {"scheme": "bogus"}, name="mr/case_1")


def test_crop_or_pad_centres():
  a = np.arange(4 * 6).reshape(4, 6)
  out = pipeline.crop_or_pad(a, (6, 4), pad_value=-1)
  assert out.shape == (6, 4)
  np.testing.assert_array_equal(out[0], [-1] * 4)
  np.testing.assert_array_equal(out[1:5], a[:, 1:5])
  np.testing.assert_array_equal(out[5], [-1] * 4)


def test_slice_stack_clamps_neighbours():
  vol = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
  out = pipeline.slice_stack(vol, np.array([0, 2]), context=1)
  assert out.shape == (2, 2, 2, 3)
  np.testing.assert_array_equal(out[0, ..., 0], vol[:, :, 0])   # clamped below
  np.testing.assert_array_equal(out[0, ..., 2], vol[:, :, 1])
  np.testing.assert_array_equal(out[1, ..., 2], vol[:, :, 2])   # clamped above


@pytest.fixture(scope="module")
def unpaired(tmp_path_factory):
  return phantom.generate(tmp_path_factory.mktemp("p") / "ds", mode="unpaired", num_subjects=6,
                          shape=(32, 32, 12), seed=1)


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
  return phantom.generate(tmp_path_factory.mktemp("p") / "ds", mode="paired", num_subjects=6,
                          shape=(32, 32, 12), seed=1)


FRACTIONS = {"train": 0.5, "val": 0.25, "test": 0.25}


def test_splits_are_per_subject_seeded_and_disjoint(unpaired):
  a = pipeline.make_splits(unpaired, ("mr", "ct"), FRACTIONS, seed=3)
  b = pipeline.make_splits(unpaired, ("mr", "ct"), FRACTIONS, seed=3)
  c = pipeline.make_splits(unpaired, ("mr", "ct"), FRACTIONS, seed=4)
  assert a == b
  assert a != c
  for m in ("mr", "ct"):
    parts = a["modalities"][m]
    # 6 subjects: round(0.25 * 6) = 2 each for val and test, the remaining 2 for training.
    assert (len(parts["train"]), len(parts["val"]), len(parts["test"])) == (2, 2, 2)
    everything = parts["train"] + parts["val"] + parts["test"]
    assert sorted(everything) == pipeline.subjects_of(unpaired, m)
    assert len(set(everything)) == len(everything)


def test_paired_dataset_splits_subjects_once(paired):
  s = pipeline.make_splits(paired, ("mr", "ct"), FRACTIONS, seed=0)
  assert s["modalities"]["mr"] == s["modalities"]["ct"]


def test_leakage_check_fails_loudly():
  splits = {"modalities": {"mr": {"train": ["s1", "s2"], "val": ["s3"], "test": ["s4"]},
                           "ct": {"train": ["s4"], "val": [], "test": ["s5"]}}}
  with pytest.raises(pipeline.SplitError, match=r"test subjects of 'mr'.*\['s4'\]"):
    pipeline.check_no_leakage(splits)


def test_splits_file_is_reused_and_checked(unpaired, tmp_path):
  path = tmp_path / "splits.json"
  first = pipeline.load_or_create_splits(path, unpaired, ("mr", "ct"), FRACTIONS, seed=0)
  # A different seed does not silently regenerate an existing file.
  again = pipeline.load_or_create_splits(path, unpaired, ("mr", "ct"), FRACTIONS, seed=99)
  assert again == first
  broken = json.loads(path.read_text())
  broken["modalities"]["mr"]["test"].append(broken["modalities"]["mr"]["train"][0])
  path.write_text(json.dumps(broken))
  with pytest.raises(pipeline.SplitError, match=str(path)):
    pipeline.load_or_create_splits(path, unpaired, ("mr", "ct"), FRACTIONS, seed=0)
  broken["modalities"]["mr"]["test"] = ["nobody"]
  path.write_text(json.dumps(broken))
  with pytest.raises(pipeline.SplitError, match="nobody"):
    pipeline.load_or_create_splits(path, unpaired, ("mr", "ct"), FRACTIONS, seed=0)


def _cases(manifest, modality):
  from unpaired_seg.data import dataset as ds
  return pipeline.prepare_cases(ds.load_modality(manifest, modality),
                                manifest.modalities[modality], (32, 32))


def test_sampler_is_a_pure_function_of_the_step(unpaired):
  cases = _cases(unpaired, "mr")
  s1 = pipeline.SliceSampler(cases, 8, 0.5, 0, seed=0, stream=0)
  s2 = pipeline.SliceSampler(cases, 8, 0.5, 0, seed=0, stream=0)
  b5 = s1.batch(5)
  s1.batch(6)
  np.testing.assert_array_equal(b5["image"], s2.batch(5)["image"])
  assert not np.array_equal(s1.indices(5), s1.indices(6))
  other_stream = pipeline.SliceSampler(cases, 8, 0.5, 0, seed=0, stream=1)
  assert not np.array_equal(s1.indices(5), other_stream.indices(5))
  assert b5["image"].shape == (8, 32, 32, 1) and b5["label"].shape == (8, 32, 32)
  # The batch holds exactly the (case, slice) it says.
  ci, z = b5["case_index"][0], b5["slice_index"][0]
  np.testing.assert_array_equal(b5["image"][0, ..., 0], cases[ci].image[:, :, z])
  np.testing.assert_array_equal(b5["label"][0], cases[ci].label[:, :, z])


def test_sampler_oversamples_foreground(unpaired):
  cases = _cases(unpaired, "ct")
  always = pipeline.SliceSampler(cases, 64, 1.0, 0, seed=0, stream=0)
  never = pipeline.SliceSampler(cases, 64, 0.0, 0, seed=0, stream=0)
  fg_always = np.mean([always.batch(s)["label"].reshape(64, -1).any(1).mean() for s in range(5)])
  fg_never = np.mean([never.batch(s)["label"].reshape(64, -1).any(1).mean() for s in range(5)])
  assert fg_always == 1.0
  assert fg_never < 1.0


def test_sampler_context_slices(unpaired):
  cases = _cases(unpaired, "mr")
  s = pipeline.SliceSampler(cases, 4, 0.5, 1, seed=0, stream=0)
  b = s.batch(0)
  assert b["image"].shape == (4, 32, 32, 3)
  ci, z = b["case_index"][1], b["slice_index"][1]
  np.testing.assert_array_equal(b["image"][1, ..., 1], cases[ci].image[:, :, z])


def test_prepare_cases_normalises_and_maps_labels(unpaired):
  cases = _cases(unpaired, "ct")
  for c in cases:
    assert c.image.dtype == np.float32
    assert abs(float(c.image.mean())) < 1e-3 and abs(float(c.image.std()) - 1) < 1e-3
    assert set(np.unique(c.label)) <= {0, 1, 2, 3, 4}
