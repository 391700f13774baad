"""`predict`: new NIfTI files in, label files with the input's geometry out, without the dataset.

  python -m pytest -q tests/test_predict.py

The run is built by hand (config, data, an initialised state saved as a checkpoint): a network
with random weights predicts varied labels, which is all these tests need, in seconds.
"""

import dataclasses
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from configs import common
from tests import source_data
from unpaired_seg import evaluate
from unpaired_seg import metrics
from unpaired_seg import predict
from unpaired_seg import train
from unpaired_seg.data import dataset as ds
from unpaired_seg.data import pipeline
from unpaired_seg.data import prepare

CLASSES = ("background", "liver", "right_kidney", "left_kidney", "spleen")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A run on a dataset prepared at 2 mm from LAS MR / LPS CT sources; CT dataset_zscore."""
  root = tmp_path_factory.mktemp("predict")
  source = source_data.write_abdomen_source(root / "src")
  prepare.prepare_abdomen_ctmr(source, root / "prepared", spacing=(2.0, 2.0))
  config = common.get_base_config(tiny=True)
  config.data.dataset = "folder"
  config.data.root = str(root / "prepared")
  config.data.image_size = (8, 8)                  # MR slices are 15 x 13 there: tiled
  config.data.normalization = "ct=dataset_zscore"
  config.eval.batch_size = 4
  workdir = train.setup_workdir(config, root / "run")
  data, _, method, state, checkpoints = train.build(config, workdir)
  checkpoints.save_latest(1, state)
  checkpoints.wait()
  checkpoints.close()
  # What evaluation predicts for the test cases, on the source grid.
  saved = {}
  result = evaluate.evaluate_cases(
      evaluate.make_predictor(method), state, data.cases["test"], data.class_names,
      context_slices=0, batch_size=4, metrics=("dice",),
      on_prediction=lambda case, pred, ref: saved.__setitem__((case.modality, case.case), pred))
  # From here on the dataset is gone: predict must not need it.
  shutil.move(root / "prepared", root / "moved")
  return {"root": root, "source": source, "workdir": workdir, "data": data, "saved": saved,
          "result": result}


@pytest.fixture(scope="module")
def model(run):
  return predict.load_model(run["workdir"])


def _source_files(run, modality, case):
  number = int(case.split("_")[1])
  return (run["source"] / modality / f"image_{number}.nii.gz",
          run["source"] / modality / f"label_{number}.nii.gz")


def test_model_info_holds_what_predict_needs(run):
  info = evaluate.read_json(run["workdir"] / "model_info.json", "model info")
  assert info["class_names"] == list(CLASSES) and info["modalities"] == ["mr", "ct"]
  assert info["image_size"] == [8, 8] and info["target_spacing"] == [2.0, 2.0]
  ct = info["normalization"]["ct"]
  train_cases = [c.case for c in run["data"].cases["train"]["ct"]]
  assert ct["scheme"] == "dataset_zscore" and ct["fitted_on"] == sorted(train_cases)
  assert info["normalization"]["mr"] == {"scheme": "zscore"}
  assert info["source_axis_flips"] == {"mr": [], "ct": [1]}      # as prepare read BTCV CT


def test_predict_writes_what_evaluation_scored_in_the_input_geometry(run, model, tmp_path):
  assert model.checkpoint == "latest" and model.step == 1     # no best checkpoint: the latest
  for modality in ("mr", "ct"):
    inputs = tmp_path / f"in_{modality}"
    inputs.mkdir()
    cases = [c.case for c in run["data"].cases["test"][modality]]
    for case in cases:
      image, _ = _source_files(run, modality, case)
      shutil.copy(image, inputs / f"{case}_0000.nii.gz")       # nnU-Net channel suffix dropped
    written = predict.predict_folder(model, inputs, modality, tmp_path / f"out_{modality}")
    assert [p.name for p in written] == [f"{c}.nii.gz" for c in cases]
    for case, path in zip(cases, written):
      source_image, source_label = _source_files(run, modality, case)
      out, src = nib.load(str(path)), nib.load(str(source_image))
      labels = np.asarray(out.dataobj)
      assert out.get_data_dtype() == np.uint8 and labels.shape == src.shape
      assert np.array_equal(out.affine, src.affine)
      assert len(np.unique(labels)) > 1                          # a real, varied prediction
      np.testing.assert_array_equal(labels, run["saved"][(modality, case)])
      raw = np.asarray(nib.load(str(source_label)).dataobj)
      table = source_data.CT_TO_SHARED if modality == "ct" else {i: i for i in range(5)}
      dice = metrics.evaluate_volume(labels, source_data.shared_by_hand(raw, table), CLASSES,
                                     (1, 1, 1), metrics=("dice",))
      assert dice == run["result"][modality]["per_case"][case]
  # The CT statistics of training matter: per-volume z-scoring predicts something else.
  image, _ = _source_files(run, "ct", run["data"].cases["test"]["ct"][0].case)
  src = nib.load(str(image))
  same = predict.predict_array(model, np.asarray(src.dataobj), src.affine, "ct")
  info = {**model.info,
          "normalization": {**model.info["normalization"], "ct": {"scheme": "zscore"}}}
  other = predict.predict_array(dataclasses.replace(model, info=info), np.asarray(src.dataobj),
                                src.affine, "ct")
  assert not np.array_equal(same, other)


def test_a_flipped_and_permuted_file_gives_the_same_labels_in_world_space(run, model, tmp_path):
  image_path, _ = _source_files(run, "mr", run["data"].cases["test"]["mr"][0].case)
  src = nib.load(str(image_path))
  data, affine = np.asarray(src.dataobj), src.affine
  # Stored differently: axis 1 reversed, then axes 0 and 1 swapped; the affine follows so every
  # voxel keeps its world position.
  flip = np.eye(4)
  flip[1, 1], flip[1, 3] = -1, data.shape[1] - 1
  swap = np.eye(4)[[1, 0, 2, 3]]
  other_data = np.swapaxes(data[:, ::-1], 0, 1)
  other_affine = affine @ flip @ swap
  inputs = tmp_path / "in"
  ds.save_nifti(inputs / "a.nii.gz", data, affine)
  ds.save_nifti(inputs / "b.nii.gz", other_data, other_affine)
  predict.predict_folder(model, inputs, "mr", tmp_path / "out")
  a = nib.load(str(tmp_path / "out" / "a.nii.gz"))
  b = nib.load(str(tmp_path / "out" / "b.nii.gz"))
  assert np.array_equal(b.affine, nib.load(str(inputs / "b.nii.gz")).affine)
  assert len(np.unique(np.asarray(a.dataobj))) > 1
  np.testing.assert_array_equal(np.swapaxes(np.asarray(b.dataobj), 0, 1)[:, ::-1],
                                np.asarray(a.dataobj))


def test_ct_files_are_read_with_the_runs_axis_correction(run, model):
  image_path, _ = _source_files(run, "ct", run["data"].cases["test"]["ct"][0].case)
  src = nib.load(str(image_path))
  data, affine = np.asarray(src.dataobj), src.affine
  auto = predict.predict_array(model, data, affine, "ct")
  assert len(np.unique(auto)) > 1
  np.testing.assert_array_equal(predict.predict_array(model, data, affine, "ct",
                                                      source_axis_flips=(1,)), auto)
  # Without the correction the file is read mirrored front-to-back: the same prediction as for
  # the mirrored voxels read with the correction, and not the corrected one.
  plain = predict.predict_array(model, data, affine, "ct", source_axis_flips=())
  np.testing.assert_array_equal(
      plain, predict.predict_array(model, data[:, ::-1], affine, "ct")[:, ::-1])
  assert not np.array_equal(plain, auto)
  # The run's MR needs none: 'auto' and an explicit empty list agree.
  mr_path, _ = _source_files(run, "mr", run["data"].cases["test"]["mr"][0].case)
  mr = nib.load(str(mr_path))
  np.testing.assert_array_equal(
      predict.predict_array(model, np.asarray(mr.dataobj), mr.affine, "mr"),
      predict.predict_array(model, np.asarray(mr.dataobj), mr.affine, "mr", source_axis_flips=()))
  with pytest.raises(predict.PredictError, match="source_axis_flips"):
    predict.predict_array(model, data, affine, "ct", source_axis_flips=(3,))


def test_source_axis_flips_flag():
  assert predict.parse_source_axis_flips("auto") is None
  assert predict.parse_source_axis_flips(None) is None
  assert predict.parse_source_axis_flips("none") == ()
  assert predict.parse_source_axis_flips("1,0") == (0, 1)
  for bad in ("x", "1,1", "3", "0,,1"):
    with pytest.raises(predict.PredictError, match="--source_axis_flips"):
      predict.parse_source_axis_flips(bad)


def test_the_header_geometry_is_copied_exactly_even_from_a_qform_only_file(run, model, tmp_path):
  image_path, _ = _source_files(run, "ct", run["data"].cases["test"]["ct"][0].case)
  src = nib.load(str(image_path))
  img = nib.Nifti1Image(np.asarray(src.dataobj), None, header=src.header.copy())
  img.set_qform(src.affine @ np.diag([1, 1, 1, 1.0]), code=1)
  img.set_sform(None, code=0)                                   # only the quaternion form
  inputs = tmp_path / "in"
  inputs.mkdir()
  nib.save(img, str(inputs / "q.nii"))
  predict.predict_folder(model, inputs, "ct", tmp_path / "out")
  out = nib.load(str(tmp_path / "out" / "q.nii"))
  reference = nib.load(str(inputs / "q.nii"))
  assert np.array_equal(out.affine, reference.affine)
  assert int(out.header["sform_code"]) == 0 and int(out.header["qform_code"]) == 1
  assert out.shape == reference.shape and out.get_data_dtype() == np.uint8
  assert not list((tmp_path / "out").glob(".*"))                # no temporary file left


def test_predict_refuses_to_write_into_the_input_folder(run, model, tmp_path):
  inputs = tmp_path / "in"
  inputs.mkdir()
  image_path, _ = _source_files(run, "mr", run["data"].cases["test"]["mr"][0].case)
  shutil.copy(image_path, inputs / "x.nii.gz")
  for output in (inputs, inputs / "sub", tmp_path / "in" / ".." / "in"):
    with pytest.raises(predict.PredictError, match="inside --input"):
      predict.predict_folder(model, inputs, "mr", output)
  assert sorted(p.name for p in inputs.iterdir()) == ["x.nii.gz"]
  with pytest.raises(predict.PredictError, match="--modality='pet'"):
    predict.predict_folder(model, inputs, "pet", tmp_path / "out")
  # The command line says why and exits with 1, before building any model.
  done = subprocess.run([sys.executable, "-m", "unpaired_seg.predict", f"--workdir={tmp_path}",
                         f"--input={inputs}", "--modality=mr", f"--output={inputs}"],
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 1 and "inside --input" in done.stderr
  assert sorted(p.name for p in inputs.iterdir()) == ["x.nii.gz"]


def test_a_folder_that_is_not_a_run_is_named(tmp_path):
  with pytest.raises(predict.PredictError, match=f"{tmp_path}.*not a trained run"):
    predict.load_model(tmp_path)


def test_a_bad_input_is_found_before_any_output_is_written(run, model, tmp_path):
  inputs = tmp_path / "in"
  inputs.mkdir()
  image_path, _ = _source_files(run, "mr", run["data"].cases["test"]["mr"][0].case)
  shutil.copy(image_path, inputs / "a_good.nii.gz")          # sorts first: predicted first
  good = nib.load(str(image_path))
  bad = np.asarray(good.dataobj, np.float32)
  bad[0, 0, 0] = np.nan
  nib.save(nib.Nifti1Image(bad, good.affine), str(inputs / "b_bad.nii.gz"))
  with pytest.raises(predict.PredictError, match="b_bad.nii.gz: image holds NaN"):
    predict.predict_folder(model, inputs, "mr", tmp_path / "out")
  assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())
