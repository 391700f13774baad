"""Comparing runs: tables, paired statistics, box plots, overlays; and a run's progress plot.

Everything starts from the runs' summary.json files (per case, per class, per metric, on the same
test volumes when the runs share a split). The statistics follow the field's practice: the unit is
the test volume; mean +- std per class and modality; between two methods on the SAME volumes a
paired t-test (`scipy.stats.ttest_rel`), the Wilcoxon signed-rank test (`scipy.stats.wilcoxon`)
and a paired permutation test of the mean difference (`scipy.stats.permutation_test`,
permutation_type='samples'), each with Holm's correction over all comparisons of that metric.

  python -m unpaired_seg.compare runs/joint runs/individual --output=/tmp/compare

Runs given the same name (NAME=RUN) are pooled, e.g. the folds of one method's cross-validation:
their test cases must be disjoint. Plots use matplotlib's Agg backend (no display needed).
"""

import csv
import io
import itertools
import json
import math
import os
import pathlib
import tempfile
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

# Per-volume mean over the foreground classes, reported beside the classes.
MEAN_CLASS = "mean"
TESTS = ("t_test", "wilcoxon", "permutation")
LOWER_IS_BETTER = ("hausdorff", "hd95", "assd")


class ReportError(ValueError):
  """A run, a summary or an argument of the comparison is unusable; the message names it."""


# =============================================================================================
# Reading runs.
# =============================================================================================

def load_summary(run: os.PathLike) -> dict:
  """The summary.json of a run folder (or the file itself)."""
  path = pathlib.Path(run)
  if path.is_dir():
    path = path / "summary.json"
  try:
    summary = json.loads(path.read_text())
  except FileNotFoundError:
    raise ReportError(f"{path}: summary not found (evaluate the run first)") from None
  except (OSError, json.JSONDecodeError) as e:
    raise ReportError(f"{path}: cannot read the summary: {e}") from e
  if not isinstance(summary, dict) or not isinstance(summary.get("modalities"), dict):
    raise ReportError(f"{path}: no 'modalities' block: not a summary.json")
  return summary


def parse_run(text: str) -> tuple[str, pathlib.Path]:
  """'NAME=PATH' or 'PATH' (named after its folder) -> (name, path)."""
  name, sep, path = str(text).partition("=")
  if not sep:
    path = name
    name = pathlib.Path(path).resolve().name
  if not name or not path:
    raise ReportError(f"run {text!r}: expected PATH or NAME=PATH")
  return name, pathlib.Path(path)


def collect(runs: Sequence[tuple[str, os.PathLike]]) -> dict:
  """Per-case values of every run, pooled by name.

  Args:
    runs: (name, run folder or summary.json) pairs; runs of one name are pooled.

  Returns:
    {name: {modality: {case: {class: {metric: value}}}}}, each case with an extra class
    `mean` (the mean over its finite foreground class values, per metric). None (JSON null)
    becomes NaN.
  """
  out: dict[str, dict] = {}
  for name, run in runs:
    summary = load_summary(run)
    pooled = out.setdefault(name, {})
    # summary.json is written with sorted keys; the run records the label and modality order.
    order = summary.get("class_names", [])
    for modality in _ordered(summary["modalities"], summary.get("modality_order", [])):
      cases = pooled.setdefault(modality, {})
      for case, classes in summary["modalities"][modality].get("per_case", {}).items():
        if case in cases:
          raise ReportError(f"{run}: case {modality}/{case} is already in another run named "
                            f"{name!r}; pooled runs (folds) must have disjoint test cases")
        cases[case] = _with_mean(classes, order)
  return out


def _ordered(keys, order: Sequence[str]) -> list[str]:
  return [k for k in order if k in keys] + [k for k in keys if k not in order]


def _with_mean(classes: Mapping[str, Mapping], order: Sequence[str]) -> dict:
  values = {c: {m: math.nan if v is None else float(v) for m, v in classes[c].items()}
            for c in _ordered(classes, order)}
  metric_names = sorted({m for ms in values.values() for m in ms})
  mean = {}
  for m in metric_names:
    finite = [ms[m] for ms in values.values() if m in ms and math.isfinite(ms[m])]
    mean[m] = float(np.mean(finite)) if finite else math.nan
  return {**values, MEAN_CLASS: mean}


def class_names(collected: Mapping, modality: str) -> list[str]:
  """Classes in first-seen order, `mean` last."""
  names = []
  for per_modality in collected.values():
    for classes in per_modality.get(modality, {}).values():
      names += [c for c in classes if c not in names and c != MEAN_CLASS]
  return names + [MEAN_CLASS]


def modalities_of(collected: Mapping) -> list[str]:
  names = []
  for per_modality in collected.values():
    names += [m for m in per_modality if m not in names]
  return names


def values_of(collected: Mapping, method: str, modality: str, cls: str,
              metric: str) -> dict[str, float]:
  """{case: value} of one method, modality, class and metric (NaN where undefined)."""
  cases = collected.get(method, {}).get(modality, {})
  return {case: classes.get(cls, {}).get(metric, math.nan) for case, classes in cases.items()}


# =============================================================================================
# Tables.
# =============================================================================================

def summary_rows(collected: Mapping, metrics: Sequence[str]) -> list[dict]:
  """One row per method, modality, class and metric: mean, sample std (ddof=1), n (finite)."""
  rows = []
  for method in collected:
    for modality in modalities_of(collected):
      for cls in class_names(collected, modality):
        for metric in metrics:
          v = np.array([x for x in values_of(collected, method, modality, cls, metric).values()
                        if math.isfinite(x)])
          rows.append({"method": method, "modality": modality, "class": cls, "metric": metric,
                       "mean": float(v.mean()) if v.size else math.nan,
                       "std": float(v.std(ddof=1)) if v.size >= 2 else math.nan,
                       "n": int(v.size)})
  return rows


def markdown_table(rows: Sequence[Mapping], metric: str, digits: int = 3) -> str:
  """Methods as rows, `<modality> <class>` as columns, cells 'mean ± std' (the papers' style)."""
  rows = [r for r in rows if r["metric"] == metric]
  columns = list(dict.fromkeys((r["modality"], r["class"]) for r in rows))
  methods = list(dict.fromkeys(r["method"] for r in rows))
  cell = {(r["method"], r["modality"], r["class"]): r for r in rows}
  unit = "" if metric in ("dice", "per_slice_dice", "surface_dice") else " (mm)"
  lines = [f"{metric}{unit}: mean ± std over test volumes (n)", "",
           "| method | " + " | ".join(f"{m} {c}" for m, c in columns) + " |",
           "| --- |" + " --- |" * len(columns)]
  for method in methods:
    cells = []
    for modality, cls in columns:
      r = cell.get((method, modality, cls))
      if r is None or not math.isfinite(r["mean"]):
        cells.append("n/a")
        continue
      std = f" ± {r['std']:.{digits}f}" if math.isfinite(r["std"]) else ""
      cells.append(f"{r['mean']:.{digits}f}{std} ({r['n']})")
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def to_csv(rows: Sequence[Mapping]) -> str:
  """Rows of dicts (same keys) as CSV; NaN is an empty cell."""
  if not rows:
    return ""
  out = io.StringIO()
  writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
  writer.writeheader()
  for r in rows:
    writer.writerow({k: "" if isinstance(v, float) and not math.isfinite(v) else v
                     for k, v in r.items()})
  return out.getvalue()


# =============================================================================================
# Paired statistics.
# =============================================================================================

def holm(pvalues: Sequence[float]) -> list[float]:
  """Holm's step-down adjusted p-values; NaN stays NaN and is not counted as a test.

  Sorted ascending, the i-th (from 0) of m p-values is multiplied by (m - i), made monotone
  (running maximum) and capped at 1.
  """
  p = np.asarray(pvalues, dtype=np.float64)
  adjusted = np.full(p.shape, np.nan)
  finite = np.flatnonzero(np.isfinite(p))
  order = finite[np.argsort(p[finite], kind="stable")]
  m, running = len(order), 0.0
  for i, index in enumerate(order):
    running = max(running, min(1.0, (m - i) * p[index]))
    adjusted[index] = running
  return adjusted.tolist()


def paired_tests(a: Sequence[float], b: Sequence[float], *, n_resamples: int = 9999,
                 seed: int = 0) -> dict:
  """The paired t-test, Wilcoxon signed-rank test and paired permutation test of a vs b.

  Args:
    a, b: values of two methods on the same volumes, in the same order (NaN pairs dropped).
    n_resamples: for the permutation test (scipy enumerates all 2^n sign flips when fewer).
    seed: the permutation test's random generator.

  Returns:
    {"n", "mean_a", "mean_b", "mean_difference" (a - b), "t_test", "wilcoxon", "permutation"}:
    two-sided p-values; NaN when a test is undefined (fewer than 2 pairs, all differences 0).
  """
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  keep = np.isfinite(a) & np.isfinite(b)
  a, b = a[keep], b[keep]
  out = {"n": int(a.size), "mean_a": _mean(a), "mean_b": _mean(b),
         "mean_difference": _mean(a - b), "t_test": math.nan, "wilcoxon": math.nan,
         "permutation": math.nan}
  if a.size < 2 or not np.any(a != b):
    return out
  out["t_test"] = float(stats.ttest_rel(a, b).pvalue)
  out["wilcoxon"] = float(stats.wilcoxon(a, b).pvalue)
  out["permutation"] = float(stats.permutation_test(
      (a, b), _mean_difference, permutation_type="samples", vectorized=True,
      n_resamples=n_resamples, alternative="two-sided", rng=np.random.default_rng(seed)).pvalue)
  return out


def _mean(x: np.ndarray) -> float:
  return float(x.mean()) if x.size else math.nan


def _mean_difference(x, y, axis):
  return np.mean(x - y, axis=axis)


def compare_methods(collected: Mapping, metrics: Sequence[str], *, reference: str | None = None,
                    n_resamples: int = 9999, seed: int = 0) -> list[dict]:
  """Paired tests of every pair of methods (or each against `reference`) per modality, class
  and metric, on the cases both have; Holm-adjusted per metric and test over all those rows.

  Returns:
    Rows: method_a, method_b, modality, class, metric, n, mean_a, mean_b, mean_difference, and
    for each test its p-value and `<test>_holm`.
  """
  methods = list(collected)
  if reference is not None:
    if reference not in collected:
      raise ReportError(f"--reference={reference!r} is not one of the runs {methods}")
    pairs = [(reference, m) for m in methods if m != reference]
  else:
    pairs = list(itertools.combinations(methods, 2))
  rows = []
  for metric in metrics:
    start = len(rows)
    for (ma, mb), modality in itertools.product(pairs, modalities_of(collected)):
      for cls in class_names(collected, modality):
        va = values_of(collected, ma, modality, cls, metric)
        vb = values_of(collected, mb, modality, cls, metric)
        common = sorted(set(va) & set(vb))
        result = paired_tests([va[c] for c in common], [vb[c] for c in common],
                              n_resamples=n_resamples, seed=seed)
        rows.append({"method_a": ma, "method_b": mb, "modality": modality, "class": cls,
                     "metric": metric, **result})
    for test in TESTS:
      adjusted = holm([r[test] for r in rows[start:]])
      for r, p in zip(rows[start:], adjusted):
        r[f"{test}_holm"] = p
  return rows


def markdown_tests(rows: Sequence[Mapping]) -> str:
  """The paired tests as a markdown table (p-values Holm-adjusted, raw in brackets)."""
  lines = ["Paired tests on the same test volumes; p-values Holm-adjusted per metric and test "
           "(raw in brackets). Difference = mean(A - B).", "",
           "| metric | modality | class | A | B | n | mean A | mean B | difference | t-test | "
           "Wilcoxon | permutation |", "| --- |" + " --- |" * 11]
  for r in rows:
    tests = [f"{_p(r[f'{t}_holm'])} ({_p(r[t])})" for t in TESTS]
    lines.append(f"| {r['metric']} | {r['modality']} | {r['class']} | {r['method_a']} | "
                 f"{r['method_b']} | {r['n']} | {_num(r['mean_a'])} | {_num(r['mean_b'])} | "
                 f"{_num(r['mean_difference'])} | " + " | ".join(tests) + " |")
  return "\n".join(lines) + "\n"


def _p(p: float) -> str:
  return "n/a" if not math.isfinite(p) else f"{p:.3g}"


def _num(v: float) -> str:
  return "n/a" if not math.isfinite(v) else f"{v:.3f}"


# =============================================================================================
# Figures.
# =============================================================================================

def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: os.PathLike) -> None:
  """Saves a figure atomically (a reader never sees half a PNG) and closes it."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
  os.close(fd)
  try:
    fig.savefig(tmp, dpi=100, bbox_inches="tight")
    os.replace(tmp, path)
  finally:
    pathlib.Path(tmp).unlink(missing_ok=True)
    _pyplot().close(fig)


def box_plots(collected: Mapping, metric: str, modality: str, path: os.PathLike) -> None:
  """One panel per class, one box per method (its test volumes' values), as a PNG."""
  plt = _pyplot()
  classes = class_names(collected, modality)
  methods = list(collected)
  fig, axes = plt.subplots(1, len(classes), figsize=(2.2 * len(classes) + 1, 3.5), squeeze=False)
  for ax, cls in zip(axes[0], classes):
    data = [[v for v in values_of(collected, m, modality, cls, metric).values() if math.isfinite(v)]
            for m in methods]
    ax.boxplot([d if d else [math.nan] for d in data], showmeans=True)
    ax.set_xticks(range(1, len(methods) + 1), methods, rotation=45, ha="right", fontsize=8)
    ax.set_title(cls, fontsize=9)
  unit = "" if metric in ("dice", "per_slice_dice", "surface_dice") else " (mm)"
  axes[0][0].set_ylabel(metric + unit)
  fig.suptitle(f"{modality}: {metric} per test volume")
  _save(fig, path)


def _canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
  from unpaired_seg.data import geometry
  return geometry.to_canonical(array, affine)[0]


def overlay(image: np.ndarray | None, reference: np.ndarray, predictions: Mapping[str, np.ndarray],
            affine: np.ndarray, path: os.PathLike, title: str) -> None:
  """Reference and each method's prediction over the image on the axial slice with the most
  reference foreground; radiological view (patient's right on the left, anterior up).

  Args:
    image: [X, Y, Z] intensities on the grid of the labels, or None (labels only).
    reference: [X, Y, Z] shared labels.
    predictions: {method: [X, Y, Z] labels}.
    affine: the grid's affine (the display is reoriented to RAS).
    path: the PNG.
    title: figure title.
  """
  plt = _pyplot()
  ref = _canonical(reference, affine)
  z = int(np.argmax((ref > 0).reshape(-1, ref.shape[-1]).sum(axis=0)))

  def view(volume):  # RAS [x, y] -> rows anterior to posterior, columns patient right to left
    return np.asarray(volume)[:, :, z].T[::-1, ::-1]

  base = None if image is None else view(_canonical(image, affine)).astype(np.float32)
  panels = {"reference": ref, **{m: _canonical(p, affine) for m, p in predictions.items()}}
  fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.3), squeeze=False)
  num_classes = max(int(ref.max()), max((int(p.max()) for p in predictions.values()), default=0))
  for ax, (name, labels) in zip(axes[0], panels.items()):
    if base is not None:
      lo, hi = np.percentile(base, [1, 99])
      ax.imshow(base, cmap="gray", vmin=lo, vmax=max(hi, lo + 1e-6))
    shown = np.ma.masked_equal(view(labels), 0)
    ax.imshow(shown, cmap="tab10", vmin=0, vmax=max(num_classes, 1), alpha=0.5,
              interpolation="nearest")
    ax.set_title(name, fontsize=9)
    ax.axis("off")
  fig.suptitle(f"{title}, slice {z}", fontsize=10)
  _save(fig, path)


def plot_progress(metrics_path: os.PathLike, path: os.PathLike) -> bool:
  """progress.png of a run: losses and validation Dice over steps, and validation Dice over wall
  time (where the rows carry `wall_s`), from metrics.jsonl.

  Returns:
    False (and writes nothing) when there is nothing to plot yet.
  """
  metrics_path = pathlib.Path(metrics_path)
  if not metrics_path.exists():
    return False
  rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
  losses, validation, timed = {}, {}, {}
  for row in rows:
    for key, value in row.items():
      if key in ("step", "wall_s") or value is None or not math.isfinite(value):
        continue
      if key.startswith("val_"):
        validation.setdefault(key, []).append((row["step"], value))
        if "wall_s" in row:
          timed.setdefault(key, []).append((row["wall_s"] / 60, value))
      elif key.startswith("loss") or key.startswith("seg_") or key.endswith("_loss"):
        losses.setdefault(key, []).append((row["step"], value))
  if not losses and not validation:
    return False
  plt = _pyplot()
  fig, axes = plt.subplots(1, 3 if timed else 2, figsize=(16 if timed else 11, 4))
  left, right = axes[0], axes[1]
  for key, points in sorted(losses.items()):
    left.plot(*zip(*points), label=key, linewidth=2 if key == "loss" else 1)
  left.set_xlabel("step")
  left.set_ylabel("training loss")
  left.legend(fontsize=8)
  for key, points in sorted(validation.items()):
    right.plot(*zip(*points), marker="o", label=key, linewidth=2 if key == "val_dice" else 1)
  right.set_xlabel("step")
  right.set_ylabel("validation Dice (3D, per volume)")
  right.set_ylim(0, 1)
  if validation:
    right.legend(fontsize=8)
  if timed:
    for key, points in sorted(timed.items()):
      axes[2].plot(*zip(*points), marker="o", label=key, linewidth=2 if key == "val_dice" else 1)
    axes[2].set_xlabel("wall time (minutes)")
    axes[2].set_ylabel("validation Dice (3D, per volume)")
    axes[2].set_ylim(0, 1)
    axes[2].legend(fontsize=8)
  _save(fig, path)
  return True
