"""Zero labels for a modality on the real unpaired abdominal CT/MR set, on Table II's folds.

For a target modality (--target=mr: MR without any label, CT fully labelled; or ct), rows:
  * joint with the target unlabelled (its images only in the batches' normalisation statistics),
  * joint + each intensity randomisation of the labelled images (configs/zero_shot.py:
    'gin' = GIN + IPA, 'slaug' = SLAug's global + local location-scale, 'all' = both),
  * 'slaug_instance': SLAug with instance instead of batch normalisation,
  * multi-atlas registration ('multi_atlas'): k labelled training volumes of the other modality
    registered onto each target test volume by mutual information (affine, then B-spline;
    SimpleITK), labels fused by majority vote (configs/multi_atlas.py; nothing trained),
  * the target's own labelled Individual model as the upper bound (Table II's run, read from its
    store; trained here when missing).
Every row uses Table II's backbone, recipe and budget (experiments/table2_abdomen.py), is scored
by 3D Dice per organ on each fold's test subjects on the source grid, and is compared with joint
by `compare` (paired tests over every test volume of the folds, Holm-adjusted). Finished runs are
kept under --store and read, not trained again, so the table is built over several sittings.

  python experiments/zero_shot_abdomen.py --target=mr --folds_run=0,1,2
  python experiments/zero_shot_abdomen.py --target=mr --rows=gin --folds_run=0

Writes experiments/results/zero_shot_abdomen_<target>.md. Skips (exit 0) without the data.
"""

import json
import pathlib
import shlex
import sys
import time
import types

from absl import app, flags, logging

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from configs import zero_shot  # noqa: E402  (after the repository root is on the path)
from tests import experiment_scripts  # noqa: E402

table2 = experiment_scripts.load("table2_abdomen")
DEFAULTS = types.SimpleNamespace(**table2.DEFAULTS)   # Table II's shared settings

ROWS = ("none", "gin", "slaug", "all", "slaug_instance", "multi_atlas")
# A row `<randomisation>_instance` normalises every feature map by its own sample's statistics
# (instance norm) instead of batch statistics: the running statistics of batch norm are the
# labelled modality's, which the target's features do not share.
INSTANCE = "_instance"
LABELS = {"none": "Joint, target unlabelled", "gin": "Joint + GIN/IPA", "slaug": "Joint + SLAug",
          "all": "Joint + GIN/IPA + SLAug", "slaug_instance": "Joint + SLAug, instance norm",
          "multi_atlas": "Multi-atlas registration (k = 5)",
          "individual": "Individual (target labelled: bound)"}


def _define_flags() -> None:
  flags.DEFINE_string("data", "/work/shared/data/abdomen_ctmr", "Source abdominal CT/MR folder.")
  flags.DEFINE_string("workdir", "/tmp/table2_abdomen", "Prepared data and the runs' workdirs.")
  flags.DEFINE_float("spacing", 2.0, "In-plane spacing (mm) of the prepared data.")
  flags.DEFINE_enum("target", "mr", ["mr", "ct"], "The modality without labels.")
  flags.DEFINE_list("rows", list(ROWS), "Randomisations to run, in table order.")
  flags.DEFINE_list("folds_run", ["0", "1", "2"], "Folds (of Table II's 5) to train and pool.")
  flags.DEFINE_string("store", str(ROOT / "experiments" / "results" / "zero_shot_abdomen_runs"),
                      "Where finished runs' summary, config and metrics are kept and read.")
  flags.DEFINE_string("table2_store",
                      str(ROOT / "experiments" / "results" / "table2_abdomen_runs"),
                      "Table II's store, for the Individual upper bound.")
  flags.DEFINE_string("output", "", "Markdown table (default "
                      "experiments/results/zero_shot_abdomen_<target>.md).")


FLAGS = flags.FLAGS


def row_config(kind: str, target: str, data_root: pathlib.Path, fold: int, settings=None):
  """Table II's joint run on the fold, with `target` unlabelled and the randomisation `kind`."""
  settings = settings if settings is not None else DEFAULTS
  config = table2.experiment_config("joint", data_root, fold, settings)
  config.data.target_modality = target
  config.data.label_fraction = 0.0
  if kind.endswith(INSTANCE):
    config.model.norm.kind = "instance"
    kind = kind[:-len(INSTANCE)]
  zero_shot.randomization(config, kind)
  return config


def atlas_config(target: str, data_root: pathlib.Path, fold: int, settings=None):
  """The multi-atlas baseline on the fold's splits, segmenting `target` from the other modality's
  labelled training volumes, scored on the grid of every row."""
  settings = settings if settings is not None else DEFAULTS
  from configs import multi_atlas
  config = multi_atlas.get_config(f"data={data_root}")
  config.data.split.update(folds=settings.folds, fold=fold)
  config.eval.grid = settings.grid
  config.eval.save_predictions = 0
  config.baseline.target = target
  return config


def atlas_settings_of(config) -> dict:
  """What must match for a finished multi-atlas run to be reused."""
  c = config.to_dict()
  return {"split": dict(c["data"]["split"]), "grid": c["eval"]["grid"],
          "baseline": json.loads(json.dumps(c["baseline"]))}


def settings_of(config) -> dict:
  """Table II's reuse key plus what makes a zero-label row."""
  key = table2.settings_of(config)
  key["zero"] = {"target": config.data.target_modality,
                 "label_fraction": float(config.data.label_fraction),
                 "intensity": dict(config.data.augment.intensity.to_dict()),
                 "norm": config.model.norm.kind}
  return key


def finished(run: pathlib.Path, config):
  """The run's summary when it finished with these settings, else None."""
  return table2.finished(run, config, key=settings_of)


def keep_files(run: pathlib.Path, store: pathlib.Path, names) -> None:
  """Copy a finished run's small files to the store (atomically, summary last)."""
  from unpaired_seg.data import pipeline
  for name in sorted(names, key=lambda n: n == "summary.json"):
    pipeline.write_text_atomic(store / name, (run / name).read_text())


def main(argv):
  del argv
  data = pathlib.Path(FLAGS.data)
  if not table2.source_data_found(data):
    return 0
  table2.check_known("rows", FLAGS.rows, ROWS)
  from unpaired_seg import compare, train
  folds = [int(f) for f in FLAGS.folds_run]
  workdir, store = pathlib.Path(FLAGS.workdir), pathlib.Path(FLAGS.store)
  start = time.perf_counter()
  data_root = table2.prepare(data, workdir / f"data_{FLAGS.spacing:g}mm")
  results, seconds, runs = {}, {}, []
  for fold in folds:
    # The upper bound: Table II's Individual run of the fold.
    bound = pathlib.Path(FLAGS.table2_store) / f"fold{fold}" / "individual"
    config = table2.experiment_config("individual", data_root, fold, DEFAULTS)
    summary = table2.finished(bound, config)
    if summary is None:
      summary = train.train_and_evaluate(config, workdir / f"fold{fold}" / "individual")
      table2.keep(workdir / f"fold{fold}" / "individual", bound)
    results[("individual", fold)], seconds[("individual", fold)] = summary, table2.wall_seconds(bound)
    runs.append(f"individual={bound}")
    for kind in FLAGS.rows:
      name = f"zero_{FLAGS.target}_{kind}"
      run, kept = workdir / f"fold{fold}" / name, store / f"fold{fold}" / name
      if kind == "multi_atlas":   # registration, nothing trained: its own run and reuse key
        config = atlas_config(FLAGS.target, data_root, fold)
        summary = table2.finished(kept, config, key=atlas_settings_of)
        if summary is None:
          from unpaired_seg.baselines import run as baseline_run
          summary = baseline_run.run(config, run)
          keep_files(run, kept, ("config.json", "summary.json"))
        results[(kind, fold)], seconds[(kind, fold)] = summary, summary["baseline"]["seconds"]
      else:
        config = row_config(kind, FLAGS.target, data_root, fold)
        summary = finished(kept, config)
        if summary is None:
          summary = train.train_and_evaluate(config, run)
          table2.keep(run, kept)
        results[(kind, fold)], seconds[(kind, fold)] = summary, table2.wall_seconds(kept)
      runs.append(f"{kind}={kept}")
      logging.info("fold %d %s: mean Dice %s %.3f", fold, kind, FLAGS.target,
                   summary["modalities"][FLAGS.target]["mean"]["dice"])
  compare_dir = workdir / f"compare_zero_shot_{FLAGS.target}"
  reference = "none" if "none" in FLAGS.rows else None
  compare.run(runs, compare_dir, ["dice", "hd95", "assd"], reference=reference, overlays=0)
  tests_md = compare_dir / "tests.md"
  tests = tests_md.read_text() if tests_md.exists() else ""
  table2.LABELS.update(LABELS)
  text = f"""# Zero {FLAGS.target.upper()} labels: unpaired abdominal MR (CHAOS T2-SPIR) and CT (BTCV)

Command (from the repository root): `python {" ".join(shlex.quote(a) for a in sys.argv)}`

Wall time of this sitting: {(time.perf_counter() - start) / 60:.1f} min on this machine (2 CPU
cores, runs often sharing them); runs finished in earlier sittings were read, not trained again.

Setting: Table II's (experiments/results/table2_abdomen.md: 2D U-Net, 8 features, depth 4, 128 x 128
views, 8 + 8 slices per step, 2000 steps, nnunet recipe, UMMKD's segmentation loss), folds {folds}
of its 5-fold per-subject cross-validation. The {FLAGS.target.upper()} training subjects keep no
label; the other modality keeps all of them. Test 3D Dice per volume on the source grid, the
latest checkpoint's EMA weights. The Individual row trains on the target's labels: the bound.
{table2.format_table(results, seconds)}

### Paired tests against joint with the target unlabelled (every test volume; Holm-adjusted)

{tests}
"""
  table2.write(pathlib.Path(FLAGS.output or ROOT / "experiments" / "results"
                            / f"zero_shot_abdomen_{FLAGS.target}.md"), text)
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)
