"""Faults a user hits, each a one-line error naming what is wrong, and nothing written where it
should not be: a misspelled config override, a workdir that is a file or cannot be created,
evaluating a workdir that holds no run, a diverged run's message, non-finite metrics in JSON."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from configs import common
from unpaired_seg import config_schema, train, workdir
from unpaired_seg import bookkeeping

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _main(*args):
  return subprocess.run([sys.executable, "-m", "unpaired_seg.main", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


def test_a_misspelled_override_and_a_file_workdir_are_one_line_errors(tmp_path):
  out = _main("--config=configs/joint.py:tiny", "--config.train.stepz=3",
              f"--workdir={tmp_path / 'run'}")
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1] == (
      "error: --config.train.stepz: no such config key (did you mean 'steps'?)")
  assert "Traceback" not in out.stderr and not (tmp_path / "run").exists()
  afile = tmp_path / "afile"
  afile.write_text("")
  out = _main("--config=configs/joint.py:tiny", f"--workdir={afile}")
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == f"error: --workdir={afile}: is a file, not a folder"


def test_a_workdir_that_cannot_be_made_or_written_names_itself(tmp_path):
  blocked = tmp_path / "afile"
  blocked.write_text("")
  with pytest.raises(train.WorkdirError, match="cannot be created"):
    workdir.check_workdir(blocked / "run")
  if os.geteuid() != 0:   # root writes anywhere
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    with pytest.raises(train.WorkdirError, match="is not writable"):
      workdir.check_workdir(locked)


def test_evaluating_a_workdir_without_a_run_writes_nothing(tmp_path):
  config = common.get_base_config(tiny=True)
  config.method = "joint"
  with pytest.raises(train.WorkdirError, match="no checkpoint to evaluate"):
    train.evaluate(config, tmp_path / "missing")
  assert not (tmp_path / "missing").exists()


def test_the_divergence_message_says_whether_a_checkpoint_is_kept():
  with pytest.raises(train.TrainingDiverged, match="no checkpoint was saved"):
    bookkeeping.check_finite(7, {"loss": float("nan")}, None)
  with pytest.raises(train.TrainingDiverged, match=r"last good checkpoint \(step 5\) is kept"):
    bookkeeping.check_finite(7, {"loss": float("inf")}, 5)
  bookkeeping.check_finite(7, {"loss": 1.0}, None)   # finite: nothing raised


def test_non_finite_metrics_are_written_as_null(tmp_path):
  writer = bookkeeping.MetricWriter(tmp_path, resume_step=0)
  writer.write(1, {"loss": float("nan"), "dice": 0.5, "grad_norm": float("inf")})
  writer.close()

  def strict(name):
    raise ValueError(f"{name} is not JSON")

  row = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=strict)
  assert row["loss"] is None and row["grad_norm"] is None and row["dice"] == 0.5


def test_a_resume_with_changed_keys_lists_them_and_refuses_unless_allowed(tmp_path):
  config = common.get_base_config(tiny=True)
  config.method = "joint"
  (tmp_path / "checkpoints" / "latest" / "4").mkdir(parents=True)
  (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
  assert workdir.changed_keys(tmp_path, config) == []
  config.train.steps += 10                       # extending a run: allowed
  assert workdir.changed_keys(tmp_path, config) == []
  config.train.learning_rate = 0.5
  config.data.image_size = (64, 64)
  changed = workdir.changed_keys(tmp_path, config)
  assert [c.split(" ")[0] for c in changed] == ["data.image_size", "train.learning_rate"]
  assert "-> 0.5)" in changed[1]
  with pytest.raises(config_schema.ConfigError, match="train.learning_rate"):
    train.setup_workdir(config, tmp_path, resuming_check=True)
  train.setup_workdir(config, tmp_path, resuming_check=True, allow_config_change=True)
  assert json.loads((tmp_path / "config.json").read_text())["train"]["learning_rate"] == 0.5


def test_the_data_commands_list_their_flags():
  for module, expected in (("unpaired_seg.prepare", ("--input", "--output", "--spacing")),
                           ("unpaired_seg.plan", ("--data", "--budget_minutes"))):
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert all(flag in out.stdout + out.stderr for flag in expected), module


def test_a_live_runs_lock_keeps_a_second_run_out_and_a_dead_ones_does_not(tmp_path):
  lock = workdir.WorkdirLock(tmp_path).acquire()
  assert json.loads((tmp_path / workdir.LOCK_FILE).read_text())["pid"] == os.getpid()
  # Another live process's lock: this process's parent stands in for it.
  (tmp_path / workdir.LOCK_FILE).write_text(json.dumps(
      {"host": socket.gethostname(), "pid": os.getppid()}))
  config = common.get_base_config(tiny=True)
  config.method = "joint"
  with pytest.raises(train.WorkdirError, match=f"in use by process {os.getppid()}"):
    train.train_and_evaluate(config, tmp_path)
  assert not (tmp_path / "config.json").exists()                 # nothing written
  # A dead process's lock: a finished child's pid.
  child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                         capture_output=True, text=True)
  (tmp_path / workdir.LOCK_FILE).write_text(json.dumps(
      {"host": socket.gethostname(), "pid": int(child.stdout)}))
  with workdir.WorkdirLock(tmp_path):
    assert json.loads((tmp_path / workdir.LOCK_FILE).read_text())["pid"] == os.getpid()
  assert not (tmp_path / workdir.LOCK_FILE).exists()
  lock.release()


def test_json_outputs_are_readable_by_others(tmp_path):
  from unpaired_seg.data import pipeline
  pipeline.write_json_atomic(tmp_path / "summary.json", {"a": 1})
  assert (tmp_path / "summary.json").stat().st_mode & 0o777 == 0o644


def test_a_truncated_newest_checkpoint_is_skipped_and_the_previous_good_one_restored(tmp_path):
  import jax.numpy as jnp
  checkpoints = bookkeeping.Checkpoints(tmp_path, keep=3)
  good = {"w": jnp.arange(6.0), "b": jnp.ones(3)}
  checkpoints.save_latest(4, good)
  checkpoints.save_latest(8, {"w": jnp.arange(6.0) * 2, "b": jnp.zeros(3)})
  checkpoints.wait()
  for f in (tmp_path / "checkpoints" / "latest" / "8").rglob("*"):   # a write cut short
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[:10])
  restored, step = checkpoints.restore("latest", good)
  assert step == 4
  np.testing.assert_array_equal(restored["w"], good["w"])
  checkpoints.wait()
  assert checkpoints.latest.all_steps() == [4]     # the broken step is gone, to be saved anew
  checkpoints.close()


def test_a_split_without_test_or_validation_subjects_stops_before_training(tmp_path):
  from unpaired_seg.data import pipeline
  config = common.get_base_config(tiny=True)
  config.method = "joint"
  config.data.split.update(train=1.0, val=0.0, test=0.0)
  with pytest.raises(pipeline.SplitError, match="'mr' gets no test subject"):
    train.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run" / "splits.json").exists()
  assert not (tmp_path / "run" / "checkpoints").exists()
  parts = {"train": ["a"], "val": [], "test": ["b"]}
  with pytest.raises(pipeline.SplitError, match="no validation subject"):
    pipeline.check_split_sizes({"modalities": {"ct": parts}}, require_val=True)
  pipeline.check_split_sizes({"modalities": {"ct": parts}}, require_val=False)
