"""Times the project's `joint` train step against its PyTorch twin, alternately, on the same core(s).

  pip install -r benchmarks/requirements.txt
  python benchmarks/compare_torch.py --threads=1
  python benchmarks/compare_torch.py --threads=2 --steps=30

Both steps see the same shapes (configs/joint.py: 8 slices per modality, two modalities in one
mixed batch of 64 x 64 x 1, 5 classes) without augmentation (the twin has none). The two
frameworks run one step each in turn, so that whatever else loads the machine hits both alike;
the ratio JAX / PyTorch is taken per pair of steps and its median and quartiles are printed as
one JSON line. `--threads=1` pins the process to one core (XLA without its Eigen thread pool,
torch.set_num_threads(1)); `--threads=2` gives both frameworks two cores.
"""

import argparse
import json
import os
import sys
import time


def parse():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--threads", type=int, default=1, help="cores for both frameworks")
  p.add_argument("--steps", type=int, default=20, help="timed steps per framework")
  p.add_argument("--config", default="configs/joint.py", help="a U-Net config of the project")
  p.add_argument("--channels_first", action="store_true", help="torch in NCHW instead of NHWC")
  return p.parse_args()


def main():
  args = parse()
  cpus = sorted(os.sched_getaffinity(0))
  if args.threads > len(cpus):
    sys.exit(f"--threads={args.threads}: only {len(cpus)} cores are available")
  os.sched_setaffinity(0, set(cpus[:args.threads]))
  if args.threads == 1:  # before JAX starts: no Eigen thread pool in XLA:CPU
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, root)
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

  import jax
  import numpy as np
  import torch

  import torch_unet
  from unpaired_seg import benchmark, distributed, methods, rng, train

  torch.set_num_threads(args.threads)
  config = benchmark.load_config(os.path.join(root, args.config))
  config.data.augment.enabled = False
  if config.model.name != "unet" or config.data.context_slices:
    sys.exit(f"--config={args.config}: the twin is a 2D U-Net")
  num_classes = 5
  mesh = distributed.make_mesh()
  method = methods.create(config, num_classes, tuple(config.data.modalities))
  host = benchmark.random_batch(config, method, num_classes)
  state = distributed.replicate(method.init(rng.prng_key(0), host), mesh)
  batch = distributed.shard_batch(host, mesh)
  step = train.make_train_step(method, config)
  h, w = config.data.image_size
  slices = config.train.batch_size * len(config.data.modalities)
  twin = torch_unet.TrainStep(slices, h, w, in_channels=1, num_classes=num_classes,
                              features=config.model.features, depth=config.model.depth,
                              channels_last=not args.channels_first)

  def jax_step():
    nonlocal state
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics["loss"])

  for _ in range(3):   # compile and warm up both
    jax_step()
    twin()
  times = {"jax": [], "torch": []}
  for _ in range(args.steps):
    for name, fn in (("jax", jax_step), ("torch", twin)):
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  jx, tr = np.asarray(times["jax"]), np.asarray(times["torch"])
  ratio = jx / tr
  print(json.dumps({
      "threads": args.threads, "config": args.config, "slices": slices, "image_size": [h, w],
      "torch_layout": "NCHW" if args.channels_first else "NHWC", "steps": args.steps,
      "jax_ms_median": round(1e3 * float(np.median(jx)), 1),
      "torch_ms_median": round(1e3 * float(np.median(tr)), 1),
      "ratio_median": round(float(np.median(ratio)), 3),
      "ratio_p25": round(float(np.percentile(ratio, 25)), 3),
      "ratio_p75": round(float(np.percentile(ratio, 75)), 3),
      "jax": jax.__version__, "torch": torch.__version__}))


if __name__ == "__main__":
  main()
