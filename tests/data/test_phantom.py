"""Tests of the embedded phantom dataset.

  python -m pytest -q tests/data/test_phantom.py
"""

import itertools

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from unpaired_seg.data import dataset
from unpaired_seg.data import phantom

SHAPE = (32, 32, 12)
SUBJECTS = 4
ORGANS = {1: "liver", 2: "right_kidney", 3: "left_kidney", 4: "spleen"}


@pytest.fixture(scope="module")
def unpaired(tmp_path_factory):
  root = tmp_path_factory.mktemp("phantom") / "unpaired"
  return phantom.generate(root, mode="unpaired", num_subjects=SUBJECTS, shape=SHAPE, seed=3)


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
  root = tmp_path_factory.mktemp("phantom") / "paired"
  return phantom.generate(root, mode="paired", num_subjects=SUBJECTS, shape=SHAPE, seed=3)


@pytest.fixture(scope="module")
def volumes(unpaired, paired):
  return {(mode, m): dataset.load_modality(manifest, m)
          for mode, manifest in (("unpaired", unpaired), ("paired", paired))
          for m in ("mr", "ct")}


def _stored(manifest, modality, folder, case):
  return nib.load(str(manifest.root / modality / folder / f"{case}.nii.gz"))


def _all_arrays(manifest):
  """Every stored array of a dataset, as (relative path, array) in a fixed order."""
  return [(str(p.relative_to(manifest.root)), np.asarray(nib.load(str(p)).dataobj))
          for p in sorted(manifest.root.rglob("*.nii.gz"))]


def _dice(a, b):
  return 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_manifest(unpaired, paired):
  for manifest, mode in ((unpaired, "unpaired"), (paired, "paired")):
    assert manifest.labels == ("background", "liver", "right_kidney", "left_kidney", "spleen")
    assert manifest.paired == (mode == "paired")
    assert list(manifest.modalities) == ["mr", "ct"]
    mr, ct = manifest.modalities["mr"], manifest.modalities["ct"]
    assert mr.normalization == {"scheme": "zscore"}
    assert ct.normalization == {"scheme": "clip_zscore", "window": [-200.0, 300.0]}
    assert mr.label_map == {0: 0, 1: 1, 2: 2, 3: 3, 4: 4} and mr.unmapped == "error"
    assert ct.label_map == {0: 0, 6: 1, 2: 2, 3: 3, 1: 4} and ct.unmapped == "background"
    assert manifest.phantom == {"generator_version": phantom.GENERATOR_VERSION, "mode": mode,
                                "num_subjects": SUBJECTS, "shape": list(SHAPE), "seed": 3,
                                "modalities": ["mr", "ct"]}
    for m in ("mr", "ct"):
      assert dataset.list_cases(manifest, m) == [f"case_{i:03d}" for i in range(SUBJECTS)]
  # Nothing but the dataset is left beside it (the temporary folder was renamed into place).
  assert [p.name for p in unpaired.root.parent.iterdir()] == ["unpaired"]


def test_unpaired_subjects_are_disjoint_and_paired_shared(unpaired, paired):
  cases = [f"case_{i:03d}" for i in range(SUBJECTS)]
  subjects = {m: [unpaired.subject_of(m, c) for c in cases] for m in ("mr", "ct")}
  assert subjects["mr"] == [f"mr_s{i:03d}" for i in range(SUBJECTS)]
  assert subjects["ct"] == [f"ct_s{i:03d}" for i in range(SUBJECTS)]
  assert not set(subjects["mr"]) & set(subjects["ct"])
  for c in cases:
    assert paired.subject_of("mr", c) == paired.subject_of("ct", c) == f"s{int(c[-3:]):03d}"


def test_storage_types_geometry_and_ranges(paired, volumes):
  for case in dataset.list_cases(paired, "mr"):
    images = {m: _stored(paired, m, "imagesTr", case) for m in ("mr", "ct")}
    labels = {m: _stored(paired, m, "labelsTr", case) for m in ("mr", "ct")}
    for m in ("mr", "ct"):
      assert images[m].get_data_dtype() == np.int16
      assert labels[m].get_data_dtype() == np.uint8
      assert images[m].shape == SHAPE
      np.testing.assert_array_equal(images[m].affine, labels[m].affine)
      # RAS canonical, both modalities on one grid.
      assert nib.aff2axcodes(images[m].affine) == ("R", "A", "S")
      np.testing.assert_array_equal(images[m].affine, images["mr"].affine)
      np.testing.assert_allclose(np.diag(images[m].affine), phantom.SPACING + (1.0,))
  for mode in ("unpaired", "paired"):
    mr = np.stack([v.image for v in volumes[(mode, "mr")]])
    ct = np.stack([v.image for v in volumes[(mode, "ct")]])
    assert mr.min() >= 0 and 600 < mr.max() < 1400
    assert ct.min() >= -1024 and ct.min() < -900 and 300 < ct.max() < 1100
    for v in volumes[(mode, "ct")]:
      organ_means = [v.image[v.label == k].mean() for k in ORGANS]
      assert all(-200 < mean < 300 for mean in organ_means)  # Inside the CT window.
      assert v.spacing == phantom.SPACING


def test_every_organ_in_every_volume_over_several_slices_not_on_end_slices(volumes):
  for (mode, m), vols in volumes.items():
    for v in vols:
      assert v.label.dtype == np.uint8 and v.label.shape == SHAPE
      assert set(np.unique(v.label)) == {0, 1, 2, 3, 4}, (mode, m, v.case)
      for k in ORGANS:
        slices = np.count_nonzero((v.label == k).any(axis=(0, 1)))
        assert slices >= 3, (mode, m, v.case, ORGANS[k])
      occupied = np.count_nonzero((v.label > 0).any(axis=(0, 1)))
      assert occupied < SHAPE[2] - 1
      assert not v.label[:, :, 0].any() and not v.label[:, :, -1].any()


def test_ct_raw_labels_use_btcv_values_with_an_unmapped_stomach(unpaired, volumes):
  for v in volumes[("unpaired", "ct")]:
    raw = np.asarray(_stored(unpaired, "ct", "labelsTr", v.case).dataobj)
    assert set(np.unique(raw)) == {0, 1, 2, 3, 6, 7}
    for raw_value, shared in ((6, 1), (2, 2), (3, 3), (1, 4), (7, 0)):
      np.testing.assert_array_equal(v.label[raw == raw_value], shared)
  for v in volumes[("unpaired", "mr")]:
    raw = np.asarray(_stored(unpaired, "mr", "labelsTr", v.case).dataobj)
    np.testing.assert_array_equal(raw, v.label)  # MR raw labels are the shared ones.


def test_organs_sit_where_the_anatomy_puts_them(volumes):
  """RAS: liver on the subject's right (+x), spleen on the left, kidneys posterior (-y)."""
  for vols in volumes.values():
    for v in vols:
      centre = {k: np.array(ndimage.center_of_mass(v.label == k)) for k in ORGANS}
      middle = (np.array(SHAPE) - 1) / 2
      assert centre[1][0] > middle[0] > centre[4][0]
      assert centre[2][0] > middle[0] > centre[3][0]
      assert centre[2][1] < middle[1] and centre[3][1] < middle[1]
      assert np.count_nonzero(v.label == 1) > max(np.count_nonzero(v.label == k) for k in (2, 3, 4))


def test_modalities_relate_intensities_non_monotonically(volumes):
  for mode in ("unpaired", "paired"):
    means = {}
    for m in ("mr", "ct"):
      means[m] = np.mean([[v.image[v.label == k].mean() for k in ORGANS]
                          for v in volumes[(mode, m)]], axis=0)
      # Distinguishable: organs of different tissue differ by well more than the noise of a
      # mean (the two kidneys are one tissue, told apart by side only).
      gaps = [abs(means[m][a] - means[m][b]) for a, b in itertools.combinations(range(4), 2)
              if (a, b) != (1, 2)]
      assert min(gaps) > (20 if m == "mr" else 15), (m, means[m])
    swapped = [(a, b) for a, b in itertools.combinations(range(4), 2)
               if (means["mr"][a] - means["mr"][b]) * (means["ct"][a] - means["ct"][b]) < 0]
    assert swapped, means
    # The designed swap: spleen above kidneys in MR, below them in CT.
    liver, right_kidney, _, spleen = range(4)
    assert means["mr"][spleen] > means["mr"][right_kidney]
    assert means["ct"][spleen] < means["ct"][right_kidney]
    assert means["mr"][liver] < means["mr"][spleen] and means["ct"][liver] < means["ct"][spleen]


def test_tissue_contrasts_swap_between_modalities():
  """The appearance model alone: fat brighter than liver in MR, darker in CT (and kidney/spleen)."""
  shape = (24, 24, 10)
  tissues = (phantom.FAT, phantom.LIVER, phantom.SPLEEN, phantom.KIDNEY_R)
  tissue = np.zeros(shape, np.int8)
  for i, t in enumerate(tissues):
    tissue[6 * i:6 * i + 6] = t  # Four slabs along x.
  points = phantom._grid_points(shape)
  medians = {}
  for m in ("mr", "ct"):
    image = phantom._render(tissue, points, m, np.random.default_rng(0))
    assert image.dtype == np.int16 and image.shape == shape
    # Slab centres only: partial-volume blur mixes the borders.
    medians[m] = {t: np.median(image[6 * i + 2:6 * i + 4]) for i, t in enumerate(tissues)}
  assert medians["mr"][phantom.FAT] > medians["mr"][phantom.LIVER]
  assert medians["ct"][phantom.FAT] < medians["ct"][phantom.LIVER]
  assert medians["mr"][phantom.SPLEEN] > medians["mr"][phantom.KIDNEY_R]
  assert medians["ct"][phantom.SPLEEN] < medians["ct"][phantom.KIDNEY_R]


def test_paired_modalities_differ_by_a_small_deformation(volumes):
  mr, ct = volumes[("paired", "mr")], volumes[("paired", "ct")]
  for a, b in zip(mr, ct):
    assert a.subject == b.subject and a.case == b.case
    foreground = _dice(a.label > 0, b.label > 0)
    assert 0.6 < foreground < 1.0, (a.case, foreground)
    assert _dice(a.label == 1, b.label == 1) > 0.6
    for k in ORGANS:
      shift = np.array(ndimage.center_of_mass(a.label == k)) \
          - np.array(ndimage.center_of_mass(b.label == k))
      # In-plane a few voxels at most; through-plane about the -1..+1 slice offset.
      assert np.all(np.abs(shift[:2]) < 3.0) and abs(shift[2]) < 1.8, (a.case, k, shift)
  # Unpaired subjects are different people: far lower overlap on average.
  unpaired = np.mean([_dice(a.label > 0, b.label > 0)
                      for a, b in zip(volumes[("unpaired", "mr")], volumes[("unpaired", "ct")])])
  paired = np.mean([_dice(a.label > 0, b.label > 0) for a, b in zip(mr, ct)])
  assert paired > unpaired


def _centroid_shifts(mr, ct):
  """In-plane |MR - CT| organ centroid shifts (voxels) of every paired case and organ."""
  return np.array([np.abs(np.array(ndimage.center_of_mass(a.label == k))[:2]
                          - np.array(ndimage.center_of_mass(b.label == k))[:2])
                   for a, b in zip(mr, ct) for k in ORGANS])


def test_pair_misalignment_scales_only_the_in_plane_deformation(tmp_path, paired, volumes):
  kwargs = dict(mode="paired", num_subjects=SUBJECTS, shape=SHAPE, seed=3)
  default = phantom.generate(tmp_path / "one", pair_misalignment=1.0, **kwargs)
  # 1 is the phantom as it always was: same settings block, byte-identical files.
  assert default.phantom == paired.phantom and "pair_misalignment" not in default.phantom
  for (path, a), (_, b) in zip(_all_arrays(paired), _all_arrays(default)):
    assert a.tobytes() == b.tobytes(), path
  shifts = {1.0: _centroid_shifts(volumes[("paired", "mr")], volumes[("paired", "ct")])}
  overlap = {1.0: np.mean([_dice(a.label > 0, b.label > 0) for a, b in
                           zip(volumes[("paired", "mr")], volumes[("paired", "ct")])])}
  for scale in (0.0, 3.0):
    manifest = phantom.generate(tmp_path / f"m{scale}", pair_misalignment=scale, **kwargs)
    assert manifest.phantom["pair_misalignment"] == scale
    mr, ct = dataset.load_modality(manifest, "mr"), dataset.load_modality(manifest, "ct")
    # The reference modality and the anatomy do not change, only where the CT samples it.
    for a, b in zip(volumes[("paired", "mr")], mr):
      assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label)
    shifts[scale] = _centroid_shifts(mr, ct)
    overlap[scale] = np.mean([_dice(a.label > 0, b.label > 0) for a, b in zip(mr, ct)])
  assert shifts[0.0].max() < 0.6  # no in-plane deformation left: centroids within rounding
  assert shifts[0.0].mean() < shifts[1.0].mean() < shifts[3.0].mean()
  assert 2.0 < shifts[3.0].mean() / shifts[1.0].mean() < 4.0
  assert overlap[0.0] > overlap[1.0] > overlap[3.0]
  with pytest.raises(dataset.DatasetError, match="'pair_misalignment': 3.0"):
    phantom.ensure(tmp_path / "one", pair_misalignment=3.0, **kwargs)
  with pytest.raises(ValueError, match="argument 'pair_misalignment' only applies"):
    phantom.generate(tmp_path / "u", mode="unpaired", pair_misalignment=2.0)


def test_deterministic_per_seed(tmp_path, unpaired):
  again = phantom.generate(tmp_path / "again", mode="unpaired", num_subjects=SUBJECTS,
                           shape=SHAPE, seed=3)
  first, second = _all_arrays(unpaired), _all_arrays(again)
  assert [p for p, _ in first] == [p for p, _ in second] and len(first) == 4 * SUBJECTS
  for (path, a), (_, b) in zip(first, second):
    assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), path
  other = _all_arrays(phantom.generate(tmp_path / "other", mode="unpaired",
                                       num_subjects=SUBJECTS, shape=SHAPE, seed=4))
  for (path, a), (_, b) in zip(first, other):
    assert not np.array_equal(a, b), path


def test_larger_shape_and_single_modality(tmp_path):
  manifest = phantom.generate(tmp_path / "big", mode="paired", num_subjects=1,
                              shape=(96, 96, 32), seed=0, modalities=("ct",))
  assert list(manifest.modalities) == ["ct"]
  volume = dataset.load_volume(manifest, "ct", "case_000")
  assert volume.image.shape == (96, 96, 32)
  assert set(np.unique(volume.label)) == {0, 1, 2, 3, 4}


def test_ensure_generates_once_then_only_loads(tmp_path):
  root = tmp_path / "ph"
  kwargs = dict(mode="paired", num_subjects=2, shape=SHAPE, seed=5)
  first = phantom.ensure(root, **kwargs)
  before = sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))
  second = phantom.ensure(root, **kwargs)
  assert second == first
  assert sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*")) == before

  with pytest.raises(dataset.DatasetError) as info:
    phantom.ensure(root, **{**kwargs, "seed": 6})
  message = str(info.value)
  assert str(root / "dataset.json") in message
  assert "'seed': 5" in message and "'seed': 6" in message
  with pytest.raises(dataset.DatasetError, match="'mode': 'unpaired'"):
    phantom.ensure(root, **{**kwargs, "mode": "unpaired"})
  assert sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*")) == before


def test_ensure_refuses_a_dataset_that_is_not_a_phantom(tmp_path, unpaired):
  obj = unpaired.to_dict()
  del obj["phantom"]
  root = tmp_path / "real"
  dataset.write_manifest(root, obj)
  for m in ("mr", "ct"):
    (root / m / "imagesTr").mkdir(parents=True)
  with pytest.raises(dataset.DatasetError, match="not a phantom"):
    phantom.ensure(root)


def test_generate_refuses_a_non_empty_folder(tmp_path):
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("keep me")
  with pytest.raises(dataset.DatasetError, match="busy"):
    phantom.generate(tmp_path / "busy", num_subjects=1, shape=SHAPE)
  assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
  # An existing empty folder is fine.
  (tmp_path / "empty").mkdir()
  phantom.generate(tmp_path / "empty", num_subjects=1, shape=SHAPE)
  assert (tmp_path / "empty" / "dataset.json").is_file()


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
  calls = []
  save = dataset.save_nifti

  def crash_on_fifth(*args):
    calls.append(args[0])
    if len(calls) == 5:
      raise KeyboardInterrupt
    save(*args)

  monkeypatch.setattr(dataset, "save_nifti", crash_on_fifth)
  with pytest.raises(KeyboardInterrupt):
    phantom.generate(tmp_path / "ph", num_subjects=3, shape=SHAPE)
  assert len(calls) == 5
  assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kwargs, argument", [
    (dict(mode="semi"), "mode"),
    (dict(num_subjects=0), "num_subjects"),
    (dict(num_subjects=True), "num_subjects"),
    (dict(seed=-1), "seed"),
    (dict(shape=(32, 32)), "shape"),
    (dict(shape=(16, 32, 12)), "shape"),
    (dict(shape=(32, 32, 8)), "shape"),
    (dict(modalities="mr"), "modalities"),
    (dict(modalities=("mr", "pet")), "modalities"),
    (dict(modalities=("mr", "mr")), "modalities"),
    (dict(modalities=()), "modalities"),
    (dict(mode="paired", pair_misalignment=-1.0), "pair_misalignment"),
    (dict(mode="paired", pair_misalignment=5.0), "pair_misalignment"),
    (dict(mode="paired", pair_misalignment="2"), "pair_misalignment"),
])
def test_bad_arguments(tmp_path, kwargs, argument):
  for function in (phantom.generate, phantom.ensure):
    with pytest.raises(ValueError, match=f"argument '{argument}'"):
      function(tmp_path / "ph", **kwargs)
  assert list(tmp_path.iterdir()) == []
