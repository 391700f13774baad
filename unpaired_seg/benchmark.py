"""Speed and memory figures of a config's update step and slice predictor, printed as one JSON line.

  python -m unpaired_seg.benchmark --config=configs/joint.py
  python -m unpaired_seg.benchmark --config=configs/individual.py --steps=50 --config.train.batch_size=16

Random inputs of the configured shapes are used, so no dataset is needed. Compile time is reported
apart from the steady-state step time; device memory where the backend reports it (GPU/TPU).
"""

import json
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


def random_batch(config, num_classes: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  b = config.train.batch_size
  h, w = config.data.image_size
  c = 2 * config.data.context_slices + 1
  return {m: {"image": rng.standard_normal((b, h, w, c)).astype(np.float32),
              "label": rng.integers(0, num_classes, (b, h, w)).astype(np.int32),
              "labelled": np.ones((b,), np.float32)}
          for m in config.data.modalities}


def run(config, steps: int, num_classes: int) -> dict:
  """Times compilation and `steps` update steps, and a batch of slice predictions."""
  from unpaired_seg import methods, rng, train  # after flag parsing
  mesh = train.make_mesh()
  method = methods.create(config, num_classes, tuple(config.data.modalities),
                          num_data_shards=mesh.shape["data"])
  host = random_batch(config, num_classes)
  t0 = time.perf_counter()
  state = method.init(rng.prng_key(config.seed), host)
  init_s = time.perf_counter() - t0
  state = train.replicate(state, mesh)
  batch = train.shard_batch(host, mesh)
  step = train.make_train_step(method, config)
  t0 = time.perf_counter()
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / max(steps, 1)

  predictor = jax.jit(lambda s, x: method.predict(s, x, config.data.modalities[0]))
  x = host[config.data.modalities[0]]["image"]
  jax.block_until_ready(predictor(state, x))
  t0 = time.perf_counter()
  for _ in range(5):
    out = predictor(state, x)
  jax.block_until_ready(out)
  predict_s = (time.perf_counter() - t0) / 5

  slices_per_step = config.train.batch_size * len(config.data.modalities)
  figures = {
      "method": config.method, "backend": jax.default_backend(), "devices": jax.device_count(),
      "image_size": list(config.data.image_size), "batch_per_modality": config.train.batch_size,
      "parameters": method.parameter_counts(jax.device_get(state)).get("trainable_total"),
      "init_s": round(init_s, 3), "compile_first_step_s": round(compile_s, 3),
      "step_ms": round(1000 * step_s, 2), "steps_per_s": round(1 / step_s, 2),
      "train_slices_per_s": round(slices_per_step / step_s, 1),
      "predict_slices_per_s": round(x.shape[0] / predict_s, 1),
  }
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    figures["peak_device_memory_mib"] = round(stats["peak_bytes_in_use"] / 2**20, 1)
  return figures


def main(argv):
  del argv
  print(json.dumps(run(FLAGS.config, FLAGS.steps, FLAGS.num_classes)))  # the command's output
  sys.stdout.flush()


if __name__ == "__main__":
  sys.path.insert(0, ".")
  flags.mark_flags_as_required(["config"])
  app.run(main)
