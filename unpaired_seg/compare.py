"""Compare runs: tables, paired tests, box plots and overlays from their summary.json files.

  python -m unpaired_seg.compare runs/joint runs/individual --output=/tmp/compare
  python -m unpaired_seg.compare joint=runs/joint_f0 joint=runs/joint_f1 \
      single=runs/ind_f0 single=runs/ind_f1 --reference=single --output=/tmp/cv

A run is a workdir (or its summary.json); NAME=RUN names it (default: the folder's name), and runs
of one name are pooled (the folds of a cross-validation: disjoint test cases). Written to --output:

  table_<metric>.md   methods x (modality, class): mean ± std over test volumes (n), per metric
  table.csv           the same numbers, one row per method, modality, class and metric
  tests.md, tests.csv paired tests on the volumes both methods have: t-test (ttest_rel), Wilcoxon
                      signed-rank, paired permutation test (permutation_type='samples', mean
                      difference); p-values raw and Holm-adjusted per metric and test
  boxplot_<metric>_<modality>.png   one panel per class, one box per method
  overlays/<modality>_<case>.png    reference and each run's prediction on the slice with the most
                      reference foreground, for up to --overlays cases per modality that every
                      run saved (training saves eval.save_predictions test volumes per modality
                      under <run>/predictions/; their images are read from the paths recorded
                      there, and left out when no longer found)

The class `mean` is each volume's mean over its foreground classes.
"""

import pathlib

import nibabel as nib
import numpy as np
from absl import app, flags, logging

from unpaired_seg import evaluate as evaluate_lib
from unpaired_seg import report


def _define_flags() -> None:
  flags.DEFINE_string("output", None, "Folder for the tables and figures.")
  flags.DEFINE_list("metrics", ["dice", "hd95", "assd"], "Metrics to compare.")
  flags.DEFINE_string("reference", None, "Test every run against this one (default: all pairs).")
  flags.DEFINE_integer("overlays", 2, "Overlay figures per modality.", lower_bound=0)
  flags.DEFINE_integer("permutations", 9999, "Resamples of the permutation test.", lower_bound=1)
  flags.DEFINE_integer("seed", 0, "Seed of the permutation test.")
  flags.mark_flags_as_required(["output"])


def write_overlays(runs, output: pathlib.Path, per_modality: int) -> list[pathlib.Path]:
  """Overlay PNGs of the cases whose predictions every run saved (first run's of a name)."""
  indexes, names = [], []
  for name, run in runs:
    if name in names:
      continue
    path = pathlib.Path(run) / evaluate_lib.PREDICTIONS_DIR / "index.json"
    if not path.is_file():
      logging.warning("%s: no saved predictions; no overlays", path)
      return []
    indexes.append((path.parent, evaluate_lib.read_json(path, "prediction index")))
    names.append(name)
  written = []
  first_folder, first = indexes[0]
  for modality, cases in first.items():
    common = [c for c in cases if all(c in index.get(modality, {}) for _, index in indexes)]
    for case in common[:per_modality]:
      entry = cases[case]
      reference = nib.load(str(first_folder / entry["reference"]))
      predictions = {n: np.asarray(nib.load(str(folder / index[modality][case]["prediction"]))
                                   .dataobj) for n, (folder, index) in zip(names, indexes)}
      image = None
      if entry.get("image") and pathlib.Path(entry["image"]).is_file():
        image = np.asarray(nib.load(entry["image"]).dataobj, np.float32)
      else:
        logging.warning("%s/%s: image %s not found; labels only", modality, case,
                        entry.get("image"))
      target = output / "overlays" / f"{modality}_{case}.png"
      report.overlay(image, np.asarray(reference.dataobj), predictions,
                     np.asarray(reference.affine), target, f"{modality} {case}")
      written.append(target)
  return written


def run(run_args, output, metrics, *, reference=None, overlays=2, permutations=9999,
        seed=0) -> dict[str, list[pathlib.Path]]:
  """Writes every table and figure of the comparison; returns the written files by kind."""
  runs = [report.parse_run(r) for r in run_args]
  if not runs:
    raise report.ReportError("give at least one run (a workdir with summary.json)")
  output = pathlib.Path(output)
  for _, path in runs:
    if output.resolve() == path.resolve():
      raise report.ReportError(f"--output={output} is a run folder; choose another folder")
  collected = report.collect(runs)
  output.mkdir(parents=True, exist_ok=True)
  written = {"tables": [], "tests": [], "plots": [], "overlays": []}
  rows = report.summary_rows(collected, metrics)
  (output / "table.csv").write_text(report.to_csv(rows))
  written["tables"].append(output / "table.csv")
  for metric in metrics:
    path = output / f"table_{metric}.md"
    path.write_text(report.markdown_table(rows, metric))
    written["tables"].append(path)
    for modality in report.modalities_of(collected):
      path = output / f"boxplot_{metric}_{modality}.png"
      report.box_plots(collected, metric, modality, path)
      written["plots"].append(path)
  if len(collected) >= 2:
    tests = report.compare_methods(collected, metrics, reference=reference,
                                   n_resamples=permutations, seed=seed)
    (output / "tests.csv").write_text(report.to_csv(tests))
    (output / "tests.md").write_text(report.markdown_tests(tests))
    written["tests"] += [output / "tests.csv", output / "tests.md"]
  if overlays:
    written["overlays"] = write_overlays(runs, output, overlays)
  return written


def main(argv) -> int:
  f = flags.FLAGS
  try:
    written = run(argv[1:], f.output, f.metrics, reference=f.reference, overlays=f.overlays,
                  permutations=f.permutations, seed=f.seed)
  except (ValueError, FileNotFoundError) as e:  # every error here names its file or flag
    logging.error("%s", e)
    return 1
  for kind, paths in written.items():
    logging.info("%s: %s", kind, ", ".join(str(p) for p in paths) or "none")
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)
