"""The trainer end to end on a tiny config: outputs, resume parity, NaN stop, checkpoints, sharding."""

import json
import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from unpaired_seg import train
from unpaired_seg import bookkeeping
from unpaired_seg import distributed
from unpaired_seg.data import loader


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
  return tmp_path_factory.mktemp("phantom") / "unpaired"


def _config(phantom_root, method="joint", steps=8):
  config = common.get_base_config(tiny=True)
  config.method = method
  config.data.root = str(phantom_root)
  config.train.steps = steps
  return config


def _leaves(workdir, which="latest"):
  manager = bookkeeping.Checkpoints(workdir, keep=2)
  restored = manager.latest if which == "latest" else manager.best
  step = restored.latest_step()
  tree = restored.restore(step)
  manager.close()
  return step, jax.tree.leaves(tree)


def test_run_writes_everything_and_the_summary_has_the_documented_shape(phantom_root, tmp_path):
  workdir = tmp_path / "run"
  summary = train.train_and_evaluate(_config(phantom_root), workdir)
  for name in ("config.json", "splits.json", "versions.json", "metrics.jsonl", "summary.json",
               "summary.txt", "train.INFO"):
    assert (workdir / name).exists(), name
  assert list((workdir / "tb").glob("events.out.tfevents.*"))
  assert (workdir / "checkpoints" / "latest" / "8").is_dir()
  assert json.loads((workdir / "config.json").read_text())["method"] == "joint"
  on_disk = json.loads((workdir / "summary.json").read_text())
  assert on_disk == summary
  assert on_disk["method"] == "joint" and on_disk["dataset"]
  for m in ("mr", "ct"):
    block = on_disk["modalities"][m]
    assert set(block["per_class"]) == {"liver", "right_kidney", "left_kidney", "spleen"}
    assert 0.0 <= block["mean"]["dice"] <= 1.0
    for case, classes in block["per_case"].items():
      assert set(classes) == set(block["per_class"])
      assert all("dice" in v for v in classes.values())
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "loss" in r] == [2, 4, 6, 8]
  assert any("val_dice" in r for r in rows)


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(phantom_root, tmp_path):
  straight = tmp_path / "straight"
  train.train_and_evaluate(_config(phantom_root, steps=8), straight)
  resumed = tmp_path / "resumed"
  train.train_and_evaluate(_config(phantom_root, steps=4), resumed)      # stops at step 4
  assert sorted(int(p.name) for p in (resumed / "checkpoints" / "latest").iterdir()
                if p.name.isdigit()) == [4]
  train.train_and_evaluate(_config(phantom_root, steps=8), resumed)      # the same command again
  step_a, leaves_a = _leaves(straight)
  step_b, leaves_b = _leaves(resumed)
  assert step_a == step_b == 8
  assert len(leaves_a) == len(leaves_b)
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The metrics of the resumed run hold each step once.
  steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()
           if "loss" in line]
  assert steps == [2, 4, 6, 8]


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(
    phantom_root, tmp_path, monkeypatch):
  real = train.make_train_step

  def poisoned(method, config, variant=None):
    step = real(method, config, variant)

    def wrapped(state, batch):
      state, metrics = step(state, batch)
      # From step 6 on, the loss is NaN (as after a divergence).
      metrics = dict(metrics, loss=jax.numpy.where(state.step >= 6, jax.numpy.nan, metrics["loss"]))
      return state, metrics
    return wrapped

  monkeypatch.setattr(train, "make_train_step", poisoned)
  workdir = tmp_path / "nan"
  with pytest.raises(train.TrainingDiverged, match=r"step 6: non-finite .*loss"):
    train.train_and_evaluate(_config(phantom_root), workdir)
  kept = sorted(int(p.name) for p in (workdir / "checkpoints" / "latest").iterdir()
                if p.name.isdigit())
  assert kept == [4]
  assert not (workdir / "summary.json").exists()


def test_evaluate_mode_rewrites_the_summary_from_the_checkpoint(phantom_root, tmp_path):
  workdir = tmp_path / "ev"
  first = train.train_and_evaluate(_config(phantom_root), workdir)
  (workdir / "summary.json").unlink()
  again = train.evaluate(_config(phantom_root), workdir)
  assert again["modalities"] == first["modalities"]
  config = _config(phantom_root)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    train.evaluate(config, tmp_path / "empty")


def test_batches_are_sharded_over_the_data_axis():
  mesh = distributed.make_mesh()
  assert mesh.shape["data"] == jax.device_count() == 2      # tests/conftest.py: two CPU devices
  batch = {"mr": {"image": np.zeros((4, 8, 8, 1), np.float32)}}
  sharded = distributed.shard_batch(batch, mesh)
  assert sharded["mr"]["image"].sharding.spec == P("data")
  shards = sharded["mr"]["image"].addressable_shards
  assert sorted(s.data.shape[0] for s in shards) == [2, 2]


def test_odd_batch_size_for_the_mesh_is_named(phantom_root, tmp_path):
  config = _config(phantom_root)
  config.train.batch_size = 3
  with pytest.raises(ValueError, match="train.batch_size"):
    train.train_and_evaluate(config, tmp_path / "odd")


def test_label_fraction_keeps_labels_of_whole_subjects(phantom_root, tmp_path):
  config = _config(phantom_root)
  config.data.split = {"train": 0.5, "val": 0.25, "test": 0.25}
  config.data.target_modality = "ct"
  config.data.label_fraction = 0.5
  workdir = tmp_path / "semi"
  workdir.mkdir()
  data = loader.load_data(config, workdir)
  kept = json.loads((workdir / "labelled_subjects.json").read_text())["ct"]
  train_ct = data.cases["train"]["ct"]
  subjects = {c.subject for c in train_ct}
  assert len(kept) == round(0.5 * len(subjects)) and set(kept) <= subjects
  for c in train_ct:
    assert (c.label is not None) == (c.subject in kept)
  assert all(c.label is not None for c in data.cases["train"]["mr"])
  assert all(c.label is not None for c in data.cases["test"]["ct"])   # evaluation keeps labels
  # The batch flags exactly the samples drawn from labelled subjects; MR stays fully labelled.
  for step in range(4):
    batch = loader.sampler_batch(data, step)
    idx = data.samplers["ct"].indices(step)[:, 0]
    expected = [float(train_ct[i].subject in kept) for i in idx]
    np.testing.assert_array_equal(batch["ct"]["labelled"], expected)
    assert batch["mr"]["labelled"].min() == 1.0
  # Zero-shot: no CT label at all, and a reload reads the same choice back.
  config.data.label_fraction = 0.0
  zero = tmp_path / "zero"
  zero.mkdir()
  data0 = loader.load_data(config, zero)
  assert all(c.label is None for c in data0.cases["train"]["ct"])
  assert loader.load_data(config, zero).cases["train"]["ct"][0].label is None


def test_resume_after_a_kill_between_a_best_and_a_latest_save(phantom_root, tmp_path):
  """A kill can leave a 'best' checkpoint newer than the latest one (and a partial save)."""
  import shutil
  workdir = tmp_path / "killed"
  train.train_and_evaluate(_config(phantom_root, steps=8), workdir)
  # As if killed while writing step 8: the latest step-8 save never finished, best/8 did.
  latest8 = workdir / "checkpoints" / "latest" / "8"
  shutil.move(latest8, latest8.with_name("8.orbax-checkpoint-tmp"))
  (workdir / "summary.json").unlink()
  train.train_and_evaluate(_config(phantom_root, steps=8), workdir)
  assert (workdir / "summary.json").exists()
  assert (workdir / "checkpoints" / "latest" / "8").is_dir()


def test_load_data_warns_when_the_training_views_clip_an_organ(phantom_root, tmp_path, caplog):
  config = _config(phantom_root)
  caplog.set_level("INFO")
  loader.load_data(config, tmp_path / "whole")        # the phantom's views are its whole slices
  assert "training views keep" in caplog.text and "data.image_size" not in caplog.text
  caplog.clear()
  config.data.image_size = (12, 12)
  data = loader.load_data(config, tmp_path / "small")
  clipped = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert clipped and all("config key 'data.image_size'" in m for m in clipped), caplog.text
  coverage = loader.pipeline.view_coverage(data.cases["train"]["mr"], data.class_names)
  assert min(coverage.values()) < loader.VIEW_COVERAGE_WARNING


def test_checkpoints_under_a_relative_workdir_are_saved_and_restored(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)   # as `--workdir=runs/mmsdnet` from the repository root
  state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.array(3, np.int32)}
  manager = bookkeeping.Checkpoints(pathlib.Path("runs") / "job", keep=2)
  manager.save_latest(3, state, force=True)
  manager.save_best(3, state, val_dice=0.5)
  manager.wait()
  for which in ("latest", "best"):
    restored, step = manager.restore(which, state)
    assert step == 3
    np.testing.assert_array_equal(restored["w"], state["w"])
  manager.close()
  assert (tmp_path / "runs" / "job" / "checkpoints" / "latest" / "3").is_dir()


def test_metric_rows_carry_wall_time_that_continues_across_a_resume(tmp_path):
  writer = bookkeeping.MetricWriter(tmp_path, resume_step=0)
  writer.write(1, {"loss": 1.0})
  writer.write(2, {"loss": 0.9})
  writer.close()
  rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert 0 <= rows[0]["wall_s"] <= rows[1]["wall_s"]
  # Resumed from step 1: row 2 is dropped and the clock goes on from row 1's time.
  rows[0]["wall_s"] = 100.0
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  writer = bookkeeping.MetricWriter(tmp_path, resume_step=1)
  writer.write(2, {"loss": 0.8})
  writer.close()
  rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows] == [1, 2] and 100.0 <= rows[1]["wall_s"] < 110.0
