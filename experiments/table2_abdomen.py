"""UMMKD's Table II on the real unpaired abdominal CT/MR set, on cross-validation folds.

Individual, Joint, Joint+KD, Y-shaped, X-shaped, Chilopod, UMMKD and CSA, each trained from its
config file with the same backbone, data, recipe and budget on the folds of a 5-fold per-subject
cross-validation, scored by 3D Dice (and HD95, ASSD) per organ per volume on each fold's test
subjects, pooled over the folds with `compare` (paired tests over every test volume,
Holm-corrected). Writes experiments/results/table2_abdomen.md and the comparison's tables under
<workdir>/compare.

  python experiments/table2_abdomen.py                                  # every method, folds 0-2
  python experiments/table2_abdomen.py --methods=individual,ummkd --folds_run=0 --steps=300

Runs train in <workdir>/fold<k>/<method> (an interrupted run resumes from its checkpoints there);
a finished run's summary.json, config.json and metrics.jsonl are kept under --store (in the
repository, so that they outlive a machine's scratch space), and a run found there with the same
settings is read, not trained again: the table can be built over several sittings. The recipe (`--recipe=nnunet`, the default): class-balanced
sampling of a third of every batch, nnU-Net's augmentation, CT clipped to its training
foreground's percentiles and z-scored, Adam with polynomial decay and an EMA of the weights.
`--recipe=plain` is the earlier setting (uniform foreground sampling, exponential schedule).
What differs from the paper, and why (a CPU budget):
  * 2D U-Net (--features at full resolution, depth 4) for every method instead of the 2.5D
    dilated network: on 2 CPU cores the dilated network is ~8x slower per step.
  * The segmentation loss of every row is UMMKD's (Dice + the code's class-weighted, clipped CE,
    L2 1e-4), so the rows differ only in sharing and in the KD / CSA terms.
Skips with a message (exit 0) when the data folder is absent.
"""

import importlib.util
import json
import pathlib
import shlex
import sys
import time

import ml_collections
import numpy as np
from absl import app, flags, logging

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from unpaired_seg import config_schema  # noqa: E402  (after the repository root is on the path)

METHODS = ("individual", "joint", "joint_kd", "y_shaped", "x_shaped", "chilopod", "ummkd", "csa")
LABELS = {"individual": "Individual", "joint": "Joint", "joint_kd": "Joint + KD",
          "y_shaped": "Y-shaped", "x_shaped": "X-shaped", "chilopod": "Chilopod (MSBN)",
          "ummkd": "UMMKD (Chilopod + KD)", "csa": "CSA (Chilopod + class-specific affinity)"}
ORGANS = ("liver", "right_kidney", "left_kidney", "spleen")

# The settings every row shares; flags of the command, defined only when it runs.
DEFAULTS = dict(steps=2000, image_size=128, batch_size=8, features=8, folds=5, recipe="nnunet",
                grid="source", learning_rate=2e-3)


def _define_flags() -> None:
  flags.DEFINE_string("data", "/work/shared/data/abdomen_ctmr", "Source abdominal CT/MR folder.")
  flags.DEFINE_string("workdir", "/tmp/table2_abdomen", "Prepared data and one run per method.")
  flags.DEFINE_float("spacing", 2.0, "In-plane spacing (mm) of the prepared data.")
  flags.DEFINE_integer("steps", DEFAULTS["steps"], "Training steps per method.")
  flags.DEFINE_integer("image_size", DEFAULTS["image_size"], "Training view (pixels per side).")
  flags.DEFINE_integer("batch_size", DEFAULTS["batch_size"], "Slices per modality per step.")
  flags.DEFINE_integer("features", DEFAULTS["features"], "U-Net features at full resolution.")
  flags.DEFINE_integer("folds", DEFAULTS["folds"], "Folds of the per-subject cross-validation.")
  flags.DEFINE_list("folds_run", ["0", "1", "2"], "The folds to train and pool.")
  flags.DEFINE_enum("recipe", DEFAULTS["recipe"], ["nnunet", "plain"],
                    "Training recipe (see the docstring).")
  flags.DEFINE_enum("grid", DEFAULTS["grid"], ["dataset", "source"],
                    "Scoring grid: 'dataset' (the prepared grid, fast) or 'source' (the source "
                    "files).")
  flags.DEFINE_float("learning_rate", DEFAULTS["learning_rate"],
                     "Adam learning rate of every method.")
  flags.DEFINE_list("methods", list(METHODS), "Methods to run, in table order.")
  flags.DEFINE_string("store", str(ROOT / "experiments" / "results" / "table2_abdomen_runs"),
                      "Where finished runs' summary, config and metrics are kept and read.")
  flags.DEFINE_string("output", str(ROOT / "experiments" / "results" / "table2_abdomen.md"),
                      "Markdown table to write.")


FLAGS = flags.FLAGS


def load_config(name: str):
  path = ROOT / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"configs.{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(None)


def apply_recipe(config, recipe: str) -> None:
  """'nnunet': class-balanced sampling, nnU-Net's CT normalisation, poly decay, EMA."""
  if recipe == "plain":
    return
  config.data.oversample = "class"
  config.data.foreground_fraction = 0.33
  config.data.normalization = "ct=foreground_zscore"
  config.train.lr_schedule = "poly"
  config.train.ema_decay = 0.999


def experiment_config(name: str, data_root: pathlib.Path, fold: int, settings=None):
  """The method's config on the prepared data and a fold, with the shared CPU-sized settings.

  `settings` has the attributes of DEFAULTS (the command's flags when None).
  """
  s = settings if settings is not None else FLAGS
  from configs import chilopod, common
  config = load_config(name)
  common.use_prepared_data(config, str(data_root))
  if name in ("individual", "joint", "csa"):
    # The same segmentation loss, optimiser and norms for every row (UMMKD's).
    chilopod.ummkd_settings(config, "unet")
  config.data.image_size = (s.image_size, s.image_size)
  config.model.name = "unet"
  config.model.features = s.features
  config.model.depth = 4
  config.train.steps = s.steps
  config.train.batch_size = s.batch_size
  config.train.learning_rate = s.learning_rate
  config.train.lr_decay.update(rate=1.0, every=1000)
  apply_recipe(config, s.recipe)
  config.data.split.update(folds=s.folds, fold=fold)
  config.train.log_every = 100
  config.train.eval_every = max(1, s.steps // 4)   # a learning curve of four points
  config.train.checkpoint_every = max(1, s.steps // 4)
  config.eval.checkpoint = "latest"
  config.eval.metrics = ("dice", "hd95", "assd")
  config.eval.grid = s.grid
  config.eval.max_val_cases = 2
  config.eval.save_predictions = 0
  return config


def prepare(data: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
  from unpaired_seg.data import prepare as prepare_lib
  if (out / "dataset.json").exists():
    return out
  logging.info("preparing %s -> %s at %.1f mm", data, out, FLAGS.spacing)
  prepare_lib.prepare_abdomen_ctmr(data, out, spacing=(FLAGS.spacing, FLAGS.spacing))
  return out


def pooled_rows(results: dict) -> dict:
  """{method: {modality: {organ: [Dice of every test volume over the folds]}}}."""
  out = {}
  for (name, _), summary in results.items():
    for modality, block in summary["modalities"].items():
      per = out.setdefault(name, {}).setdefault(modality, {})
      for case in block["per_case"].values():
        values = [case[o]["dice"] for o in ORGANS
                  if case.get(o, {}).get("dice") is not None]
        for organ in ORGANS:
          if case.get(organ, {}).get("dice") is not None:
            per.setdefault(organ, []).append(float(case[organ]["dice"]))
        if values:   # the volume's mean over its organs, as compare's class `mean`
          per.setdefault("mean", []).append(float(np.mean(values)))
  return out


def format_table(results: dict, seconds: dict) -> str:
  pooled = pooled_rows(results)
  lines = []
  for modality in ("mr", "ct"):
    lines.append(f"\n### {modality.upper()}: 3D Dice per organ on the test subjects of every fold "
                 "(mean +- std over volumes, n volumes)\n")
    lines.append("| method | " + " | ".join(ORGANS) + " | mean | n | train+eval min |")
    lines.append("| --- " * (len(ORGANS) + 4) + "|")
    for name in pooled:
      per = pooled[name].get(modality, {})
      cells = [f"{np.mean(per[o]):.3f} +- {np.std(per[o]):.3f}" if per.get(o) else "n/a"
               for o in ORGANS]
      mean = f"{np.mean(per['mean']):.3f}" if per.get("mean") else "n/a"
      minutes = sum(t for (n, _), t in seconds.items() if n == name) / 60
      lines.append(f"| {LABELS[name]} | " + " | ".join(cells)
                   + f" | {mean} | {len(per.get('mean', []))} | {minutes:.0f} |")
  return "\n".join(lines)


def settings_of(config) -> dict:
  """What must match for a finished run to be reused."""
  c = json.loads(json.dumps(config.to_dict()))   # tuples as config.json holds them: lists
  return {"train": {k: c["train"][k] for k in ("steps", "batch_size", "learning_rate",
                                                "lr_schedule", "ema_decay")},
          "data": {k: c["data"][k] for k in ("image_size", "oversample", "normalization",
                                              "foreground_fraction")},
          "split": c["data"]["split"], "features": c["model"]["features"]}


def finished(run: pathlib.Path, config, key=None) -> dict | None:
  """The run's summary when it finished with these settings (`key(config)`, default
  `settings_of`), else None."""
  key = key or settings_of
  if not (run / "summary.json").exists() or not (run / "config.json").exists():
    return None
  saved = ml_collections.ConfigDict(config_schema.with_added_keys(
      json.loads((run / "config.json").read_text())))
  if key(saved) != key(config):
    return None
  return json.loads((run / "summary.json").read_text())


KEPT = ("summary.json", "config.json", "metrics.jsonl")


def keep(run: pathlib.Path, store: pathlib.Path) -> None:
  """Copy a finished run's small files to the store (atomically, summary last)."""
  from unpaired_seg.data import pipeline
  for name in sorted(KEPT, key=lambda n: n == "summary.json"):
    pipeline.write_text_atomic(store / name, (run / name).read_text())


def wall_seconds(run: pathlib.Path) -> float:
  """The run's own wall time, from its metrics rows."""
  rows = (run / "metrics.jsonl").read_text().splitlines()
  return max((json.loads(r).get("wall_s", 0.0) for r in rows if r.strip()), default=0.0)


def source_data_found(data: pathlib.Path) -> bool:
  """Whether the abdominal source folder is there (a warning says why not)."""
  if (data / "mr").is_dir() and (data / "ct").is_dir():
    return True
  logging.warning("abdominal data not found at %s (needs mr/ and ct/): skipping", data)
  return False


def check_known(flag: str, values, known) -> None:
  unknown = [v for v in values if v not in known]
  if unknown:
    raise app.UsageError(f"--{flag}: {unknown} not in {tuple(known)}")


def write(out: pathlib.Path, text: str) -> None:
  """The markdown result, atomically."""
  from unpaired_seg.data import pipeline
  pipeline.write_text_atomic(out, text)
  logging.info("wrote %s", out)


def main(argv):
  del argv
  data = pathlib.Path(FLAGS.data)
  if not source_data_found(data):
    return 0
  check_known("methods", FLAGS.methods, METHODS)
  folds = [int(f) for f in FLAGS.folds_run]
  if any(not 0 <= f < FLAGS.folds for f in folds):
    raise app.UsageError(f"--folds_run={FLAGS.folds_run}: each in [0, {FLAGS.folds})")
  from unpaired_seg import compare, train
  workdir = pathlib.Path(FLAGS.workdir)
  start = time.perf_counter()
  data_root = prepare(data, workdir / f"data_{FLAGS.spacing:g}mm")
  results, seconds = {}, {}
  store = pathlib.Path(FLAGS.store)
  for fold in folds:
    for name in FLAGS.methods:
      run, kept = workdir / f"fold{fold}" / name, store / f"fold{fold}" / name
      config = experiment_config(name, data_root, fold)
      summary = finished(kept, config)
      if summary is None:
        summary = train.train_and_evaluate(config, run)
        keep(run, kept)
      seconds[(name, fold)] = wall_seconds(kept)
      results[(name, fold)] = summary
      logging.info("fold %d %s: mean Dice mr %.3f ct %.3f", fold, name,
                   summary["modalities"]["mr"]["mean"]["dice"],
                   summary["modalities"]["ct"]["mean"]["dice"])
  wall = time.perf_counter() - start
  runs = [f"{name}={store / f'fold{fold}' / name}" for fold in folds for name in FLAGS.methods]
  compare_dir = workdir / "compare"
  compare.run(runs, compare_dir, ["dice", "hd95", "assd"], reference="individual"
              if "individual" in FLAGS.methods else None, overlays=0)
  tests = (compare_dir / "tests.md").read_text() if (compare_dir / "tests.md").exists() else ""
  example = experiment_config(FLAGS.methods[0], data_root, folds[0])
  command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
  text = f"""# Table II on cross-validation folds: unpaired abdominal MR (CHAOS T2-SPIR) and CT (BTCV)

Command (from the repository root): `{command}`

Wall time of this sitting: {wall / 60:.1f} min on this machine (2 CPU cores); runs finished in
earlier sittings were read, not trained again.

Setting: `{data}` prepared at {FLAGS.spacing:g} mm in-plane; folds {folds} of a
{FLAGS.folds}-fold per-subject cross-validation (seed {example.seed}), each fold's test subjects
unseen by its runs. Every method: 2D U-Net ({FLAGS.features} features, depth 4),
{FLAGS.image_size} x {FLAGS.image_size} views, {FLAGS.batch_size} + {FLAGS.batch_size} slices per
step, {FLAGS.steps} steps, Adam lr {FLAGS.learning_rate:g}, recipe `{FLAGS.recipe}`, UMMKD's loss for
every row; KD alpha 0.5, T 2; CSA lambda 0.5. Test Dice in 3D per volume on the {FLAGS.grid} grid,
the latest checkpoint (the EMA weights under the nnunet recipe).
{format_table(results, seconds)}

### Paired tests against {'Individual' if 'individual' in FLAGS.methods else 'each other'} (every test volume of the folds; Holm-adjusted)

{tests}
"""
  write(pathlib.Path(FLAGS.output), text)
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)
