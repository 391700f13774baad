"""Normalisation (per volume and training-split statistics), the body box on the model grid,
subject splits (fractions and k-fold), leakage check and the deterministic slice sampler.

  python -m pytest -q tests/data/test_pipeline.py
"""

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest

from unpaired_seg.data import dataset as ds
from unpaired_seg.data import geometry
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


def test_centre_box_crops_and_pads_symmetrically():
  a = np.arange(4 * 6).reshape(4, 6)
  box = pipeline.centre_box(a.shape, (6, 4))
  # Axis 0: 4 -> 6 pads one row on each side; axis 1: 6 -> 4 drops one column on each side.
  assert box == (slice(-1, 5), slice(1, 5))
  out = geometry.apply_box(a, box, (6, 4), pad_value=-1)
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
  return pipeline.prepare_cases(ds.load_modality(manifest, modality),
                                manifest.modalities[modality].normalization, (32, 32),
                                manifest=manifest)


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


def test_prepared_cases_keep_the_whole_volume_and_a_box_that_maps_back(unpaired):
  for c in _cases(unpaired, "mr"):
    # The phantom is stored RAS at the image size: the box is the whole slice, nothing moves.
    assert c.box == (slice(0, 32), slice(0, 32))
    np.testing.assert_array_equal(c.image, c.grid_image)
    np.testing.assert_array_equal(geometry.invert_box(c.label, c.box, c.grid_label.shape),
                                  c.grid_label)
    assert c.image_path == unpaired.root / "mr" / "imagesTr" / f"{c.case}.nii.gz"
    assert c.source is None      # no prepare geometry records
    np.testing.assert_array_equal(geometry.to_source_grid(c.grid_label, c.record),
                                  ds.load_volume(unpaired, "mr", c.case).label)


def _body_volume(shape, centre, half, affine=np.eye(4)):
  """Dark background, a bright rectangular 'body' with a labelled 'organ' in its middle."""
  image = np.zeros(shape, np.float32)
  label = np.zeros(shape, np.uint8)
  (x0, x1), (y0, y1) = [(c - h, c + h) for c, h in zip(centre, half)]
  image[x0:x1, y0:y1] = 100.0
  label[centre[0] - 2:centre[0] + 2, centre[1] - 2:centre[1] + 2] = 1
  return ds.Volume("ct", "c1", "c1", image, label, np.asarray(affine, np.float64))


def test_training_view_is_cut_around_the_body_not_the_centre():
  volume = _body_volume((60, 40, 3), centre=(45, 12), half=(8, 6))
  spec = {"scheme": "none"}
  case = pipeline.prepare_case(volume, spec, (16, 16))
  # Body rows 37..52 -> centre 44.5; columns 6..17 -> centre 11.5: a 16-box starts 8 before.
  assert case.box == (slice(37, 53), slice(4, 20))
  np.testing.assert_array_equal(case.image, volume.image[37:53, 4:20])
  assert case.label.sum() == volume.label.sum()        # the organ is inside the view
  centre = pipeline.prepare_case(volume, spec, (16, 16), crop="centre")
  assert centre.box == (slice(22, 38), slice(12, 28))
  assert centre.label.sum() == 0                       # a centre crop misses it
  # Smaller than the view: the box reaches outside, padded with the volume's minimum.
  small = pipeline.prepare_case(_body_volume((10, 12, 2), (5, 6), (3, 3)), spec, (16, 16))
  assert small.image.shape == (16, 16, 2) and small.box[0].start < 0 and small.box[1].start < 0
  np.testing.assert_array_equal(
      geometry.invert_box(small.image, small.box, (10, 12)), small.grid_image)
  with pytest.raises(ValueError, match="data.crop"):
    pipeline.prepare_case(volume, spec, (16, 16), crop="middle")


def test_view_coverage_is_the_share_of_each_class_the_training_views_keep():
  volume = _body_volume((60, 40, 3), centre=(45, 12), half=(8, 6))   # view rows 37..52, cols 4..19
  volume.label[5:9, 30:34] = 2           # outside the view
  volume.label[50:56, 10:12] = 3         # rows 50..52 of 50..55 inside: half of it
  case = pipeline.prepare_case(volume, {"scheme": "none"}, (16, 16))
  names = ("background", "organ", "outside", "edge", "absent")
  coverage = pipeline.view_coverage([case], names)
  assert coverage == {"organ": 1.0, "outside": 0.0, "edge": 0.5}     # 'absent': no voxel at all
  unlabelled = dataclasses.replace(case, label=None)                 # a dropped label counts not
  assert pipeline.view_coverage([case, unlabelled], names) == coverage
  assert pipeline.view_coverage([unlabelled], names) == {}


def test_a_stored_lps_volume_is_put_on_the_ras_grid_and_back_exactly():
  lps = np.diag([-1.5, -1.5, 4.0, 1.0])
  volume = _body_volume((20, 18, 4), centre=(12, 9), half=(5, 5), affine=lps)
  volume.image[:] += np.arange(20)[:, None, None]      # make the orientation visible
  case = pipeline.prepare_case(volume, {"scheme": "none"}, (16, 16))
  np.testing.assert_array_equal(case.grid_image, volume.image[::-1, ::-1])
  assert nib.aff2axcodes(case.affine) == ("R", "A", "S")
  assert case.spacing == (1.5, 1.5, 4.0)
  np.testing.assert_array_equal(geometry.to_source_grid(case.grid_label, case.record),
                                volume.label)


def test_dataset_zscore_by_hand_and_without_statistics():
  x = np.array([0.0, 2.0, 4.0, 10.0])
  spec = {"scheme": "dataset_zscore", "mean": 2.0, "std": 4.0}
  np.testing.assert_allclose(pipeline.normalize_intensity(x, spec), [-0.5, 0.0, 0.5, 2.0])
  windowed = dict(spec, window=[0.0, 6.0])
  np.testing.assert_allclose(pipeline.normalize_intensity(x, windowed), [-0.5, 0.0, 0.5, 1.0])
  with pytest.raises(ValueError, match="ct/c7.*training split"):
    pipeline.normalize_intensity(x, {"scheme": "dataset_zscore"}, name="ct/c7")


def test_normalization_overrides_name_the_config_key(unpaired):
  specs = pipeline.resolve_normalization(unpaired, ("mr", "ct"), "ct=dataset_zscore")
  assert specs["ct"] == {"scheme": "dataset_zscore"}
  assert specs["mr"] == unpaired.modalities["mr"].normalization
  specs = pipeline.resolve_normalization(unpaired, ("mr", "ct"), "mr=clip_zscore:-5:7, ct=none")
  assert specs == {"mr": {"scheme": "clip_zscore", "window": [-5.0, 7.0]}, "ct": {"scheme": "none"}}
  for bad, pattern in (("pet=zscore", "'pet'"), ("ct=zscore2", "zscore2"), ("ct", "MODALITY"),
                       ("ct=clip_zscore:3:1", "LO < HI")):
    with pytest.raises(ValueError, match=r"data\.normalization.*" + pattern):
      pipeline.resolve_normalization(unpaired, ("mr", "ct"), bad)


def test_dataset_zscore_is_fitted_on_training_cases_only(unpaired, tmp_path):
  splits = pipeline.make_splits(unpaired, ("ct",), FRACTIONS, seed=0)
  volumes = ds.load_modality(unpaired, "ct")
  train = pipeline.cases_in(volumes, splits, "train")
  others = [v for v in volumes if v.case not in {t.case for t in train}]
  assert len(train) == 2 and others
  path = tmp_path / "normalization.json"
  specs = {"ct": {"scheme": "dataset_zscore"}}
  fitted = pipeline.load_or_fit_normalization(path, specs, {"ct": train})["ct"]
  # Reference: every training voxel in one array, numpy's mean and population std.
  voxels = np.concatenate([v.image.ravel().astype(np.float64) for v in train])
  assert fitted["mean"] == pytest.approx(voxels.mean(), rel=1e-12)
  assert fitted["std"] == pytest.approx(voxels.std(), rel=1e-12)
  assert fitted["fitted_on"] == sorted(v.case for v in train)
  assert fitted["voxels"] == voxels.size
  # Validation and test intensities do not move the statistics.
  for v in others:
    v.image[:] = 1e6
  again = pipeline.fit_normalization(specs["ct"], train)
  assert again["mean"] == fitted["mean"] and again["std"] == fitted["std"]
  # The saved numbers are reused, and refused for another training split or scheme.
  assert json.loads(path.read_text())["modalities"]["ct"] == fitted
  assert pipeline.load_or_fit_normalization(path, specs, {"ct": train})["ct"] == fitted
  with pytest.raises(ValueError, match=f"{path}.*other training cases"):
    pipeline.load_or_fit_normalization(path, specs, {"ct": train[:1]})
  with pytest.raises(ValueError, match=f"{path}.*'dataset_zscore'.*'zscore'"):
    pipeline.load_or_fit_normalization(path, {"ct": {"scheme": "zscore"}}, {"ct": train})
  # A prepared case normalised with them has the training statistics, not its own.
  case = pipeline.prepare_case(train[0], fitted, (32, 32))
  np.testing.assert_allclose(case.grid_image,
                             (train[0].image - fitted["mean"]) / fitted["std"], rtol=1e-5,
                             atol=1e-5)


def test_kfold_splits_partition_the_subjects_into_test_folds(unpaired):
  subjects = pipeline.subjects_of(unpaired, "mr")
  folds = 3
  seen_test = []
  for fold in range(folds):
    split = dict(FRACTIONS, folds=folds, fold=fold)
    s = pipeline.make_splits(unpaired, ("mr", "ct"), split, seed=5)
    assert s == pipeline.make_splits(unpaired, ("mr", "ct"), split, seed=5)
    assert (s["folds"], s["fold"]) == (folds, fold)
    parts = s["modalities"]["mr"]
    # 6 subjects, 3 folds: 2 test each; val = round(0.25 * 6) = 2 of the 4 others.
    assert (len(parts["test"]), len(parts["val"]), len(parts["train"])) == (2, 2, 2)
    assert sorted(parts["test"] + parts["val"] + parts["train"]) == subjects
    seen_test += parts["test"]
  assert sorted(seen_test) == subjects          # every subject is tested exactly once
  other_seed = pipeline.make_splits(unpaired, ("mr",), dict(FRACTIONS, folds=3, fold=0), seed=6)
  assert other_seed["modalities"]["mr"] != pipeline.make_splits(
      unpaired, ("mr",), dict(FRACTIONS, folds=3, fold=0), seed=5)["modalities"]["mr"]
  with pytest.raises(pipeline.SplitError, match="too few for 7 folds"):
    pipeline.make_splits(unpaired, ("mr",), dict(FRACTIONS, folds=7, fold=0), seed=0)
  with pytest.raises(pipeline.SplitError, match="'fold' must be in 0..2"):
    pipeline.make_splits(unpaired, ("mr",), dict(FRACTIONS, folds=3, fold=3), seed=0)


def test_a_splits_file_of_another_fold_is_refused(unpaired, tmp_path):
  path = tmp_path / "splits.json"
  pipeline.load_or_create_splits(path, unpaired, ("mr",), dict(FRACTIONS, folds=3, fold=1), 0)
  with pytest.raises(pipeline.SplitError, match=f"{path}.*folds=3, fold=1.*fold=2"):
    pipeline.load_or_create_splits(path, unpaired, ("mr",), dict(FRACTIONS, folds=3, fold=2), 0)
  with pytest.raises(pipeline.SplitError, match="folds=0"):
    pipeline.load_or_create_splits(path, unpaired, ("mr",), FRACTIONS, 0)


def test_target_spacing_must_be_one_for_the_dataset(unpaired):
  cases = _cases(unpaired, "mr")
  assert pipeline.target_spacing_of(cases) is None
  record = cases[0].record

  def source(spacing):
    return pipeline.SourceGeometry(record, unpaired.root, unpaired.root, spacing,
                                   unpaired.modalities["mr"])
  a = [dataclasses.replace(c, source=source((2.0, 2.0))) for c in cases]
  assert pipeline.target_spacing_of(a) == (2.0, 2.0)
  a[0] = dataclasses.replace(a[0], source=source((1.5, 1.5)))
  with pytest.raises(ValueError, match="different in-plane spacings"):
    pipeline.target_spacing_of(a)


class _Volume:
  """The three fields the samplers read of a prepared case."""

  def __init__(self, image, label):
    self.image, self.label = image, label

  @property
  def num_slices(self):
    return self.image.shape[-1]


def _two_class_case(slices=100, rare=5):
  """Class 1 (a large organ) in every slice, class 2 (a small one) only in the first `rare`."""
  label = np.zeros((8, 8, slices), np.uint8)
  label[1:6, 1:6, :] = 1
  label[6:8, 6:8, :rare] = 2
  return _Volume(np.zeros(label.shape, np.float32), label)


def test_class_balanced_sampling_draws_a_rare_class_as_often_as_a_common_one():
  case = _two_class_case()
  balanced = pipeline.SliceSampler([case], 64, 1.0, 0, seed=0, stream=0, oversample="class")
  plain = pipeline.SliceSampler([case], 64, 1.0, 0, seed=0, stream=0)
  np.testing.assert_array_equal(balanced.class_slices[2], [[0, z] for z in range(5)])
  assert len(balanced.class_slices[1]) == 100

  def rare_share(sampler):
    idx = np.concatenate([sampler.indices(s) for s in range(20)])     # 1280 draws
    return np.mean(idx[:, 1] < 5)

  # 'class': half the draws pick class 2 (plus the 5 % of class-1 draws that land there);
  # 'foreground': 5 % of the slices hold it.
  assert 0.45 < rare_share(balanced) < 0.60
  assert rare_share(plain) < 0.10
  # Still a pure function of the step, and the uniform share untouched by the mode.
  np.testing.assert_array_equal(balanced.indices(3), balanced.indices(3))
  uniform_b = pipeline.SliceSampler([case], 64, 0.0, 0, seed=0, stream=0, oversample="class")
  uniform_p = pipeline.SliceSampler([case], 64, 0.0, 0, seed=0, stream=0)
  np.testing.assert_array_equal(uniform_b.indices(7), uniform_p.indices(7))


def test_class_balanced_patches_centre_on_the_rare_class_half_the_time():
  from unpaired_seg.data import patches
  case = _two_class_case(slices=40, rare=2)
  sampler = patches.PatchSampler([case], 64, (4, 4, 2), 1.0, seed=0, stream=0, oversample="class")
  plain = patches.PatchSampler([case], 64, (4, 4, 2), 1.0, seed=0, stream=0)
  share = lambda s: np.mean([(s.batch(k)["label"] == 2).reshape(64, -1).any(1).mean()
                             for k in range(5)])
  assert share(sampler) > 0.45
  assert share(plain) < 0.15


def test_an_unknown_oversampling_mode_names_the_config_key():
  with pytest.raises(ValueError, match="data.oversample"):
    pipeline.SliceSampler([_two_class_case()], 4, 0.5, 0, seed=0, stream=0, oversample="organ")


def _volume(case, image, label):
  return ds.Volume("ct", case, case, image.astype(np.float32), label.astype(np.uint8), np.eye(4))


def test_foreground_zscore_clips_to_the_training_foregrounds_percentiles(tmp_path):
  r = np.random.default_rng(0)
  train = []
  for i in range(2):
    label = np.zeros((10, 10, 4), np.uint8)
    label[2:8, 2:8] = 1
    image = np.where(label > 0, 100 + 10 * r.standard_normal(label.shape), -1000)
    train.append(_volume(f"c{i}", image, label))
  spec = pipeline.parse_scheme("foreground_zscore", where="test")
  fitted = pipeline.fit_normalization(spec, train)
  # Independent reference: numpy over the labelled voxels only (the -1000 background is ignored).
  fg = np.concatenate([v.image[v.label > 0].astype(np.float64) for v in train])
  lo, hi = np.percentile(fg, [0.5, 99.5])
  clipped = np.clip(fg, lo, hi)
  np.testing.assert_allclose(fitted["window"], [lo, hi])
  np.testing.assert_allclose([fitted["mean"], fitted["std"]], [clipped.mean(), clipped.std()])
  out = pipeline.normalize_intensity(train[0].image, fitted)
  expected = (np.clip(train[0].image, lo, hi) - clipped.mean()) / clipped.std()
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  # Saved and reused, although the fitted window is not the configured one (there is none).
  path = tmp_path / "normalization.json"
  first = pipeline.load_or_fit_normalization(path, {"ct": spec}, {"ct": train})["ct"]
  assert pipeline.load_or_fit_normalization(path, {"ct": spec}, {"ct": train})["ct"] == first
  with pytest.raises(pipeline.NormalizationError, match="other training cases"):
    pipeline.load_or_fit_normalization(path, {"ct": spec}, {"ct": train[:1]})
