"""Speed figures of a config's update step and slice predictor, printed as one JSON line.

  python -m unpaired_seg.benchmark --config=configs/joint.py
  python -m unpaired_seg.benchmark --config=configs/individual.py --steps=50 --config.train.batch_size=16
  python -m unpaired_seg.benchmark --all --arg=tiny --out=/tmp/speed.md   # every config, a table

Random inputs of the configured shapes are used, so no dataset is needed. The step is the
trainer's own (`train.make_train_step`: augmentation on device, then the method's update),
compiled ahead of time so that tracing + lowering and XLA compilation are timed apart from the
steady-state step. Figures: compile seconds, the step's median and quartiles over the timed
steps, training slices per second, GFLOP per step from XLA's cost analysis, the achieved
GFLOP/s, and that rate as a percentage of a jitted float32 matmul's measured in the same process
(a ceiling for this machine that moves with its load, so the percentage is comparable across
runs where raw times are not). `--profile` adds where the step's time goes, per XLA operation
(`op_profile.py`). Device memory where the backend reports it (GPU/TPU). The
persistent compilation cache is off here unless `--compilation_cache` names a folder, so that
compile times are those of a first run.
"""

import json
import pathlib
import sys
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/joint.py[:tiny].",
                                lock_config=True)
flags.DEFINE_integer("steps", 20, "Timed update steps after compilation.")
flags.DEFINE_integer("num_classes", 5, "Classes including background.")
flags.DEFINE_bool("all", False, "Benchmark every config in configs/ and write a markdown table.")
flags.DEFINE_string("arg", "", "With --all: the `:arg` given to every config (e.g. 'tiny').")
flags.DEFINE_string("out", "", "With --all: the markdown file to write (else printed only).")
flags.DEFINE_string("compilation_cache", "", "A persistent compilation cache folder ('' = off).")
flags.DEFINE_bool("profile", False, "Add the step's time per XLA operation (op_profile.py) to the "
                  "figures: by pass and operation, and the slowest instructions.")

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(path: str | pathlib.Path, arg: str | None = None):
  """`get_config(arg)` of a config file, as `--config=path:arg` would give it."""
  import importlib.util
  path = pathlib.Path(path)
  root = str(path.resolve().parents[1])
  if root not in sys.path:   # configs import `configs.common`
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location(f"_benchmark_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def all_config_files() -> list[pathlib.Path]:
  return sorted(p for p in CONFIG_DIR.glob("*.py") if p.stem not in ("common", "__init__"))


def random_batch(config, method, num_classes: int, seed: int = 0) -> dict:
  """A host batch of the shapes the trainer feeds `method` under `config`, random values."""
  rng = np.random.default_rng(seed)
  b = config.train.batch_size
  spatial = tuple(config.data.image_size)
  if config.model.ndim == 3:
    spatial += (config.train.patch_slices,)
    channels = 1
  else:
    channels = 2 * config.data.context_slices + 1
  extras = method.extra_batch_shapes(spatial + (channels,))
  out = {}
  for m in config.data.modalities:
    out[m] = {"image": rng.standard_normal((b,) + spatial + (channels,)).astype(np.float32),
              "label": rng.integers(0, num_classes, (b,) + spatial).astype(np.int32),
              "labelled": np.ones((b,), np.float32)}
    for key, shape in extras.items():
      out[m][key] = rng.standard_normal((b,) + tuple(shape)).astype(np.float32)
  return out


def matmul_gflops(size: int = 1024, repeats: int = 10) -> float:
  """GFLOP/s of a jitted float32 [size, size] @ [size, size] on the default device."""
  a = jax.numpy.asarray(np.random.default_rng(0).standard_normal((size, size)), np.float32)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a))
    times.append(time.perf_counter() - t0)
  return 2 * size ** 3 / float(np.median(times)) / 1e9


def _flops(compiled) -> float | None:
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 - a backend without cost analysis still gets its timings
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def run(config, steps: int, num_classes: int, matmul_rate: float | None = None,
        profile: bool = False) -> dict:
  """Times compilation and `steps` update steps, and a batch of slice predictions."""
  from unpaired_seg import distributed, methods, rng, train  # after flag parsing
  mesh = distributed.make_mesh()
  method = methods.create(config, num_classes, tuple(config.data.modalities),
                          num_data_shards=mesh.shape["data"])
  host = random_batch(config, method, num_classes)
  t0 = time.perf_counter()
  state = method.init(rng.prng_key(config.seed), host)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  state = distributed.replicate(state, mesh)
  batch = distributed.shard_batch(host, mesh)
  steppers = train.make_train_steps(method, config)
  # Every distinct compiled step the run uses (DualStream's alternate regime: one per modality).
  t0 = time.perf_counter()
  lowered = {key: fn.lower(state, batch) for key, fn in steppers.items()}
  lower_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = {key: low.compile() for key, low in lowered.items()}
  compile_s = time.perf_counter() - t0
  flops = [_flops(c) for c in compiled.values()]
  keys = list(compiled)
  times = []
  for i in range(steps + 1):   # the first run of each executable is not timed
    fn = compiled[keys[i % len(keys)]]
    t0 = time.perf_counter()
    state, metrics = fn(state, batch)
    jax.block_until_ready(metrics)
    if i:
      times.append(time.perf_counter() - t0)
  times = np.asarray(times if times else [float("nan")])
  op_times = None
  if profile:
    from unpaired_seg import op_profile
    state, op_times = op_profile.profile_compiled(compiled[keys[0]], state, batch)
  step_s = float(np.median(times))

  predictor = jax.jit(lambda s, x: method.predict(s, x, config.data.modalities[0]))
  x = host[config.data.modalities[0]]["image"]
  jax.block_until_ready(predictor(state, x))
  t0 = time.perf_counter()
  for _ in range(5):
    out = predictor(state, x)
  jax.block_until_ready(out)
  predict_s = (time.perf_counter() - t0) / 5

  slices_per_step = config.train.batch_size * len(config.data.modalities)
  if config.train.regime == "alternate":   # each step trains one modality's slices
    slices_per_step = config.train.batch_size
  figures = {
      "method": config.method, "backend": jax.default_backend(), "devices": jax.device_count(),
      "image_size": list(config.data.image_size), "batch_per_modality": config.train.batch_size,
      "compute_dtype": config.train.compute_dtype,
      "parameters": method.parameter_counts(jax.device_get(state)).get("trainable_total"),
      "compiled_steps": len(keys),
      "init_s": round(init_s, 3), "lower_s": round(lower_s, 3), "compile_s": round(compile_s, 3),
      "compile_first_step_s": round(lower_s + compile_s, 3),
      "step_ms": round(1000 * step_s, 2),
      "step_ms_p25": round(1000 * float(np.percentile(times, 25)), 2),
      "step_ms_p75": round(1000 * float(np.percentile(times, 75)), 2),
      "steps_per_s": round(1 / step_s, 2),
      "train_slices_per_s": round(slices_per_step / step_s, 1),
      "predict_slices_per_s": round(x.shape[0] / predict_s, 1),
  }
  if all(f is not None for f in flops):
    gflop = float(np.mean(flops)) / 1e9
    figures["gflop_per_step"] = round(gflop, 3)
    figures["gflop_per_s"] = round(gflop / step_s, 2)
    if matmul_rate:
      figures["matmul_gflop_per_s"] = round(matmul_rate, 1)
      figures["percent_of_matmul"] = round(100 * gflop / step_s / matmul_rate, 1)
  if op_times is not None:
    figures["profile"] = op_times
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    figures["peak_device_memory_mib"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
  return figures


TABLE_COLUMNS = ("config", "method", "compile_first_step_s", "step_ms", "step_ms_p25",
                 "step_ms_p75", "train_slices_per_s", "gflop_per_step", "gflop_per_s",
                 "percent_of_matmul")


def markdown_table(rows: list[dict]) -> str:
  lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + " --- |" * len(TABLE_COLUMNS)]
  for row in rows:
    lines.append("| " + " | ".join(str(row.get(c, "")) for c in TABLE_COLUMNS) + " |")
  return "\n".join(lines) + "\n"


def run_all(arg: str, steps: int, num_classes: int) -> list[dict]:
  rate = matmul_gflops()
  rows = []
  for path in all_config_files():
    config = load_config(path, arg)
    row = {"config": f"{path.relative_to(CONFIG_DIR.parent)}{':' + arg if arg else ''}"}
    row.update(run(config, steps, num_classes, matmul_rate=rate))
    print(json.dumps(row))   # the command's output, one line per config
    sys.stdout.flush()
    rows.append(row)
  return rows


def main(argv):
  del argv
  from unpaired_seg import compile_cache
  if FLAGS.profile:
    from unpaired_seg import op_profile
    op_profile.enable()   # before the backend starts
  compile_cache.configure(FLAGS.compilation_cache or "off")
  if FLAGS.all:
    rows = run_all(FLAGS.arg, FLAGS.steps, FLAGS.num_classes)
    table = markdown_table(rows)
    if FLAGS.out:
      from unpaired_seg.data import pipeline
      pipeline.write_text_atomic(FLAGS.out, table)
    print(table)
    return
  if FLAGS.config is None:
    raise app.UsageError("--config is required (or --all)")
  figures = run(FLAGS.config, FLAGS.steps, FLAGS.num_classes, matmul_rate=matmul_gflops(),
                profile=FLAGS.profile)
  print(json.dumps(figures))  # the command's output
  sys.stdout.flush()


if __name__ == "__main__":
  sys.path.insert(0, ".")
  app.run(main)
