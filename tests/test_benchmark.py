"""The benchmark command's figures on the tiny config."""

from configs import common
from unpaired_seg import benchmark


def test_benchmark_reports_consistent_figures():
  config = common.get_base_config(tiny=True)
  figures = benchmark.run(config, steps=2, num_classes=5)
  assert figures["devices"] == 2 and figures["backend"] == "cpu"
  assert figures["step_ms"] > 0 and figures["compile_first_step_s"] > 0
  assert abs(figures["steps_per_s"] - 1000 / figures["step_ms"]) < 0.05 * figures["steps_per_s"] + 0.01
  assert figures["train_slices_per_s"] > figures["steps_per_s"]
  assert figures["parameters"] > 0


def test_random_batch_carries_the_partner_candidates_mmsdnet_declares():
  from unpaired_seg import methods
  config = benchmark.load_config(benchmark.CONFIG_DIR / "mmsdnet.py", "tiny")
  method = methods.create(config, 5, tuple(config.data.modalities))
  batch = benchmark.random_batch(config, method, 5)
  h, w = config.data.image_size
  for m in config.data.modalities:
    assert batch[m]["image"].shape == (config.train.batch_size, h, w, 1)
    assert batch[m]["partner_image"].shape == (config.train.batch_size, method.k, h, w, 1)


def test_every_config_file_loads_for_the_all_table():
  files = benchmark.all_config_files()
  assert {"joint", "mmsdnet", "dualstream"} <= {p.stem for p in files}
  assert "common" not in {p.stem for p in files}
  for path in files:
    assert benchmark.load_config(path, "tiny").method
  table = benchmark.markdown_table([{"config": "configs/joint.py", "step_ms": 1.5}])
  assert table.splitlines()[2].startswith("| configs/joint.py |") and "1.5" in table
