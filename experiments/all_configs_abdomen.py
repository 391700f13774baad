"""Every published config of the shared-kernel family, trained and scored on the real abdomen data.

One run per config file (DualStream once per variant), each at its published setting (network,
sharing, loss, optimiser, learning-rate schedule), switched to the prepared unpaired abdominal
CT/MR set with `configs/common.py:use_prepared_data` and sized for a CPU: --steps training steps,
--image_size views, one validation and one checkpoint at the end, test Dice only. Each workdir
keeps its summary.json; the table goes to experiments/results/all_configs_abdomen.md.

  python experiments/all_configs_abdomen.py --data=/tmp/abdomen_ctmr_3mm
  python experiments/all_configs_abdomen.py --data=/tmp/abd3_smoke --limit=3 --steps=2 \
      --only=dualstream_v1,ummkd_3d --root=/tmp/all_configs_smoke

When --data does not exist it is prepared from --source at --spacing mm in-plane (--limit
subjects per modality). experiments/table2_abdomen.py is the comparison of the 2D rows on one
common backbone and optimiser; this script checks that each config as published runs end to end.
"""

import importlib
import json
import pathlib
import re
import shlex
import sys
import time

from absl import app, flags, logging

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

# (run name, config file under configs/, config argument), in table order.
RUNS = (
    ("individual", "individual", None),
    ("joint", "joint", None),
    ("joint_kd", "joint_kd", None),
    ("y_shaped", "y_shaped", None),
    ("x_shaped", "x_shaped", None),
    ("dualstream_v1", "dualstream", "variant=v1"),
    ("dualstream_v2", "dualstream", "variant=v2"),
    ("dualstream_v3", "dualstream", "variant=v3"),
    ("dualstream_v4", "dualstream", "variant=v4"),
    ("chilopod", "chilopod", None),
    ("ummkd", "ummkd", None),
    ("affinity", "affinity", None),
    ("csa", "csa", None),
    ("ummkd_3d", "ummkd_3d", None),
)
RUN_NAMES = tuple(name for name, _, _ in RUNS)
RESULTS = ROOT / "experiments" / "results" / "all_configs_abdomen.md"
_PARAMETERS = re.compile(r"parameters trainable_total: (\d+)")

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command's flags, defined only when it runs (importing the module defines none)."""
  flags.DEFINE_string("data", "/tmp/abdomen_ctmr_3mm",
                      "Prepared dataset folder; prepared from --source when it does not exist.")
  flags.DEFINE_string("source", "/work/shared/data/abdomen_ctmr",
                      "Source abdominal CT/MR folder (mr/ and ct/), read only to prepare --data.")
  flags.DEFINE_float("spacing", 3.0, "In-plane spacing (mm) when --data is prepared here.")
  flags.DEFINE_integer("limit", 0, "Subjects per modality when --data is prepared here (0: all; "
                       "at least 3, so that validation and test each get a subject).")
  flags.DEFINE_string("root", "/tmp/all_configs", "Parent folder of the runs' workdirs.")
  flags.DEFINE_integer("steps", 60, "Training steps of every run.", lower_bound=1)
  flags.DEFINE_list("only", [], "Run names to run (default: all): " + ",".join(RUN_NAMES))
  flags.DEFINE_integer("image_size", 96, "Training view (pixels per side).", lower_bound=16)
  flags.DEFINE_enum("grid", "dataset", ["dataset", "source"],
                    "Scoring grid: 'dataset' (the prepared grid, fast) or 'source' (the source "
                    "files).")


def config_label(module: str, arg: str | None) -> str:
  """The config as `--config=` names it, e.g. 'configs/dualstream.py:variant=v1'."""
  return f"configs/{module}.py" + (f":{arg}" if arg else "")


def published_config(name: str):
  """The config of run `name` exactly as its config file gives it."""
  _, module, arg = RUNS[RUN_NAMES.index(name)]
  return importlib.import_module(f"configs.{module}").get_config(arg)


def experiment_config(name: str, data_root: str, steps: int, image_size: int,
                      grid: str = "dataset"):
  """Run `name`'s published config on the prepared data, sized for a CPU.

  Args:
    name: one of RUN_NAMES.
    data_root: the prepared dataset folder.
    steps: training steps; validation and checkpoint happen once, at the last step.
    image_size: the training view's side (pixels); inference tiles larger slices.
    grid: the test scoring grid, 'dataset' or 'source'.

  Returns:
    The config, ready for `train.train_and_evaluate`.
  """
  from configs import common
  config = published_config(name)
  common.use_prepared_data(config, data_root)
  config.data.image_size = (image_size, image_size)
  config.train.steps = steps
  config.train.eval_every = steps
  config.train.checkpoint_every = steps
  config.eval.checkpoint = "latest"
  config.eval.metrics = ("dice",)
  config.eval.grid = grid
  config.eval.save_predictions = 0
  return config


def prepared_data(data: pathlib.Path, source: pathlib.Path, spacing: float,
                  limit: int) -> pathlib.Path:
  """`data` when it holds a dataset; else prepares it there from `source`."""
  if (data / "dataset.json").exists():
    return data
  if data.exists() and any(data.iterdir()):
    raise app.UsageError(f"--data={data} exists but has no dataset.json: not a prepared dataset "
                         "(give an empty or absent folder to prepare one there)")
  if not (source / "mr").is_dir() or not (source / "ct").is_dir():
    raise app.UsageError(f"--data={data} does not exist, and the source folder {source} to "
                         "prepare it from is missing or lacks mr/ and ct/ (set --source)")
  from unpaired_seg.data import prepare
  logging.info("preparing %s -> %s at %g mm (limit %s)", source, data, spacing, limit or "none")
  prepare.prepare_abdomen_ctmr(source, data, spacing=(spacing, spacing), limit=limit or None)
  return data


def parameter_count(workdir: pathlib.Path) -> int | None:
  """The trainable parameters that `train` logged for the run (last log file), or None."""
  logs = sorted(workdir.glob("train.*.log.INFO.*"), key=lambda p: p.stat().st_mtime)
  for log in reversed(logs):
    found = _PARAMETERS.findall(log.read_text(errors="replace"))
    if found:
      return int(found[-1])
  return None


def _same_config(workdir: pathlib.Path, config) -> bool | None:
  """None without a config.json in `workdir`, else whether it is `config`."""
  path = workdir / "config.json"
  if not path.exists():
    return None
  return json.loads(path.read_text()) == json.loads(json.dumps(config.to_dict()))


def _dice(summary: dict, modality: str) -> str:
  block = summary.get("modalities", {}).get(modality)
  return "n/a" if not block else f"{block['mean']['dice']:.3f}"


def write_results(root: pathlib.Path, data: pathlib.Path, times: dict, wall: float,
                  kept: list[str]) -> str:
  """Writes RESULTS: every run under `root` finished with this command's settings.

  Args:
    root: the parent of the workdirs.
    data: the prepared dataset folder.
    times: run name -> training and evaluation wall time (s).
    wall: this command's wall time (s).
    kept: the runs this command found finished and did not train again.

  Returns:
    The markdown written.
  """
  from unpaired_seg.data import dataset as ds
  manifest = ds.load_manifest(data)
  volumes = {m: len(ds.list_cases(manifest, m)) for m in manifest.modalities}
  rows, tests = [], {}
  for name, module, arg in RUNS:
    workdir = root / name
    config = experiment_config(name, str(data), FLAGS.steps, FLAGS.image_size, FLAGS.grid)
    if not (workdir / "summary.json").exists() or not _same_config(workdir, config):
      continue
    summary = json.loads((workdir / "summary.json").read_text())
    tests = {m: len(b["per_case"]) for m, b in summary["modalities"].items()}
    params = parameter_count(workdir)
    rows.append(f"| {name} | `{config_label(module, arg)}` | "
                f"{'n/a' if params is None else f'{params:,}'} | {config.train.steps} | "
                f"{times.get(name, float('nan')):.0f} | {_dice(summary, 'mr')} | "
                f"{_dice(summary, 'ct')} | `{workdir / 'summary.json'}` |")
  reused = (f" Kept from an earlier command with these settings (not run again): "
            f"{', '.join(kept)}." if kept else "")
  command = "python experiments/all_configs_abdomen.py " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])
  text = f"""# Every shared-kernel config on the real unpaired abdominal MR and CT

Command (from the repository root): `{command}`

Wall time: {wall / 60:.1f} min for this command on this machine, data preparation included when it
prepared --data; `wall s` below is each run's training and evaluation.{reused}

These are smoke-sized runs that show each config trains and evaluates on the real data, not a
comparison of the methods.

Settings:

* data: `{data}` ({manifest.name}), volumes per modality {volumes}, test volumes {tests};
* each config file at its published setting (network, sharing, loss, optimiser, learning-rate
  schedule), switched to the data by `configs/common.py:use_prepared_data` (8-feature U-Nets,
  4 slices or 3D patches per modality per step, CT z-scored with the training split's
  statistics, one validation volume);
* training: {FLAGS.image_size} x {FLAGS.image_size} views, {FLAGS.steps} steps, the one validation
  and checkpoint at the last step;
* test: 3D Dice per volume, mean over the foreground classes, on the {FLAGS.grid} grid, from the
  latest checkpoint;
* parameters: the trainable total that training logs, every per-modality copy counted.

| run | config | parameters | steps | wall s | MR mean Dice | CT mean Dice | summary.json |
| --- | --- | --- | --- | --- | --- | --- | --- |
""" + "\n".join(rows) + "\n"
  RESULTS.parent.mkdir(parents=True, exist_ok=True)
  RESULTS.write_text(text)
  return text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = [n for n in FLAGS.only if n not in RUN_NAMES]
  if unknown:
    raise app.UsageError(f"--only: {unknown} not in {list(RUN_NAMES)}")
  if FLAGS.limit and FLAGS.limit < 3:
    raise app.UsageError("--limit must be 0 (all subjects) or at least 3: with fewer subjects per "
                         "modality the validation and test splits are empty")
  names = [n for n in RUN_NAMES if not FLAGS.only or n in FLAGS.only]
  start = time.perf_counter()
  data = prepared_data(pathlib.Path(FLAGS.data), pathlib.Path(FLAGS.source), FLAGS.spacing,
                       FLAGS.limit)
  root = pathlib.Path(FLAGS.root)
  configs = {n: experiment_config(n, str(data), FLAGS.steps, FLAGS.image_size, FLAGS.grid)
             for n in names}
  for name, config in configs.items():  # before any training: a stale workdir fails fast
    if _same_config(root / name, config) is False:
      raise app.UsageError(f"{root / name} holds a run with another config: delete it or use "
                           "another --root")

  from unpaired_seg import train
  times_path = root / "wall_times.json"
  kept = []
  for name, config in configs.items():
    workdir = root / name
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    if (workdir / "summary.json").exists() and name in times and _same_config(workdir, config):
      logging.info("%s: finished with this config already, kept (%s)", name, workdir)
      kept.append(name)
      continue
    t0 = time.perf_counter()
    summary = train.train_and_evaluate(config, workdir)
    times[name] = time.perf_counter() - t0
    root.mkdir(parents=True, exist_ok=True)
    times_path.write_text(json.dumps(times, indent=1, sort_keys=True))
    logging.info("%s done in %.0f s: mean Dice mr %s ct %s", name, times[name],
                 _dice(summary, "mr"), _dice(summary, "ct"))
  times = json.loads(times_path.read_text()) if times_path.exists() else {}
  write_results(root, data, times, time.perf_counter() - start, kept)
  logging.info("wrote %s", RESULTS)
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)
