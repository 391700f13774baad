"""The pieces of multi-host training that one process can check: rows, sharding, host batches.

tests/test_multihost.py runs the real thing with two processes.
"""

import jax
import numpy as np
import pytest

from configs import dafnet, joint, ummkd_3d
from unpaired_seg import distributed, methods
from unpaired_seg.data import loader


def test_one_process_holds_every_row_of_the_global_batch():
  mesh = distributed.make_mesh()
  assert jax.device_count() == 2                       # tests/conftest.py: two CPU devices
  assert distributed.local_rows(mesh, 8) == slice(0, 8)


def test_sharding_this_process_rows_equals_sharding_the_global_batch():
  mesh = distributed.make_mesh()
  x = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
  whole = distributed.shard_batch({"x": x}, mesh)["x"]
  rows = distributed.shard_batch({"x": x[distributed.local_rows(mesh, 4)]}, mesh, 4)["x"]
  assert rows.shape == whole.shape == (4, 3) and rows.sharding == whole.sharding
  np.testing.assert_array_equal(np.asarray(rows), x)


def test_replicate_and_local_copy_keep_the_values():
  mesh = distributed.make_mesh()
  tree = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "step": np.array(3, np.int32)}
  on_mesh = distributed.replicate(tree, mesh)
  assert on_mesh["w"].sharding.is_fully_replicated
  local = distributed.local_copy(on_mesh)
  np.testing.assert_array_equal(np.asarray(local["w"]), tree["w"])
  assert distributed.broadcast_from_main(0.25) == 0.25
  distributed.sync("single_process")                  # a no-op, and no error, for one process


def _rows_match(method, data, global_batch: int):
  """A process's rows of the host batch equal those rows of the whole batch, for each split."""
  whole = method.host_batch(data, 3)
  for rows in (slice(0, global_batch // 2), slice(global_batch // 2, global_batch)):
    part = method.host_batch(data, 3, rows)
    for m in whole:
      assert sorted(part[m]) == sorted(whole[m])
      for key in whole[m]:
        np.testing.assert_array_equal(part[m][key], whole[m][key][rows], err_msg=f"{m} {key}")


@pytest.mark.parametrize("config_module", [joint, dafnet, ummkd_3d],
                         ids=["slices", "mmsdnet_pairs", "patches_3d"])
def test_host_batch_rows_are_those_rows_of_the_global_batch(config_module, tmp_path):
  config = config_module.get_config("tiny")
  config.data.root = str(tmp_path / "phantom")
  data = loader.load_data(config, tmp_path / "work")
  method = methods.create(config, num_classes=len(data.class_names), modalities=data.modalities)
  _rows_match(method, data, config.train.batch_size)


def test_nothing_is_written_by_a_process_other_than_0(tmp_path):
  config = joint.get_config("tiny")
  config.data.root = str(tmp_path / "phantom")
  config.data.target_modality, config.data.label_fraction = "ct", 0.5
  workdir = tmp_path / "work"
  workdir.mkdir()
  silent = loader.load_data(config, workdir, write=False)
  assert list(workdir.iterdir()) == []
  written = loader.load_data(config, workdir)
  assert sorted(p.name for p in workdir.iterdir()) == [
      "labelled_subjects.json", "model_info.json", "normalization.json", "splits.json"]
  assert silent.splits == written.splits
  for m in written.modalities:
    np.testing.assert_array_equal(silent.samplers[m].indices(5), written.samplers[m].indices(5))
