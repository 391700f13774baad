"""Peak host memory of the data loader against the number of cases: in memory vs lazily read.

  python benchmarks/loader_memory.py --cases=25,100,400 --shape=48,48,16

For each size it generates a phantom (that many subjects per modality, MR and CT), then runs
`loader.load_data` and draws `--steps` batches of every modality in a fresh process per path, and
prints that process's peak RSS (`resource.getrusage`, which includes the imports, and for the
lazy paths the pages of the memmaps kept open, at most `lazy_cases.OPEN_BYTES`):

  memory      load_data(lazy=False): every volume decoded and held in memory (the old path)
  lazy_cold   load_data(): normalised views built once from the dataset's .npy arrays, then read
  lazy_warm   load_data() again: the views exist; cases are only memory-mapped
  lazy_nifti  load_data() on a copy without the arrays: decoded into the cache, then as cold

Everything is written under --work (a temporary folder by default, removed at the end).
"""

import argparse
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
PATHS = ("memory", "lazy_cold", "lazy_warm", "lazy_nifti")


def _child(args) -> None:
  """One measurement: load the data, draw batches, print peak RSS as JSON."""
  sys.path.insert(0, str(REPO))
  from configs import common
  from unpaired_seg.data import loader
  base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  config = common.get_base_config(tiny=True)
  config.data.dataset = "folder"
  config.data.root = args.root
  config.data.image_size = tuple(int(s) for s in args.shape.split(",")[:2])
  start = time.perf_counter()
  data = loader.load_data(config, pathlib.Path(args.workdir), lazy=args.path != "memory")
  loaded = time.perf_counter() - start
  after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  for step in range(args.steps):
    loader.sampler_batch(data, step)
  print(json.dumps({
      "imports_mib": base / 1024, "after_load_mib": after_load / 1024,
      "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "load_s": loaded, "sample_s": time.perf_counter() - start - loaded,
      "volumes": sum(len(c) for part in data.cases.values() for c in part.values())}))


def _measure(root: pathlib.Path, work: pathlib.Path, path: str, args) -> dict:
  env = {**os.environ, "UNPAIRED_SEG_CACHE": str(work / "cache"), "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, __file__, "--child", f"--root={root}", f"--path={path}",
         f"--workdir={work / ('run_' + path)}", f"--shape={args.shape}", f"--steps={args.steps}"]
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if out.returncode:
    raise SystemExit(f"{path} on {root} failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="25,100,400", help="subjects per modality, per size")
  parser.add_argument("--shape", default="48,48,16", help="phantom volume shape X,Y,Z")
  parser.add_argument("--steps", type=int, default=100, help="batches drawn after loading")
  parser.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--root", help=argparse.SUPPRESS)
  parser.add_argument("--path", choices=PATHS, help=argparse.SUPPRESS)
  parser.add_argument("--workdir", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return _child(args)
  sys.path.insert(0, str(REPO))
  from unpaired_seg.data import arrays, phantom
  shape = tuple(int(s) for s in args.shape.split(","))
  work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="loader_memory_"))
  print(f"phantom MR+CT, shape {shape}, {args.steps} batches after loading; peak RSS in MiB "
        "(imports alone: see the first column)\n")
  print("| subjects per modality | volumes | imports | memory | lazy_cold | lazy_warm | lazy_nifti "
        "| lazy_warm after load | load s (memory / lazy_warm) |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  try:
    for n in (int(s) for s in args.cases.split(",")):
      size = work / f"n{n}"
      root = size / "phantom"
      phantom.generate(root, num_subjects=n, shape=shape, seed=0)
      plain = size / "plain"        # the same dataset without its arrays
      shutil.copytree(root, plain, ignore=shutil.ignore_patterns(arrays.ARRAYS_DIR))
      results = {}
      for path in PATHS:
        results[path] = _measure(plain if path == "lazy_nifti" else root, size, path, args)
      r = results
      print(f"| {n} | {r['memory']['volumes']} | {r['memory']['imports_mib']:.0f} | "
            + " | ".join(f"{r[p]['peak_mib']:.0f}" for p in PATHS)
            + f" | {r['lazy_warm']['after_load_mib']:.0f}"
            + f" | {r['memory']['load_s']:.1f} / {r['lazy_warm']['load_s']:.1f} |", flush=True)
      shutil.rmtree(size)
  finally:
    if not args.work:
      shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
