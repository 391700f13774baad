"""The real abdominal CT/MR data end to end, small: prepare 3 subjects per modality at 6 mm, build
a tiny run (initial weights saved as its checkpoint; tests/test_train.py covers the update loop),
evaluate in the source geometry, predict the raw test volumes and find the summary's Dice again.
The distance metrics cost seconds per real volume: tests/test_evaluate.py checks them on small
synthetic sources.

  python -m pytest -q tests/test_real_data.py

Skipped when the data is not beside the checkout (tests/conftest.py, `abdomen_root`).
"""

import json
import re

import nibabel as nib
import numpy as np

from configs import common
from unpaired_seg import evaluate
from unpaired_seg import metrics
from unpaired_seg import predict
from unpaired_seg import train
from unpaired_seg.data import dataset as ds
from unpaired_seg.data import geometry
from unpaired_seg.data import prepare

ORGANS = {"liver", "right_kidney", "left_kidney", "spleen"}


def _world_centroid(mask, affine):
  voxels = np.argwhere(mask).astype(np.float64)
  return (voxels @ affine[:3, :3].T + affine[:3, 3]).mean(axis=0)


def _check_anatomy_in_world_space(manifest):
  """Both modalities agree with the anatomy in RAS world coordinates (mm), every case.

  The kidneys lie behind the body's centre (measured 45-57 mm for these MR, 16-30 mm for these
  CT cases; BTCV's own affines put them in front), the liver right of it (50-83 mm) and above
  the kidneys (23-112 mm).
  """
  for modality in ("mr", "ct"):
    for volume in ds.load_modality(manifest, modality):
      body = _world_centroid(volume.image > geometry.otsu_threshold(volume.image), volume.affine)
      kidneys = _world_centroid((volume.label == 2) | (volume.label == 3), volume.affine)
      liver = _world_centroid(volume.label == 1, volume.affine)
      where = (modality, volume.case)
      assert kidneys[1] - body[1] < -10.0, where                  # posterior (RAS: +y anterior)
      assert liver[0] - body[0] > 20.0, where                     # on the right (+x)
      assert liver[2] - kidneys[2] > 10.0, where                  # superior (+z)


def test_prepare_train_evaluate_predict_on_the_real_data(abdomen_root, tmp_path):
  prepared = tmp_path / "prepared"
  manifest = prepare.prepare_abdomen_ctmr(abdomen_root, prepared, spacing=(6.0, 6.0), limit=3)
  _check_anatomy_in_world_space(manifest)
  config = common.get_base_config(tiny=True)
  config.data.dataset = "folder"
  config.data.root = str(prepared)
  config.data.image_size = (32, 32)         # 6 mm: MR 53 x 53, CT 50..67 in-plane: tiled
  config.data.normalization = "ct=dataset_zscore"
  config.data.split.update(train=0.7, val=0.0, test=0.3)    # 2 training, 1 test subject each
  config.eval.checkpoint = "latest"         # no validation subject to pick a best one by
  config.eval.metrics = ("dice",)
  config.eval.batch_size = 16
  workdir = train.setup_workdir(config, tmp_path / "run")
  data, _, method, state, checkpoints = train.build(config, workdir)
  checkpoints.save_latest(1, state)
  checkpoints.wait()
  summary = train.evaluate(config, workdir, method=method, data=data, state_template=state,
                           checkpoints=checkpoints, predictor=evaluate.make_predictor(method))
  checkpoints.close()

  assert json.loads((workdir / "summary.json").read_text()) == summary
  assert (workdir / "model_info.json").is_file()
  for modality in ("mr", "ct"):
    block = summary["modalities"][modality]
    assert block["grid"] == "source" and set(block["per_class"]) == ORGANS
    assert len(block["per_case"]) == 1
  assert summary["metric_settings"]["units"] == "mm"
  assert summary["normalization"]["ct"]["scheme"] == "dataset_zscore"

  model = predict.load_model(workdir)
  splits = json.loads((workdir / "splits.json").read_text())
  for modality, table in (("mr", prepare.ABDOMEN_MR_LABEL_MAP),
                          ("ct", prepare.ABDOMEN_CT_LABEL_MAP)):
    spec = ds.ModalitySpec(modality, dict(table), {}, {}, "background")
    for case in splits["modalities"][modality]["test"]:
      number = int(re.search(r"_(\d+)$", case).group(1))
      image = abdomen_root / modality / f"image_{number}.nii.gz"
      inputs = tmp_path / f"in_{case}"
      inputs.mkdir()
      (inputs / image.name).symlink_to(image)
      predict.predict_folder(model, inputs, modality, tmp_path / "out")
      out = nib.load(str(tmp_path / "out" / image.name))
      source = nib.load(str(image))
      assert out.shape == source.shape and np.array_equal(out.affine, source.affine)
      assert len(np.unique(np.asarray(out.dataobj))) > 1
      label_path = abdomen_root / modality / f"label_{number}.nii.gz"
      reference = ds.map_labels(np.asarray(nib.load(str(label_path)).dataobj), spec, label_path)
      dice = metrics.evaluate_volume(np.asarray(out.dataobj), reference, prepare.ABDOMEN_LABELS,
                                     (1, 1, 1), metrics=("dice",))
      for organ, values in dice.items():
        expected = summary["modalities"][modality]["per_case"][case][organ]["dice"]
        if expected is None:
          assert np.isnan(values["dice"])
        else:
          assert abs(values["dice"] - expected) < 0.01
