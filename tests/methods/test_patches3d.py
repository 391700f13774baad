"""3D patches: the sampler, sliding-window inference, and the 3D UMMKD setting end to end.

  python -m pytest -q tests/methods/test_patches3d.py
"""

import dataclasses
import json

import numpy as np
import pytest

from configs import ummkd_3d
from unpaired_seg import train
from unpaired_seg.data import patches


@dataclasses.dataclass
class _Case:
  image: np.ndarray
  label: np.ndarray | None


def _cases():
  r = np.random.default_rng(0)
  out = []
  for n, z in ((20, 9), (16, 3)):          # the second is shallower than a patch: padded
    label = np.zeros((n, n, z), np.uint8)
    label[4:8, 5:9, 1:3] = 2
    out.append(_Case(r.standard_normal((n, n, z)).astype(np.float32), label))
  return out


def test_patch_batches_are_cut_from_the_volumes_and_a_function_of_the_step():
  cases = _cases()
  sampler = patches.PatchSampler(cases, batch_size=6, patch_shape=(8, 8, 4),
                                 foreground_fraction=1.0, seed=3, stream=1)
  batch = sampler.batch(5)
  assert batch["image"].shape == (6, 8, 8, 4, 1) and batch["label"].shape == (6, 8, 8, 4)
  np.testing.assert_array_equal(batch["labelled"], np.ones(6))
  again = sampler.batch(5)
  np.testing.assert_array_equal(batch["image"], again["image"])
  assert not np.array_equal(sampler.batch(6)["image"], batch["image"])
  for (ci, x, y, z), image, label in zip(sampler.corners(5), batch["image"], batch["label"]):
    c = cases[ci]
    depth = min(4, c.image.shape[2] - z)
    np.testing.assert_array_equal(image[:, :, :depth, 0], c.image[x:x + 8, y:y + 8, z:z + depth])
    np.testing.assert_array_equal(label[:, :, :depth], c.label[x:x + 8, y:y + 8, z:z + depth])
    assert np.all(image[:, :, depth:, 0] == c.image.min())   # padding below a shallow volume
    assert (label == 2).any()                                 # foreground_fraction = 1


def test_sliding_window_reproduces_a_voxelwise_predictor_with_one_input_shape():
  """A per-voxel rule gives the same labels through overlapping windows as applied directly."""
  volume = np.random.default_rng(1).standard_normal((21, 18, 11)).astype(np.float32)
  shapes = set()

  def predict(state, x, modality):
    shapes.add(x.shape)
    classes = (x[..., 0] > 0.5).astype(int) + (x[..., 0] > 1.5).astype(int)
    return np.eye(3, dtype=np.float32)[classes]

  got = patches.predict_volume_patches(predict, None, "ct", volume, patch_shape=(8, 8, 4),
                                       batch_size=3, overlap=0.5)
  expected = (volume > 0.5).astype(np.uint8) + (volume > 1.5)
  np.testing.assert_array_equal(got, expected)
  assert shapes == {(3, 8, 8, 4, 1)}
  # ceil((21 - 8) / 4) + 1 = 5 windows spread evenly from 0 to 13: 0, 3.25, 6.5, 9.75, 13.
  assert patches.window_starts(21, 8, 0.5) == [0, 3, 6, 10, 13]
  assert patches.window_starts(6, 8, 0.5) == [0]
  with pytest.raises(ValueError, match="overlap"):
    patches.window_starts(21, 8, 1.0)


def test_ummkd_3d_trains_and_evaluates_volumes(tmp_path):
  config = ummkd_3d.get_config("tiny")
  config.data.root = str(tmp_path / "phantom")
  config.train.steps = 4
  config.eval.metrics = ("dice",)
  config.eval.save_predictions = 0
  summary = train.train_and_evaluate(config, tmp_path / "run")
  assert config.model.ndim == 3 and config.loss.kd_weight == 0.0
  for m in ("mr", "ct"):
    block = summary["modalities"][m]
    assert block["per_case"] and 0.0 <= block["mean"]["dice"] <= 1.0
  lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
  rows = [json.loads(line) for line in lines]
  assert any("loss" in r for r in rows)
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
