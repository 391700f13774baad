"""Tests of `prepare`: source layouts into the project's dataset layout, checks, refusals.

  python -m pytest -q tests/data/test_prepare.py
"""

import json
import os
import pathlib
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from unpaired_seg.data import dataset
from unpaired_seg.data import geometry
from unpaired_seg.data import prepare

REPO = pathlib.Path(__file__).resolve().parents[2]
SHAPE = (12, 10, 4)
# Stored orientations of the real set: MR LAS, CT LPS. Canonical spacing (x, y, z) in mm.
MR_AFFINE = np.array([[-1.25, 0., 0., 20.], [0., 1.25, 0., -10.], [0., 0., 7.7, -30.],
                      [0., 0., 0., 1.]])
CT_AFFINE = np.array([[-0.8, 0., 0., 4.], [0., -0.8, 0., 6.], [0., 0., 3.0, 1.],
                      [0., 0., 0., 1.]])
# BTCV's affines reverse voxel axis 1 (front-to-back); prepare corrects them, so the CT source
# reads as LAS like the MR one.
CT_SOURCE_AXIS_FLIPS = (1,)
CT_CORRECTED = geometry.reverse_axis_directions(CT_AFFINE, SHAPE, CT_SOURCE_AXIS_FLIPS)
# The reversed stored axes of each (corrected) orientation (to get the canonical array by hand).
MR_FLIPS = (0,)
CT_FLIPS = (0,)
# An LPS file read as it is (the generic folder importer corrects nothing).
LPS_FLIPS = (0, 1)
MR_SHARED = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4}
# BTCV: 6 liver, 2/3 kidneys, 1 spleen; 7 (stomach) and 8 (aorta) are background here.
CT_SHARED = {0: 0, 6: 1, 2: 2, 3: 3, 1: 4, 7: 0, 8: 0}


def _labels(values, seed, shape=SHAPE):
  rng = np.random.default_rng(seed)
  label = rng.choice(np.array(values, np.uint8), size=shape)
  label.flat[:len(values)] = values
  return label


def _write_abdomen(root: pathlib.Path, mr_ids=(1, 5), ct_ids=(0, 3)):
  """A tiny source in the abdominal layout: LAS int16 MR, LPS uint8 CT with BTCV labels."""
  rng = np.random.default_rng(0)
  for subject in mr_ids:
    dataset.save_nifti(root / "mr" / f"image_{subject}.nii.gz",
                       rng.integers(0, 1300, SHAPE).astype(np.int16), MR_AFFINE)
    dataset.save_nifti(root / "mr" / f"label_{subject}.nii.gz",
                       _labels((0, 1, 2, 3, 4), subject), MR_AFFINE)
  for subject in ct_ids:
    dataset.save_nifti(root / "ct" / f"image_{subject}.nii.gz",
                       rng.integers(0, 256, SHAPE).astype(np.uint8), CT_AFFINE)
    dataset.save_nifti(root / "ct" / f"label_{subject}.nii.gz",
                       _labels((0, 6, 2, 3, 1, 7, 8), 10 + subject), CT_AFFINE)
  return root


def _read(path):
  img = nib.load(str(path))
  return np.asarray(img.dataobj), np.asarray(img.affine)


def _canonical_by_hand(array, flips):
  for axis in flips:
    array = np.flip(array, axis=axis)
  return array


def _shared_by_hand(raw, table):
  out = np.zeros(raw.shape, np.uint8)
  for index in np.ndindex(raw.shape):
    out[index] = table[int(raw[index])]
  return out


def _no_partial_folders(parent: pathlib.Path):
  return not [p for p in parent.iterdir() if ".partial-" in p.name]


def test_abdomen_layout_at_source_spacing(tmp_path):
  source = _write_abdomen(tmp_path / "src")
  manifest = prepare.prepare_abdomen_ctmr(source, tmp_path / "out", spacing=None)

  loaded = dataset.load_manifest(tmp_path / "out")
  assert loaded.to_dict() == manifest.to_dict()
  assert list(loaded.modalities) == ["mr", "ct"]
  assert loaded.labels == ("background", "liver", "right_kidney", "left_kidney", "spleen")
  assert loaded.paired is False
  assert loaded.modalities["ct"].label_map == {0: 0, 6: 1, 2: 2, 3: 3, 1: 4}
  assert loaded.modalities["ct"].unmapped == "background"
  assert loaded.modalities["mr"].unmapped == "error"
  assert all(s.normalization == {"scheme": "zscore"} for s in loaded.modalities.values())
  assert "not Hounsfield" in loaded.description
  assert dataset.list_cases(loaded, "mr") == ["chaos_01", "chaos_05"]
  assert dataset.list_cases(loaded, "ct") == ["btcv_00", "btcv_03"]
  assert loaded.modalities["ct"].source_axis_flips == CT_SOURCE_AXIS_FLIPS
  assert loaded.modalities["mr"].source_axis_flips == ()

  for modality, prefix, ids, flips, table in (("mr", "chaos", (1, 5), MR_FLIPS, MR_SHARED),
                                              ("ct", "btcv", (0, 3), CT_FLIPS, CT_SHARED)):
    volumes = dataset.load_modality(loaded, modality)
    source_flips = CT_SOURCE_AXIS_FLIPS if modality == "ct" else ()
    for volume, subject in zip(volumes, ids):
      src_image, file_affine = _read(source / modality / f"image_{subject}.nii.gz")
      src_affine = geometry.reverse_axis_directions(file_affine, SHAPE, source_flips)
      src_label, _ = _read(source / modality / f"label_{subject}.nii.gz")
      assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
      np.testing.assert_array_equal(volume.image, _canonical_by_hand(src_image, flips))
      np.testing.assert_array_equal(volume.label,
                                    _shared_by_hand(_canonical_by_hand(src_label, flips), table))
      # Raw values stay in the label file (BTCV 7 and 8 kept; mapped only on load).
      raw, _ = _read(tmp_path / "out" / modality / "labelsTr" / f"{volume.case}.nii.gz")
      np.testing.assert_array_equal(raw, _canonical_by_hand(src_label, flips))
      # The first stored voxel keeps its world position.
      corner = np.array(src_label.shape) - 1
      corner = [corner[a] if a in flips else 0 for a in range(3)]
      np.testing.assert_allclose((volume.affine @ np.r_[corner, 1])[:3], src_affine[:3, 3],
                                 atol=1e-4)
      # Geometry record: back to the source grid exactly.
      record, info = prepare.load_geometry(tmp_path / "out", modality, volume.case)
      assert info["source_label"] == str((source / modality / f"label_{subject}.nii.gz").resolve())
      assert info["target_spacing"] is None
      assert info["source_axis_flips"] == list(source_flips)
      np.testing.assert_array_equal(geometry.to_source_grid(raw, record), src_label)
      np.testing.assert_allclose(np.asarray(record.source_affine), src_affine, atol=1e-6)
      # Reversing the recorded axes again gives the file's own affine back.
      np.testing.assert_allclose(
          geometry.reverse_axis_directions(record.source_affine, SHAPE, info["source_axis_flips"]),
          file_affine, atol=1e-6)
  assert volumes[0].image.dtype == np.float32
  assert prepare.check_dataset(tmp_path / "out") == []
  assert _no_partial_folders(tmp_path)


def test_abdomen_layout_resampled(tmp_path):
  source = _write_abdomen(tmp_path / "src")
  prepare.prepare_abdomen_ctmr(source, tmp_path / "out", spacing=(1.6, 1.6), limit=1)
  manifest = dataset.load_manifest(tmp_path / "out")
  assert dataset.list_cases(manifest, "mr") == ["chaos_01"]
  assert dataset.list_cases(manifest, "ct") == ["btcv_00"]
  # MR 12 x 10 at 1.25 mm -> round(12 * 1.25 / 1.6) = 9, round(10 * 1.25 / 1.6) = 8;
  # CT at 0.8 mm -> 6 x 5. Slices kept.
  for modality, shape, thickness in (("mr", (9, 8, 4), 7.7), ("ct", (6, 5, 4), 3.0)):
    volume = dataset.load_modality(manifest, modality)[0]
    assert volume.image.shape == volume.label.shape == shape
    np.testing.assert_allclose(volume.spacing, (1.6, 1.6, thickness), rtol=1e-6)
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    record, _ = prepare.load_geometry(tmp_path / "out", modality, volume.case)
    raw, _ = _read(tmp_path / "out" / modality / "labelsTr" / f"{volume.case}.nii.gz")
    assert geometry.to_source_grid(raw, record).shape == SHAPE
  # Stored in the source's integer type.
  assert _read(tmp_path / "out" / "mr" / "imagesTr" / "chaos_01.nii.gz")[0].dtype == np.int16
  assert _read(tmp_path / "out" / "ct" / "imagesTr" / "btcv_00.nii.gz")[0].dtype == np.uint8
  assert prepare.check_dataset(tmp_path / "out") == []
  # A manifest whose source_axis_flips disagree with the cases' geometry records is reported.
  path = tmp_path / "out" / "dataset.json"
  edited = json.loads(path.read_text())
  del edited["modalities"]["ct"]["source_axis_flips"]
  path.write_text(json.dumps(edited))
  problems = prepare.check_dataset(tmp_path / "out")
  assert len(problems) == 1 and "btcv_00.json" in problems[0], problems
  assert "modalities.ct.source_axis_flips" in problems[0]


def _break_abdomen(source: pathlib.Path) -> dict[str, str]:
  """Five problems in five files; returns file name -> what the message must say."""
  rng = np.random.default_rng(1)
  # MR label value 9: not in the MR label map, which has no "unmapped" fallback.
  label = _labels((0, 1, 2, 3, 4), 1)
  label[0, 0, 0] = 9
  dataset.save_nifti(source / "mr" / "label_1.nii.gz", label, MR_AFFINE)
  # CT label of another shape.
  dataset.save_nifti(source / "ct" / "label_3.nii.gz", _labels((0, 6), 3, shape=(12, 10, 5)),
                     CT_AFFINE)
  # CT image with NaN (float32).
  image = rng.normal(size=SHAPE).astype(np.float32)
  image[1, 2, 3] = np.nan
  dataset.save_nifti(source / "ct" / "image_0.nii.gz", image, CT_AFFINE)
  # MR label shifted by 2 mm against its image.
  shifted = MR_AFFINE.copy()
  shifted[0, 3] += 2.0
  dataset.save_nifti(source / "mr" / "label_5.nii.gz", _labels((0, 1), 5), shifted)
  # A label without its image.
  dataset.save_nifti(source / "ct" / "label_9.nii.gz", _labels((0, 6), 9), CT_AFFINE)
  return {"mr/label_1.nii.gz": "label value(s) 9", "ct/label_3.nii.gz": "shape",
          "ct/image_0.nii.gz": "NaN", "mr/label_5.nii.gz": "affine",
          "ct/label_9.nii.gz": "without an image"}


def test_check_reports_every_problem_with_its_file_and_writes_nothing(tmp_path):
  source = _write_abdomen(tmp_path / "src")
  expected = _break_abdomen(source)
  before = sorted(p.name for p in tmp_path.rglob("*"))

  problems = prepare.check_abdomen_ctmr(source)
  assert len(problems) == len(expected), problems
  for name, what in expected.items():
    hits = [p for p in problems if str(source / name) in p]
    assert len(hits) == 1 and what in hits[0], (name, problems)

  output = tmp_path / "new" / "deeper" / "out"
  with pytest.raises(prepare.PrepareError) as error:
    prepare.prepare_abdomen_ctmr(source, output, spacing=(1.5, 1.5))
  for name in expected:
    assert str(source / name) in str(error.value)
  assert f"{len(expected)} problem(s)" in str(error.value)
  # Nothing left behind: no output, no created parents, no partial folder.
  assert not (tmp_path / "new").exists()
  assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_check_flags_a_volume_whose_slices_are_not_axial(tmp_path):
  source = _write_abdomen(tmp_path / "src", mr_ids=(1,), ct_ids=(0,))
  # Coronal: stored axes L, S, A with 7.7 mm along A (an in-plane axis after reorientation).
  coronal = np.array([[-1.25, 0., 0., 0.], [0., 0., 7.7, 0.], [0., 1.25, 0., 0.], [0, 0, 0, 1.]])
  dataset.save_nifti(source / "mr" / "image_1.nii.gz", np.zeros(SHAPE, np.int16), coronal)
  dataset.save_nifti(source / "mr" / "label_1.nii.gz", _labels((0, 1), 1), coronal)
  problems = prepare.check_abdomen_ctmr(source)
  assert len(problems) == 1 and str(source / "mr" / "image_1.nii.gz") in problems[0]
  assert "slice axis" in problems[0]


def test_refuses_output_inside_input_or_not_empty(tmp_path):
  source = _write_abdomen(tmp_path / "src", mr_ids=(1,), ct_ids=(0,))
  before = sorted(str(p) for p in tmp_path.rglob("*"))
  for output in (source, source / "prepared", source / "mr" / "x"):
    with pytest.raises(prepare.PrepareError, match="inside the input"):
      prepare.prepare_abdomen_ctmr(source, output)
  assert sorted(str(p) for p in tmp_path.rglob("*")) == before
  busy = tmp_path / "busy"
  busy.mkdir()
  (busy / "keep.txt").write_text("mine")
  with pytest.raises(prepare.PrepareError, match="not an empty folder"):
    prepare.prepare_abdomen_ctmr(source, busy)
  assert [p.name for p in busy.iterdir()] == ["keep.txt"]
  # An existing empty folder is fine.
  empty = tmp_path / "empty"
  empty.mkdir()
  prepare.prepare_abdomen_ctmr(source, empty, spacing=None)
  assert dataset.list_cases(dataset.load_manifest(empty), "ct") == ["btcv_00"]


def _write_folder(root: pathlib.Path, cases, affine, values, channel_suffix, seed):
  """An nnU-Net-style modality folder."""
  rng = np.random.default_rng(seed)
  for i, case in enumerate(cases):
    suffix = "_0000" if channel_suffix else ""
    dataset.save_nifti(root / "imagesTr" / f"{case}{suffix}.nii.gz",
                       rng.normal(100, 20, SHAPE).astype(np.float32), affine)
    dataset.save_nifti(root / "labelsTr" / f"{case}.nii.gz", _labels(values, seed + i), affine)


def test_import_folder_maps_labels_and_keeps_subjects_apart(tmp_path):
  raw = tmp_path / "raw"
  _write_folder(raw / "ct", ["a", "b"], CT_AFFINE, (0, 6, 1, 7), channel_suffix=True, seed=3)
  _write_folder(tmp_path / "elsewhere" / "t2", ["b", "c"], MR_AFFINE, (0, 1, 4), False, seed=4)
  modalities = [
      prepare.FolderModality("ct", raw / "ct", {0: 0, 6: 1, 1: 2}, unmapped="background",
                             normalization={"scheme": "clip_zscore", "window": [-200.0, 300.0]}),
      prepare.FolderModality("mr", tmp_path / "elsewhere" / "t2", {0: 0, 1: 1, 4: 2}),
  ]
  assert prepare.check_folder(modalities, ["background", "liver", "spleen"]) == []
  manifest = prepare.import_folder(modalities, tmp_path / "out", ["background", "liver", "spleen"],
                                   spacing=None)
  assert manifest.name == "out"
  assert manifest.modalities["ct"].normalization == {"scheme": "clip_zscore",
                                                     "window": [-200.0, 300.0]}
  # Case "b" is in both modalities of this unpaired set: two people, two subject ids.
  assert manifest.subject_of("ct", "b") != manifest.subject_of("mr", "b")
  assert manifest.subject_of("ct", "a") == "a"
  ct = dataset.load_volume(manifest, "ct", "a")
  src, _ = _read(raw / "ct" / "labelsTr" / "a.nii.gz")
  np.testing.assert_array_equal(
      ct.label, _shared_by_hand(_canonical_by_hand(src, LPS_FLIPS), {0: 0, 6: 1, 1: 2, 7: 0}))
  assert prepare.check_dataset(tmp_path / "out") == []


def test_import_folder_reports_problems(tmp_path):
  raw = tmp_path / "raw"
  _write_folder(raw / "ct", ["a", "b"], CT_AFFINE, (0, 6, 7), channel_suffix=True, seed=3)
  dataset.save_nifti(raw / "ct" / "imagesTr" / "a_0001.nii.gz", np.zeros(SHAPE, np.float32),
                     CT_AFFINE)
  (raw / "ct" / "labelsTr" / "b.nii.gz").unlink()
  modalities = [prepare.FolderModality("ct", raw / "ct", {0: 0, 6: 1})]  # 7 unmapped: error
  problems = prepare.check_folder(modalities, ["background", "liver"])
  assert len(problems) == 3, problems
  assert any(str(raw / "ct" / "imagesTr" / "a_0001.nii.gz") in p and "channel" in p
             for p in problems)
  assert any(str(raw / "ct" / "imagesTr" / "b_0000.nii.gz") in p and "without a label" in p
             for p in problems)
  assert any(str(raw / "ct" / "labelsTr" / "a.nii.gz") in p and "7" in p for p in problems)
  # A label map pointing past the shared labels fails before any volume is read.
  bad = [prepare.FolderModality("ct", raw / "ct", {0: 0, 6: 5})]
  assert any("label_map" in p for p in prepare.check_folder(bad, ["background", "liver"]))
  with pytest.raises(prepare.PrepareError, match="inside the input"):
    prepare.import_folder(modalities, raw / "ct" / "out", ["background", "liver"])
  with pytest.raises(prepare.PrepareError, match="inside the input"):
    prepare.import_folder(modalities, raw / "out", ["background", "liver"], input_dir=raw)
  assert not (raw / "ct" / "out").exists() and not (raw / "out").exists()


def test_check_dataset_names_a_damaged_file(tmp_path):
  source = _write_abdomen(tmp_path / "src", mr_ids=(1,), ct_ids=(0,))
  out = tmp_path / "out"
  prepare.prepare_abdomen_ctmr(source, out, spacing=(1.5, 1.5))
  label_path = out / "mr" / "labelsTr" / "chaos_01.nii.gz"
  label, affine = _read(label_path)
  label[0, 0, 0] = 9
  dataset.save_nifti(label_path, label, affine)
  image_path = out / "ct" / "imagesTr" / "btcv_00.nii.gz"
  image, affine = _read(image_path)
  dataset.save_nifti(image_path, np.flip(image, 0), affine @ np.diag([-1., 1., 1., 1.]))
  problems = prepare.check_dataset(out)
  assert any(str(label_path) in p and "9" in p for p in problems), problems
  assert any(str(image_path) in p and "orientation" in p for p in problems), problems
  assert any(str(out / "ct" / "labelsTr" / "btcv_00.nii.gz") in p and "affine" in p
             for p in problems), problems


def test_parsers():
  assert prepare.parse_spacing("1.5,2") == (1.5, 2.0)
  assert prepare.parse_spacing("2") == (2.0, 2.0)
  assert prepare.parse_spacing("") is None
  assert prepare.parse_label_map("0:0, 6:1,2:2") == ({0: 0, 6: 1, 2: 2}, "error")
  assert prepare.parse_label_map("0:0,6:1,*:0") == ({0: 0, 6: 1}, "background")
  assert prepare.parse_normalization("clip_zscore:-200:300") == {"scheme": "clip_zscore",
                                                                 "window": [-200.0, 300.0]}
  assert prepare.parse_normalization("minmax") == {"scheme": "minmax"}
  for bad, call in (("--spacing", lambda: prepare.parse_spacing("1.5,-1")),
                    ("--label_map", lambda: prepare.parse_label_map("0:0,6")),
                    ("--label_map", lambda: prepare.parse_label_map("1:1,1:2")),
                    ("--normalization", lambda: prepare.parse_normalization("clip_zscore:3:1")),
                    ("'limit'", lambda: prepare.check_abdomen_ctmr(".", limit=0))):
    with pytest.raises(prepare.PrepareError, match=bad):
      call()


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", "unpaired_seg.data.prepare", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=120)


def test_command_line_folder_import_and_check(tmp_path):
  raw = tmp_path / "raw"
  _write_folder(raw / "ct", ["a"], CT_AFFINE, (0, 6, 7), channel_suffix=False, seed=3)
  _write_folder(tmp_path / "mr_elsewhere", ["m"], MR_AFFINE, (0, 1), False, seed=4)
  common = ["--source=folder", f"--input={raw}", "--labels=background,liver",
            "--modality=ct", "--label_map=0:0,6:1,*:0", "--normalization=clip_zscore:-200:300",
            f"--modality=mr={tmp_path / 'mr_elsewhere'}", "--label_map=0:0,1:1",
            "--normalization=zscore"]
  # --noplan: the plan times networks (tests/data/test_plan.py covers it).
  done = _cli(*common, f"--output={tmp_path / 'out'}", "--spacing=1.6,1.6", "--noplan")
  assert done.returncode == 0, done.stderr
  manifest = dataset.load_manifest(tmp_path / "out")
  assert manifest.modalities["ct"].unmapped == "background"
  assert manifest.modalities["mr"].normalization == {"scheme": "zscore"}
  assert dataset.load_volume(manifest, "mr", "m").image.shape == (9, 8, 4)

  done = _cli("--source=dataset", f"--input={tmp_path / 'out'}", "--check")
  assert done.returncode == 0, done.stderr
  # The CT map without '*:0' rejects raw value 7: exit status 1, the file named, nothing written.
  common[4] = "--label_map=0:0,6:1"
  done = _cli(*common, "--check")
  assert done.returncode == 1
  assert str(raw / "ct" / "labelsTr" / "a.nii.gz") in done.stderr
  done = _cli(*common, f"--output={tmp_path / 'out2'}")
  assert done.returncode == 1 and not (tmp_path / "out2").exists()
  done = _cli("--source=abdomen_ctmr", f"--input={raw}", "--labels=a,b", "--check")
  assert done.returncode == 1 and "only for --source=folder" in done.stderr


def test_real_abdomen_one_case_each(abdomen_root, tmp_path):
  """1 MR + 1 CT of the real set: canonical, 1.5 mm, shared labels 0..4, and back again."""
  manifest = prepare.prepare_abdomen_ctmr(abdomen_root, tmp_path / "abd", spacing=(1.5, 1.5),
                                          limit=1)
  tables = {"mr": MR_SHARED, "ct": {0: 0, 6: 1, 2: 2, 3: 3, 1: 4}}
  for modality in ("mr", "ct"):
    (volume,) = dataset.load_modality(manifest, modality)
    assert nib.aff2axcodes(volume.affine) == ("R", "A", "S")
    np.testing.assert_allclose(volume.spacing[:2], (1.5, 1.5), rtol=1e-5)
    assert set(np.unique(volume.label)) == {0, 1, 2, 3, 4}
    record, info = prepare.load_geometry(tmp_path / "abd", modality, volume.case)
    src_label, src_affine = _read(info["source_label"])
    assert tuple(record.source_shape) == src_label.shape
    assert volume.spacing[2] == pytest.approx(geometry.spacing_of(record.canonical_affine)[2])
    raw, _ = _read(tmp_path / "abd" / modality / "labelsTr" / f"{volume.case}.nii.gz")
    back = geometry.to_source_grid(raw, record)
    assert back.shape == src_label.shape
    lut = np.zeros(256, np.uint8)
    for value, shared in tables[modality].items():
      lut[value] = shared
    back, expected = lut[back], lut[src_label]
    # Nearest neighbour to 1.5 mm and back loses about half a voxel at organ borders: the
    # measured per-organ Dice of these two cases is 0.984-0.996.
    for organ in range(1, 5):
      a, b = back == organ, expected == organ
      assert 2.0 * np.sum(a & b) / (np.sum(a) + np.sum(b)) > 0.98, (modality, organ)
  # At the source spacing the way back is exact.
  manifest = prepare.prepare_abdomen_ctmr(abdomen_root, tmp_path / "abd_keep", spacing=None,
                                          limit=1)
  for modality in ("mr", "ct"):
    case = dataset.list_cases(manifest, modality)[0]
    record, info = prepare.load_geometry(tmp_path / "abd_keep", modality, case)
    raw, _ = _read(tmp_path / "abd_keep" / modality / "labelsTr" / f"{case}.nii.gz")
    np.testing.assert_array_equal(geometry.to_source_grid(raw, record),
                                  _read(info["source_label"])[0])
  assert prepare.check_dataset(tmp_path / "abd") == []


def test_prepare_writes_the_arrays_that_readers_memory_map(tmp_path):
  from unpaired_seg.data import arrays
  manifest = prepare.prepare_abdomen_ctmr(_write_abdomen(tmp_path / "src"), tmp_path / "out",
                                          spacing=(1.0, 1.0))
  store = arrays.VolumeStore(manifest, tmp_path / "cache")
  for modality in manifest.modalities:
    for volume, decoded in zip(store.modality(modality), dataset.load_modality(manifest, modality)):
      assert volume.folder == tmp_path / "out" / arrays.ARRAYS_DIR       # nothing decoded again
      for field in ("image", "label", "affine"):
        expected, got = getattr(decoded, field), getattr(volume, field)
        assert expected.dtype == got.dtype
        np.testing.assert_array_equal(expected, got)
  assert not store.cache.exists()
  assert prepare.check_dataset(tmp_path / "out") == []
