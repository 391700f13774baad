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
