"""Tests of the dataset layer: manifest, volumes, label mapping, NIfTI writing.

  python -m pytest -q tests/data/test_dataset.py
"""

import copy
import dataclasses
import json
import os
import pathlib

import nibabel as nib
import numpy as np
import pytest

from unpaired_seg.data import dataset

SHAPE = (6, 5, 4)
AFFINE = np.array([[1.5, 0., 0., -4.],
                   [0., 1.5, 0., -3.],
                   [0., 0., 4., 7.],
                   [0., 0., 0., 1.]])
MANIFEST = {
    "name": "tiny",
    "description": "two modalities, two cases each",
    "labels": ["background", "liver", "right_kidney", "left_kidney", "spleen"],
    "paired": False,
    "file_ending": ".nii.gz",
    "modalities": {
        "mr": {"label_map": {"0": 0, "1": 1, "2": 2, "3": 3, "4": 4},
               "normalization": {"scheme": "zscore"},
               "subjects": {"case_000": "s000"}},
        "ct": {"label_map": {"0": 0, "6": 1, "2": 2, "3": 3, "1": 4},
               "normalization": {"scheme": "clip_zscore", "window": [-200, 300]},
               "unmapped": "background"},
    },
}
# Raw CT values: BTCV numbering, 7 (stomach) is not in the label_map.
CT_RAW_VALUES = (0, 6, 2, 3, 1, 7)
CT_SHARED = {0: 0, 6: 1, 2: 2, 3: 3, 1: 4, 7: 0}


def _raw_labels(values, seed):
  rng = np.random.default_rng(seed)
  raw = rng.choice(np.array(values, np.uint8), size=SHAPE)
  raw.flat[:len(values)] = values  # Every value present at least once.
  return raw


def _build(root: pathlib.Path, manifest=None) -> pathlib.Path:
  """A small valid dataset: 2 MR and 2 CT cases."""
  dataset.write_manifest(root, MANIFEST if manifest is None else manifest)
  rng = np.random.default_rng(0)
  for modality, values in (("mr", (0, 1, 2, 3, 4)), ("ct", CT_RAW_VALUES)):
    for i, case in enumerate(("case_000", "case_001")):
      image = rng.integers(-100, 900, SHAPE).astype(np.int16)
      dataset.save_nifti(root / modality / "imagesTr" / f"{case}.nii.gz", image, AFFINE)
      dataset.save_nifti(root / modality / "labelsTr" / f"{case}.nii.gz",
                         _raw_labels(values, 10 * i + len(modality)), AFFINE)
  return root


def _snapshot(root: pathlib.Path):
  """Every path under root with its size and modification time."""
  return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                for p in root.rglob("*"))


@pytest.fixture
def root(tmp_path):
  return _build(tmp_path / "ds")


def _manifest_with(change):
  manifest = copy.deepcopy(MANIFEST)
  change(manifest)
  return manifest


def _write_raw_manifest(root: pathlib.Path, obj) -> None:
  """Writes a manifest without validation, as a user editing the file by hand would."""
  (root / "dataset.json").write_text(json.dumps(obj))


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


def test_manifest_round_trip(root):
  manifest = dataset.load_manifest(root)
  assert manifest.root == root
  assert manifest.name == "tiny"
  assert manifest.labels == tuple(MANIFEST["labels"])
  assert manifest.num_classes == 5
  assert manifest.paired is False
  assert manifest.file_ending == ".nii.gz"
  assert list(manifest.modalities) == ["mr", "ct"]
  ct = manifest.modalities["ct"]
  assert ct.label_map == {0: 0, 6: 1, 2: 2, 3: 3, 1: 4}
  assert ct.normalization == {"scheme": "clip_zscore", "window": [-200.0, 300.0]}
  assert ct.unmapped == "background"
  assert ct.subjects == {}
  mr = manifest.modalities["mr"]
  assert mr.unmapped == "error"  # The default.
  assert mr.subjects == {"case_000": "s000"}
  assert manifest.phantom is None
  assert mr.source_axis_flips == () and ct.source_axis_flips == ()    # key absent: none

  # Writing the loaded manifest back reproduces it exactly, file bytes included.
  before = (root / "dataset.json").read_bytes()
  dataset.write_manifest(root, manifest.to_dict())
  assert (root / "dataset.json").read_bytes() == before
  assert dataset.load_manifest(root) == manifest
  assert [p.name for p in root.iterdir() if p.name.startswith(".")] == []


def test_subject_of(root):
  manifest = dataset.load_manifest(root)
  assert manifest.subject_of("mr", "case_000") == "s000"
  assert manifest.subject_of("mr", "case_001") == "case_001"  # Not listed: its own subject.
  assert manifest.subject_of("ct", "case_000") == "case_000"
  with pytest.raises(dataset.DatasetError, match="modalities.us"):
    manifest.subject_of("us", "case_000")


@pytest.mark.parametrize("change, key", [
    (lambda m: m["modalities"]["ct"]["normalization"].pop("scheme"),
     "modalities.ct.normalization.scheme"),
    (lambda m: m["modalities"]["ct"]["normalization"].update(scheme="histogram"),
     "modalities.ct.normalization.scheme"),
    (lambda m: m["modalities"]["ct"]["normalization"].pop("window"),
     "modalities.ct.normalization.window"),
    (lambda m: m["modalities"]["ct"]["normalization"].update(window=[300, -200]),
     "modalities.ct.normalization.window"),
    (lambda m: m["modalities"]["mr"]["normalization"].update(window=[0, 1]),
     "modalities.mr.normalization.window"),
    (lambda m: m["modalities"]["mr"].update(normalization="zscore"),
     "modalities.mr.normalization"),
    (lambda m: m["modalities"]["ct"]["label_map"].update({"6": 5}), "modalities.ct.label_map.6"),
    (lambda m: m["modalities"]["ct"]["label_map"].update({"6": -1}), "modalities.ct.label_map.6"),
    (lambda m: m["modalities"]["ct"]["label_map"].update({"six": 1}),
     "modalities.ct.label_map.six"),
    (lambda m: m["modalities"]["ct"]["label_map"].update({"06": 1}), "modalities.ct.label_map.06"),
    (lambda m: m["modalities"]["ct"].update(unmapped="ignore"), "modalities.ct.unmapped"),
    (lambda m: m["modalities"]["ct"].update(source_axis_flips=[3]),
     "modalities.ct.source_axis_flips"),
    (lambda m: m["modalities"]["ct"].update(source_axis_flips=[1, 1]),
     "modalities.ct.source_axis_flips"),
    (lambda m: m["modalities"]["ct"].update(source_axis_flips=1),
     "modalities.ct.source_axis_flips"),
    (lambda m: m["modalities"]["ct"].update(labelmap={}), "modalities.ct.labelmap"),
    (lambda m: m["modalities"]["ct"].pop("label_map"), "modalities.ct.label_map"),
    (lambda m: m["modalities"]["mr"].update(subjects={"case_000": 3}), "modalities.mr.subjects"),
    (lambda m: m["modalities"].update({"../up": m["modalities"]["mr"]}), "modalities.../up"),
    (lambda m: m.update(modalities={}), "'modalities'"),
    (lambda m: m.pop("labels"), "'labels'"),
    (lambda m: m.update(labels=["background"]), "'labels'"),
    (lambda m: m.update(labels=["background", "liver", "liver"]), "'labels'"),
    (lambda m: m.update(paired="no"), "'paired'"),
    (lambda m: m.update(file_ending=".mha"), "'file_ending'"),
    (lambda m: m.update(lables=[]), "'lables'"),
    (lambda m: m.pop("name"), "'name'"),
])
def test_bad_manifest_names_file_and_key(root, change, key):
  _write_raw_manifest(root, _manifest_with(change))
  before = _snapshot(root)
  with pytest.raises(dataset.DatasetError) as info:
    dataset.load_manifest(root)
  assert key in str(info.value)
  assert str(root / "dataset.json") in str(info.value)
  assert _snapshot(root) == before


def test_write_manifest_rejects_bad_manifest_and_writes_nothing(tmp_path):
  bad = _manifest_with(lambda m: m["modalities"]["ct"]["normalization"].pop("scheme"))
  with pytest.raises(dataset.DatasetError, match="modalities.ct.normalization.scheme"):
    dataset.write_manifest(tmp_path, bad)
  assert list(tmp_path.iterdir()) == []


def test_missing_manifest(tmp_path):
  with pytest.raises(dataset.DatasetError, match="dataset.json") as info:
    dataset.load_manifest(tmp_path)
  assert str(tmp_path / "dataset.json") in str(info.value)
  with pytest.raises(dataset.DatasetError, match="not found"):
    dataset.load_manifest(tmp_path / "absent")


def test_malformed_json(root):
  (root / "dataset.json").write_text('{"name": "tiny",\n "labels": [}')
  before = _snapshot(root)
  with pytest.raises(dataset.DatasetError, match="malformed JSON at line 2") as info:
    dataset.load_manifest(root)
  assert str(root / "dataset.json") in str(info.value)
  assert _snapshot(root) == before


def test_duplicate_json_key(root):
  text = json.dumps(MANIFEST).replace('"name": "tiny"', '"name": "tiny", "name": "other"')
  (root / "dataset.json").write_text(text)
  with pytest.raises(dataset.DatasetError, match="duplicate JSON key 'name'"):
    dataset.load_manifest(root)


@pytest.mark.parametrize("remove", ["ct", "ct/imagesTr"])
def test_missing_modality_folders(root, remove):
  for p in sorted((root / remove).rglob("*"), reverse=True):
    p.unlink() if p.is_file() else p.rmdir()
  (root / remove).rmdir()
  before = _snapshot(root)
  with pytest.raises(dataset.DatasetError) as info:
    dataset.load_manifest(root)
  assert str(root / remove) in str(info.value)
  assert _snapshot(root) == before


# ---------------------------------------------------------------------------------------------
# Cases and volumes
# ---------------------------------------------------------------------------------------------


def test_list_cases_sorted_and_ignores_other_files(root):
  images = root / "mr" / "imagesTr"
  dataset.save_nifti(images / "a_first.nii.gz", np.zeros(SHAPE, np.int16), AFFINE)
  (images / ".case_009.nii.gz").write_bytes(b"")  # A hidden (temporary) file is not a case.
  (images / "notes.txt").write_text("x")
  manifest = dataset.load_manifest(root)
  assert dataset.list_cases(manifest, "mr") == ["a_first", "case_000", "case_001"]
  assert dataset.list_cases(manifest, "ct") == ["case_000", "case_001"]
  with pytest.raises(dataset.DatasetError, match="modalities.us"):
    dataset.list_cases(manifest, "us")


def test_load_volume_reads_image_affine_and_shared_labels(root):
  manifest = dataset.load_manifest(root)
  before = _snapshot(root)
  volume = dataset.load_volume(manifest, "ct", "case_001")
  stored = nib.load(str(root / "ct" / "imagesTr" / "case_001.nii.gz"))
  raw = np.asarray(nib.load(str(root / "ct" / "labelsTr" / "case_001.nii.gz")).dataobj)
  assert volume.modality == "ct" and volume.case == "case_001" and volume.subject == "case_001"
  assert volume.image.dtype == np.float32 and volume.image.shape == SHAPE
  np.testing.assert_array_equal(volume.image, np.asarray(stored.dataobj).astype(np.float32))
  assert volume.affine.dtype == np.float64
  np.testing.assert_allclose(volume.affine, AFFINE)
  assert volume.spacing == (1.5, 1.5, 4.0)
  # Independent reference: a voxel-by-voxel dictionary lookup.
  expected = np.zeros(SHAPE, np.uint8)
  for index in np.ndindex(*SHAPE):
    expected[index] = CT_SHARED[int(raw[index])]
  assert volume.label.dtype == np.uint8
  np.testing.assert_array_equal(volume.label, expected)
  assert (raw == 6).any() and (raw == 7).any()
  np.testing.assert_array_equal(volume.label[raw == 6], 1)
  np.testing.assert_array_equal(volume.label[raw == 7], 0)
  assert _snapshot(root) == before


def test_load_modality_in_case_order_with_subjects(root):
  manifest = dataset.load_manifest(root)
  volumes = dataset.load_modality(manifest, "mr")
  assert [(v.case, v.subject) for v in volumes] == [("case_000", "s000"), ("case_001", "case_001")]
  assert all(set(np.unique(v.label)) <= {0, 1, 2, 3, 4} for v in volumes)


def test_spacing_from_rotated_affine():
  # Columns: a rotation about z by 30 degrees scaled by (0.8, 1.2, 3.0).
  c, s = np.cos(np.pi / 6), np.sin(np.pi / 6)
  affine = np.eye(4)
  affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) * np.array([0.8, 1.2, 3.0])
  volume = dataset.Volume("mr", "a", "a", np.zeros(SHAPE, np.float32), None, affine)
  np.testing.assert_allclose(volume.spacing, (0.8, 1.2, 3.0))


def test_unmapped_label_value_is_an_error_without_background_policy(root):
  manifest_obj = _manifest_with(lambda m: m["modalities"]["ct"].pop("unmapped"))
  _write_raw_manifest(root, manifest_obj)
  manifest = dataset.load_manifest(root)
  before = _snapshot(root)
  label_path = root / "ct" / "labelsTr" / "case_000.nii.gz"
  with pytest.raises(dataset.DatasetError, match=r"label value\(s\) 7 ") as info:
    dataset.load_volume(manifest, "ct", "case_000")
  assert str(label_path) in str(info.value)
  assert "modalities.ct.label_map" in str(info.value)
  assert _snapshot(root) == before


def test_map_labels_lookup_and_fallback_paths_agree_with_a_loop():
  spec = dataset.ModalitySpec(name="ct", label_map={0: 0, 6: 1, 9: 4, 70000: 2, -3: 3},
                              normalization={"scheme": "none"}, subjects={}, unmapped="background")
  rng = np.random.default_rng(1)
  for values in ((0, 6, 7, 1, 9), (0, 6, 9, 70000, -3, 5)):  # Lookup table, then np.unique.
    raw = rng.choice(np.array(values, np.int32), size=(7, 3, 2))
    expected = np.array([spec.label_map.get(int(v), 0) for v in raw.ravel()]).reshape(raw.shape)
    got = dataset.map_labels(raw, spec, "x.nii.gz")
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, expected)
  strict = dataclasses.replace(spec, unmapped="error")
  with pytest.raises(dataset.DatasetError, match=r"x.nii.gz: label value\(s\) -5, 5 "):
    dataset.map_labels(np.array([[0, 5], [-5, 6]]), strict, "x.nii.gz")
  # Integral floats are labels too; fractions are not.
  np.testing.assert_array_equal(dataset.map_labels(np.array([6.0, 0.0]), strict, "f"), [1, 0])
  with pytest.raises(dataset.DatasetError, match="f.nii: label values must be integers"):
    dataset.map_labels(np.array([6.5]), strict, "f.nii")


def test_missing_label_file(root):
  (root / "mr" / "labelsTr" / "case_001.nii.gz").unlink()
  manifest = dataset.load_manifest(root)
  before = _snapshot(root)
  with pytest.raises(dataset.DatasetError) as info:
    dataset.load_volume(manifest, "mr", "case_001")
  assert str(root / "mr" / "labelsTr" / "case_001.nii.gz") in str(info.value)
  volume = dataset.load_volume(manifest, "mr", "case_001", require_label=False)
  assert volume.label is None and volume.image.shape == SHAPE
  assert [v.label is None for v in dataset.load_modality(manifest, "mr", require_label=False)] \
      == [False, True]
  assert _snapshot(root) == before


def test_missing_image(root):
  manifest = dataset.load_manifest(root)
  with pytest.raises(dataset.DatasetError) as info:
    dataset.load_volume(manifest, "mr", "case_404")
  assert str(root / "mr" / "imagesTr" / "case_404.nii.gz") in str(info.value)


def _replace_image(root, modality, case, array, affine=AFFINE, folder="imagesTr"):
  dataset.save_nifti(root / modality / folder / f"{case}.nii.gz", array, affine)


@pytest.mark.parametrize("breakage, folder, match", [
    (lambda r: _replace_image(r, "mr", "case_000", np.zeros((6, 5, 3), np.uint8),
                              folder="labelsTr"), "labelsTr", "label shape"),
    (lambda r: _replace_image(r, "mr", "case_000", np.zeros(SHAPE, np.uint8),
                              AFFINE + np.diag([0, 0, 1e-3, 0]), folder="labelsTr"),
     "labelsTr", "label affine differs"),
    (lambda r: _replace_image(r, "mr", "case_000", np.full(SHAPE, np.nan, np.float32)),
     "imagesTr", "NaN or inf"),
    (lambda r: _replace_image(r, "mr", "case_000",
                              np.where(np.eye(6, 5)[:, :, None] > 0, np.inf, 1.0)
                              * np.ones(SHAPE, np.float32)),
     "imagesTr", "NaN or inf"),
    (lambda r: _replace_image(r, "mr", "case_000", np.zeros(SHAPE + (2,), np.float32)),
     "imagesTr", "expected a 3D volume"),
    (lambda r: _replace_image(r, "mr", "case_000", np.zeros((6, 5, 1, 1, 2), np.int16)),
     "imagesTr", "expected a 3D volume"),
    (lambda r: (r / "mr" / "imagesTr" / "case_000.nii.gz").write_bytes(b"\x1f\x8b broken"),
     "imagesTr", "cannot read NIfTI"),
    (lambda r: _replace_image(r, "mr", "case_000", np.full(SHAPE, 9, np.uint8),
                              folder="labelsTr"), "labelsTr", r"label value\(s\) 9 "),
])
def test_broken_case_names_the_file_and_writes_nothing(root, breakage, folder, match):
  breakage(root)
  manifest = dataset.load_manifest(root)
  before = _snapshot(root)
  with pytest.raises(dataset.DatasetError, match=match) as info:
    dataset.load_volume(manifest, "mr", "case_000")
  assert str(root / "mr" / folder / "case_000.nii.gz") in str(info.value)
  with pytest.raises(dataset.DatasetError, match=match):
    dataset.load_modality(manifest, "mr")
  assert _snapshot(root) == before


def test_affine_within_tolerance_is_accepted(root):
  _replace_image(root, "mr", "case_000", np.zeros(SHAPE, np.uint8),
                 AFFINE + np.diag([5e-5, 0, 0, 0]), folder="labelsTr")
  volume = dataset.load_volume(dataset.load_manifest(root), "mr", "case_000")
  np.testing.assert_allclose(volume.affine, AFFINE)


def test_loading_everything_writes_nothing(root):
  before = _snapshot(root)
  manifest = dataset.load_manifest(root)
  for modality in manifest.modalities:
    dataset.load_modality(manifest, modality)
  assert _snapshot(root) == before


def test_real_btcv_labels_map_onto_the_shared_set(abdomen_root):
  """One real CT label volume through the BTCV -> shared map, checked voxel counts per organ."""
  spec = dataset.ModalitySpec(name="ct", label_map={0: 0, 6: 1, 2: 2, 3: 3, 1: 4},
                              normalization={"scheme": "none"}, subjects={},
                              unmapped="background")
  path = sorted((abdomen_root / "ct").glob("label_*.nii.gz"))[0]
  raw = np.asarray(nib.load(str(path)).dataobj)
  shared = dataset.map_labels(raw, spec, path)
  assert shared.shape == raw.shape
  counts = np.bincount(shared.ravel(), minlength=5)
  assert counts.size == 5
  for raw_value, shared_value in ((6, 1), (2, 2), (3, 3), (1, 4)):
    assert counts[shared_value] == np.count_nonzero(raw == raw_value) > 0
  assert counts[0] == np.count_nonzero(~np.isin(raw, (6, 2, 3, 1)))


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int16, np.uint8, np.float32, np.int32, np.float64])
def test_save_nifti_keeps_affine_dtype_and_values(tmp_path, dtype):
  c, s = np.cos(0.3), np.sin(0.3)
  affine = np.array([[-0.9 * c, -1.1 * s, 0., 12.5],
                     [0.9 * s, -1.1 * c, 0., -40.25],
                     [0., 0., 3.3, 7.],
                     [0., 0., 0., 1.]])
  array = (np.arange(np.prod(SHAPE)).reshape(SHAPE) - 20).astype(dtype)
  if dtype == np.uint8:
    array = np.arange(np.prod(SHAPE)).reshape(SHAPE).astype(dtype)
  path = tmp_path / "sub" / "x.nii.gz"
  dataset.save_nifti(path, array, affine)
  img = nib.load(str(path))
  assert img.get_data_dtype() == np.dtype(dtype)
  np.testing.assert_allclose(img.affine, affine, atol=1e-5)  # NIfTI stores float32.
  back = np.asarray(img.dataobj)
  assert back.dtype == np.dtype(dtype)
  np.testing.assert_array_equal(back, array)
  assert [p.name for p in path.parent.iterdir()] == ["x.nii.gz"]


def test_save_nifti_bool_as_uint8_and_plain_nii(tmp_path):
  path = tmp_path / "mask.nii"
  dataset.save_nifti(path, np.eye(4, dtype=bool)[:, :, None] * np.ones((1, 1, 2), bool), np.eye(4))
  img = nib.load(str(path))
  assert img.get_data_dtype() == np.uint8
  assert np.asarray(img.dataobj).sum() == 8
  assert path.read_bytes()[344:348] == b"n+1\x00"  # Uncompressed single-file NIfTI-1 magic.


def test_save_nifti_is_atomic_on_failure(tmp_path, monkeypatch):
  path = tmp_path / "x.nii.gz"
  dataset.save_nifti(path, np.ones(SHAPE, np.int16), np.eye(4))
  original = path.read_bytes()

  def half_write(img, filename):
    pathlib.Path(filename).write_bytes(b"partial")
    raise OSError("disk full")

  monkeypatch.setattr(dataset.nib, "save", half_write)
  with pytest.raises(OSError, match="disk full"):
    dataset.save_nifti(path, np.zeros(SHAPE, np.int16), np.eye(4))
  assert path.read_bytes() == original
  assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]


@pytest.mark.parametrize("name, array, affine, match", [
    ("x.nii.gz", np.zeros(SHAPE), np.eye(3), "affine"),
    ("x.nii.gz", np.zeros(SHAPE), np.full((4, 4), np.nan), "affine"),
    ("x.mha", np.zeros(SHAPE), np.eye(4), "must end with"),
    ("x.nii.gz", np.zeros((3, 3)), np.eye(4), "3D"),
    ("x.nii.gz", np.zeros(SHAPE, complex), np.eye(4), "dtype"),
])
def test_save_nifti_rejects_bad_arguments(tmp_path, name, array, affine, match):
  with pytest.raises(dataset.DatasetError, match=match) as info:
    dataset.save_nifti(tmp_path / name, array, affine)
  assert name in str(info.value)
  assert list(tmp_path.iterdir()) == []


def test_write_manifest_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
  dataset.write_manifest(tmp_path, MANIFEST)
  original = (tmp_path / "dataset.json").read_bytes()

  def failing_replace(src, dst):
    raise OSError("interrupted")

  monkeypatch.setattr(dataset.os, "replace", failing_replace)
  with pytest.raises(OSError, match="interrupted"):
    dataset.write_manifest(tmp_path, _manifest_with(lambda m: m.update(name="other")))
  assert (tmp_path / "dataset.json").read_bytes() == original
  assert sorted(os.listdir(tmp_path)) == ["dataset.json"]


def test_source_axis_flips_are_read_sorted_and_written_back(root):
  _write_raw_manifest(root, _manifest_with(
      lambda m: m["modalities"]["ct"].update(source_axis_flips=[2, 1])))
  manifest = dataset.load_manifest(root)
  assert manifest.modalities["ct"].source_axis_flips == (1, 2)
  assert manifest.modalities["mr"].source_axis_flips == ()
  written = manifest.to_dict()["modalities"]
  assert written["ct"]["source_axis_flips"] == [1, 2] and "source_axis_flips" not in written["mr"]


def test_a_case_whose_image_is_missing_is_an_error_not_a_dropped_case(root):
  (root / "ct" / "imagesTr" / "case_001.nii.gz").unlink()
  manifest = dataset.load_manifest(root)
  with pytest.raises(dataset.DatasetError, match=r"imagesTr/case_001.nii.gz: image not found, "
                                                 r"but its label"):
    dataset.list_cases(manifest, "ct")
  assert dataset.list_cases(manifest, "mr") == ["case_000", "case_001"]


def test_an_all_background_label_is_loaded_with_a_warning(root, caplog):
  dataset.save_nifti(root / "mr" / "labelsTr" / "case_001.nii.gz", np.zeros(SHAPE, np.uint8),
                     AFFINE)
  manifest = dataset.load_manifest(root)
  with caplog.at_level("WARNING"):
    volume = dataset.load_volume(manifest, "mr", "case_001")
  assert not volume.label.any()
  assert any("case_001" in r.getMessage() and "background only" in r.getMessage()
             for r in caplog.records)
