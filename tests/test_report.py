"""`compare` and `report`: tables, paired statistics against direct scipy calls, Holm by hand,
pooling of folds, figures, and a run's progress plot.

  python -m pytest -q tests/test_report.py
"""

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats

from unpaired_seg import compare
from unpaired_seg import report
from unpaired_seg.data import dataset as ds

NAN = float("nan")
PNG = b"\x89PNG\r\n\x1a\n"
# Two methods on the same MR test volumes (B also has c5, and lists them in another order).
A = {"c1": {"liver": 0.90, "spleen": 0.60}, "c2": {"liver": 0.80, "spleen": None},
     "c3": {"liver": 0.85, "spleen": 0.50}, "c4": {"liver": 0.70, "spleen": 0.40}}
B = {"c5": {"liver": 0.99, "spleen": 0.99}, "c3": {"liver": 0.86, "spleen": 0.45},
     "c1": {"liver": 0.80, "spleen": 0.62}, "c4": {"liver": 0.50, "spleen": 0.30},
     "c2": {"liver": 0.70, "spleen": 0.20}}


def _write_run(folder, per_case, method="m", metric="dice", hd95=None):
  cases = {}
  for case, classes in per_case.items():
    cases[case] = {cls: {metric: v, **({"hd95": hd95[case][cls]} if hd95 else {})}
                   for cls, v in classes.items()}
  summary = {"method": method, "class_names": ["background", "liver", "spleen"],
             "modality_order": ["mr"], "modalities": {"mr": {"per_case": cases}}}
  folder.mkdir(parents=True)
  (folder / "summary.json").write_text(json.dumps(summary))
  return folder


@pytest.fixture()
def runs(tmp_path):
  hd = {c: {"liver": 10.0 - 5 * v["liver"], "spleen": 4.0} for c, v in B.items()}
  return (_write_run(tmp_path / "a", A), _write_run(tmp_path / "b", B, hd95=hd))


def test_holm_by_hand():
  # Sorted: 0.01 * 3 = 0.03; 0.03 * 2 = 0.06; 0.04 * 1 = 0.04 -> running max 0.06. NaN skipped.
  np.testing.assert_allclose(report.holm([0.04, 0.01, NAN, 0.03]), [0.06, 0.03, NAN, 0.06])
  np.testing.assert_allclose(report.holm([0.5, 0.9]), [1.0, 1.0])        # capped at 1


def _exact_sign_flip_p(a, b):
  """Two-sided exact paired permutation p-value of the mean difference, by enumeration."""
  d = np.asarray(a) - np.asarray(b)
  observed = abs(d.mean())
  flips = [abs((d * np.array(s)).mean()) for s in itertools.product((1, -1), repeat=d.size)]
  return np.mean(np.array(flips) >= observed - 1e-12)


def test_paired_tests_equal_direct_scipy_calls():
  a, b = [0.9, 0.8, 0.85, 0.7, 0.66], [0.8, 0.7, 0.86, 0.5, 0.6]
  got = report.paired_tests(a, b, seed=3)
  assert got["n"] == 5 and got["mean_difference"] == pytest.approx(np.mean(np.subtract(a, b)))
  assert got["t_test"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-12)
  assert got["wilcoxon"] == pytest.approx(stats.wilcoxon(a, b).pvalue, rel=1e-12)
  assert got["permutation"] == pytest.approx(_exact_sign_flip_p(a, b), rel=1e-9)
  # NaN pairs are dropped; too few pairs or no difference give NaN, not a crash.
  assert report.paired_tests([0.1, NAN, 0.3], [0.2, 0.5, 0.1])["n"] == 2
  assert math.isnan(report.paired_tests([0.5], [0.4])["t_test"])
  assert math.isnan(report.paired_tests([0.5, 0.6], [0.5, 0.6])["wilcoxon"])


def test_compare_pairs_volumes_by_case_and_corrects_per_metric(runs):
  collected = report.collect([("a", runs[0]), ("b", runs[1])])
  rows = report.compare_methods(collected, ["dice"], n_resamples=999, seed=0)
  by_class = {r["class"]: r for r in rows}
  assert list(by_class) == ["liver", "spleen", "mean"]
  # liver: the four common cases c1..c4 (c5 is B's alone), paired by case id.
  a, b = [0.90, 0.80, 0.85, 0.70], [0.80, 0.70, 0.86, 0.50]
  liver = by_class["liver"]
  assert liver["n"] == 4 and (liver["method_a"], liver["method_b"]) == ("a", "b")
  assert liver["t_test"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-12)
  assert liver["wilcoxon"] == pytest.approx(stats.wilcoxon(a, b).pvalue, rel=1e-12)
  assert liver["permutation"] == pytest.approx(_exact_sign_flip_p(a, b), rel=1e-9)
  # spleen: A's c2 is null, so three pairs.
  assert by_class["spleen"]["n"] == 3
  a_s, b_s = [0.60, 0.50, 0.40], [0.62, 0.45, 0.30]
  assert by_class["spleen"]["t_test"] == pytest.approx(stats.ttest_rel(a_s, b_s).pvalue)
  # mean: each volume's mean over its finite classes.
  a_m = [0.75, 0.80, 0.675, 0.55]
  b_m = [0.71, 0.45, 0.655, 0.40]
  assert by_class["mean"]["t_test"] == pytest.approx(stats.ttest_rel(a_m, b_m).pvalue)
  for test in report.TESTS:
    np.testing.assert_allclose([r[f"{test}_holm"] for r in rows],
                               report.holm([r[test] for r in rows]))


def test_tables_by_hand_and_pooled_folds(runs, tmp_path):
  collected = report.collect([("a", runs[0]), ("b", runs[1])])
  rows = report.summary_rows(collected, ["dice"])
  liver_a = next(r for r in rows if (r["method"], r["class"]) == ("a", "liver"))
  assert liver_a["n"] == 4
  assert liver_a["mean"] == pytest.approx(np.mean([0.9, 0.8, 0.85, 0.7]))
  assert liver_a["std"] == pytest.approx(np.std([0.9, 0.8, 0.85, 0.7], ddof=1))
  table = report.markdown_table(rows, "dice")
  assert "| method | mr liver | mr spleen | mr mean |" in table
  assert f"| a | 0.812 ± {np.std([0.9, 0.8, 0.85, 0.7], ddof=1):.3f} (4) |" in table
  assert "0.500 ± 0.100 (3)" in table                                  # A's spleen, c2 null
  assert report.to_csv(rows).splitlines()[0] == "method,modality,class,metric,mean,std,n"
  # Folds: two runs of one name pool their (disjoint) volumes; an overlap is refused.
  f0 = _write_run(tmp_path / "f0", {"c1": A["c1"], "c2": A["c2"]})
  f1 = _write_run(tmp_path / "f1", {"c3": A["c3"], "c4": A["c4"]})
  pooled = report.collect([("a", f0), ("a", f1)])
  assert sorted(pooled["a"]["mr"]) == ["c1", "c2", "c3", "c4"]
  with pytest.raises(report.ReportError, match=f"{f0}.*mr/c1.*disjoint"):
    report.collect([("a", f0), ("a", f0)])
  with pytest.raises(report.ReportError, match="summary not found"):
    report.collect([("x", tmp_path)])
  assert report.parse_run("joint=/x/y") == ("joint", report.pathlib.Path("/x/y"))
  assert report.parse_run(str(f0))[0] == "f0"


def _write_predictions(run, case, shift):
  """A saved prediction, its reference and image on a 12 x 10 x 3 LPS grid."""
  affine = np.diag([-1.5, -1.5, 4.0, 1.0])
  ref = np.zeros((12, 10, 3), np.uint8)
  ref[3:8, 2:6, 1] = 1
  image = np.random.default_rng(0).normal(size=ref.shape).astype(np.float32) + 3 * ref
  folder = run / "predictions"
  ds.save_nifti(folder / "mr" / f"{case}_pred.nii.gz", np.roll(ref, shift, axis=0), affine)
  ds.save_nifti(folder / "mr" / f"{case}_ref.nii.gz", ref, affine)
  ds.save_nifti(run / "image.nii.gz", image, affine)
  (folder / "index.json").write_text(json.dumps({"mr": {case: {
      "prediction": f"mr/{case}_pred.nii.gz", "reference": f"mr/{case}_ref.nii.gz",
      "image": str(run / "image.nii.gz"), "grid": "source"}}}))


def test_compare_writes_tables_tests_plots_and_overlays(runs, tmp_path):
  _write_predictions(runs[0], "c1", 0)
  _write_predictions(runs[1], "c1", 1)
  out = tmp_path / "out"
  written = compare.run([f"A={runs[0]}", f"B={runs[1]}"], out, ["dice", "hd95"], overlays=2,
                        permutations=99)
  names = {kind: sorted(p.name for p in paths) for kind, paths in written.items()}
  assert names["tables"] == ["table.csv", "table_dice.md", "table_hd95.md"]
  assert names["tests"] == ["tests.csv", "tests.md"]
  assert names["plots"] == ["boxplot_dice_mr.png", "boxplot_hd95_mr.png"]
  assert names["overlays"] == ["mr_c1.png"]
  for path in written["plots"] + written["overlays"]:
    assert path.read_bytes()[:8] == PNG
  tests = (out / "tests.md").read_text()
  assert "| dice | mr | liver | A | B | 4 |" in tests
  # hd95 exists only in B: no pairs, n/a rather than a crash.
  assert "| hd95 | mr | liver | A | B | 0 |" in tests
  with pytest.raises(report.ReportError, match="--reference='C'"):
    compare.run([f"A={runs[0]}", f"B={runs[1]}"], out, ["dice"], reference="C", overlays=0)


def test_progress_plot_from_metrics_jsonl(tmp_path):
  assert not report.plot_progress(tmp_path / "metrics.jsonl", tmp_path / "progress.png")
  rows = [{"step": 2, "loss": 1.5, "seg_mr": 0.8, "steps_per_s": 3.0},
          {"step": 4, "loss": 1.1, "seg_mr": 0.6, "steps_per_s": 3.1},
          {"step": 4, "val_dice": 0.3, "val_dice_mr": 0.2}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  assert report.plot_progress(tmp_path / "metrics.jsonl", tmp_path / "progress.png")
  assert (tmp_path / "progress.png").read_bytes()[:8] == PNG
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_progress_plot_adds_validation_dice_against_wall_time(tmp_path, monkeypatch):
  rows = [{"step": 2, "loss": 1.5, "wall_s": 30.0}, {"step": 4, "val_dice": 0.3, "wall_s": 90.0},
          {"step": 8, "val_dice": 0.5, "wall_s": 150.0}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  saved = []
  monkeypatch.setattr(report, "_save", lambda fig, path: saved.append(fig))
  assert report.plot_progress(tmp_path / "metrics.jsonl", tmp_path / "progress.png")
  axes = saved[0].axes
  assert len(axes) == 3 and axes[2].get_xlabel() == "wall time (minutes)"
  x, y = axes[2].lines[0].get_data()
  np.testing.assert_allclose(x, [1.5, 2.5])             # minutes
  np.testing.assert_allclose(y, [0.3, 0.5])
