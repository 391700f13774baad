"""UMMKD's Table II in miniature on the real unpaired abdominal CT/MR set, sized for a 2-core CPU.

Individual, Joint, Joint+KD, Y-shaped, X-shaped, Chilopod, UMMKD and CSA, each trained from its
config file with the same backbone, data, steps and learning rate, then scored by 3D Dice per
organ per modality on held-out subjects. Writes experiments/results/table2_abdomen.md.

  python experiments/table2_abdomen.py
  python experiments/table2_abdomen.py --steps=100 --methods=joint,ummkd --workdir=/tmp/t2

What differs from the paper, and why (a CPU budget of ~40 minutes for all eight):
  * 2D U-Net (8 features at full resolution, depth 4) for every method instead of the 2.5D
    dilated network: on 2 CPU cores the dilated network is ~8x slower per step at 96 x 96
    (configs/ummkd.py:net=dilated keeps it).
  * 3 mm in-plane spacing, 96 x 96 training views, 4 + 4 slices per step, a few hundred steps,
    Adam lr 2e-3 for every method (the papers' 1e-4 needs tens of thousands of steps).
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

from absl import app, flags, logging

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

METHODS = ("individual", "joint", "joint_kd", "y_shaped", "x_shaped", "chilopod", "ummkd", "csa")
LABELS = {"individual": "Individual", "joint": "Joint", "joint_kd": "Joint + KD",
          "y_shaped": "Y-shaped", "x_shaped": "X-shaped", "chilopod": "Chilopod (MSBN)",
          "ummkd": "UMMKD (Chilopod + KD)", "csa": "CSA (Chilopod + class-specific affinity)"}
ORGANS = ("liver", "right_kidney", "left_kidney", "spleen")

flags.DEFINE_string("data", "/work/shared/data/abdomen_ctmr", "Source abdominal CT/MR folder.")
flags.DEFINE_string("workdir", "/tmp/table2_abdomen", "Prepared data and one run per method.")
flags.DEFINE_float("spacing", 3.0, "In-plane spacing (mm) of the prepared data.")
flags.DEFINE_integer("steps", 150, "Training steps per method.")
flags.DEFINE_integer("image_size", 96, "Training view (pixels per side).")
flags.DEFINE_integer("batch_size", 4, "Slices per modality per step.")
flags.DEFINE_integer("features", 8, "U-Net features at full resolution.")
flags.DEFINE_enum("grid", "dataset", ["dataset", "source"],
                  "Scoring grid: 'dataset' (the prepared grid, fast) or 'source' (the source "
                  "files).")
flags.DEFINE_float("learning_rate", 2e-3, "Adam learning rate of every method.")
flags.DEFINE_list("methods", list(METHODS), "Methods to run, in table order.")
flags.DEFINE_string("output", str(ROOT / "experiments" / "results" / "table2_abdomen.md"),
                    "Markdown table to write.")
FLAGS = flags.FLAGS


def load_config(name: str):
  path = ROOT / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"configs.{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(None)


def experiment_config(name: str, data_root: pathlib.Path):
  """The method's config on the prepared data, with the shared CPU-sized settings."""
  from configs import chilopod, common
  config = load_config(name)
  common.use_prepared_data(config, str(data_root))
  if name in ("individual", "joint", "csa"):
    # The same segmentation loss, optimiser and norms for every row (UMMKD's).
    chilopod.ummkd_settings(config, "unet")
  config.data.image_size = (FLAGS.image_size, FLAGS.image_size)
  config.model.name = "unet"
  config.model.features = FLAGS.features
  config.model.depth = 4
  config.train.steps = FLAGS.steps
  config.train.batch_size = FLAGS.batch_size
  config.train.learning_rate = FLAGS.learning_rate
  config.train.lr_decay.update(rate=1.0, every=1000)
  config.train.log_every = 25
  config.train.eval_every = FLAGS.steps          # validation once, at the end
  config.train.checkpoint_every = FLAGS.steps
  config.eval.checkpoint = "latest"
  config.eval.metrics = ("dice",)
  config.eval.grid = FLAGS.grid
  config.eval.max_val_cases = 1
  config.eval.save_predictions = 0
  return config


def prepare(data: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
  from unpaired_seg.data import prepare as prepare_lib
  if (out / "dataset.json").exists():
    return out
  logging.info("preparing %s -> %s at %.1f mm", data, out, FLAGS.spacing)
  prepare_lib.prepare_abdomen_ctmr(data, out, spacing=(FLAGS.spacing, FLAGS.spacing))
  return out


def format_table(results: dict, seconds: dict) -> str:
  lines = []
  for modality in ("mr", "ct"):
    lines.append(f"\n### {modality.upper()}: 3D Dice per organ on the test subjects "
                 "(mean +- std over volumes)\n")
    lines.append("| method | " + " | ".join(ORGANS) + " | mean | train+eval s |")
    lines.append("| --- " * (len(ORGANS) + 3) + "|")
    for name, summary in results.items():
      block = summary["modalities"][modality]
      cells = []
      for organ in ORGANS:
        mean = block["per_class"][organ]["dice"]
        std = block["std"][organ]["dice"]
        cells.append(f"{mean:.3f} +- {std:.3f}" if std is not None else f"{mean:.3f}")
      lines.append(f"| {LABELS[name]} | " + " | ".join(cells)
                   + f" | {block['mean']['dice']:.3f} | {seconds[name]:.0f} |")
  return "\n".join(lines)


def main(argv):
  del argv
  data = pathlib.Path(FLAGS.data)
  if not (data / "mr").is_dir() or not (data / "ct").is_dir():
    logging.warning("abdominal data not found at %s (needs mr/ and ct/): skipping", data)
    return 0
  unknown = [m for m in FLAGS.methods if m not in METHODS]
  if unknown:
    raise app.UsageError(f"--methods: {unknown} not in {METHODS}")
  from unpaired_seg import train
  workdir = pathlib.Path(FLAGS.workdir)
  start = time.perf_counter()
  data_root = prepare(data, workdir / f"data_{FLAGS.spacing:g}mm")
  results, seconds = {}, {}
  for name in FLAGS.methods:
    run = workdir / name
    t0 = time.perf_counter()
    summary_path = run / "summary.json"
    if summary_path.exists() and json.loads((run / "config.json").read_text())[
        "train"]["steps"] == FLAGS.steps:
      results[name] = json.loads(summary_path.read_text())
    else:
      results[name] = train.train_and_evaluate(experiment_config(name, data_root), run)
    seconds[name] = time.perf_counter() - t0
    logging.info("%s done in %.0f s: mean Dice mr %.3f ct %.3f", name, seconds[name],
                 results[name]["modalities"]["mr"]["mean"]["dice"],
                 results[name]["modalities"]["ct"]["mean"]["dice"])
  wall = time.perf_counter() - start
  example = experiment_config(FLAGS.methods[0], data_root)
  first = results[FLAGS.methods[0]]
  command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
  text = f"""# Table II in miniature: unpaired abdominal MR (CHAOS T2-SPIR) and CT (BTCV)

Command (from the repository root): `{command}`

Wall time: {wall / 60:.1f} min for {len(results)} methods on this machine (2 CPU cores), data
preparation included.

Setting: `{data}` prepared at {FLAGS.spacing:g} mm in-plane; per-subject split
{dict(example.data.split)} (seed {example.seed}); test volumes: MR {len(first['modalities']['mr']['per_case'])},
CT {len(first['modalities']['ct']['per_case'])}. Every method: 2D U-Net ({FLAGS.features} features, depth
4), {FLAGS.image_size} x {FLAGS.image_size} views, {FLAGS.batch_size} + {FLAGS.batch_size} slices per step,
{FLAGS.steps} steps, Adam lr {FLAGS.learning_rate:g}, Dice + class-weighted clipped CE + L2 1e-4 (UMMKD's
loss for every row); KD alpha 0.5, T 2; CSA lambda 0.5 between the bottleneck and the next decoder block.
Test Dice in 3D per volume on the {FLAGS.grid} grid, the latest checkpoint. One seed, so differences of a
few points are within noise.
{format_table(results, seconds)}
"""
  out = pathlib.Path(FLAGS.output)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(text)
  logging.info("wrote %s", out)
  return 0


if __name__ == "__main__":
  app.run(main)
