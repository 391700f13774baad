"""Multi-host training with real processes: 2 local CPU processes, each its own interpreter.

The job of two processes with one device each must train as one process with two devices (the
same global batch, the same losses to float tolerance), write one set of workdir files, and a run
checkpointed in one layout must resume in the other.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from configs import joint
from unpaired_seg.data import loader

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _command(workdir: pathlib.Path, steps: int, phantom: pathlib.Path) -> list[str]:
  return [sys.executable, "-m", "unpaired_seg.main", "--config=configs/joint.py:tiny",
          f"--workdir={workdir}", f"--config.data.root={phantom}",
          f"--config.train.steps={steps}", "--config.train.log_every=1",
          "--config.train.checkpoint_every=2", "--config.train.eval_every=2",
          "--config.eval.metrics=('dice',)", "--config.eval.save_predictions=0"]


def _env(devices: int, cache: pathlib.Path) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu", UNPAIRED_SEG_CACHE=str(cache),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.pop("JAX_ENABLE_X64", None)
  return env


def _start(workdir, steps, phantom, cache, *, processes: int) -> list[subprocess.Popen]:
  """`processes` processes of one device each, or (processes=0) one process with two devices."""
  if processes == 0:
    return [subprocess.Popen(_command(workdir, steps, phantom), cwd=ROOT, env=_env(2, cache),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
  port = _free_port()
  return [subprocess.Popen(
      _command(workdir, steps, phantom) + [
          "--multihost", f"--coordinator_address=localhost:{port}",
          f"--num_processes={processes}", f"--process_id={i}"],
      cwd=ROOT, env=_env(1, cache), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(processes)]


def _finish(procs: list[subprocess.Popen]) -> list[str]:
  outputs = []
  for p in procs:
    try:
      out, _ = p.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outputs.append(out)
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} exited {p.returncode}:\n{out[-4000:]}"
  return outputs


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in rows if "loss" in r]
  assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """(one process, two devices: 4 steps), (two processes: 2 steps, then resumed by one: 4)."""
  root = tmp_path_factory.mktemp("multihost")
  cache = root / "cache"
  config = joint.get_config("tiny")
  config.data.root = str(root / "phantom")
  loader.resolve_dataset(config)   # generated once, before the processes read it
  one, two = root / "one_process", root / "two_processes"
  reference = _start(one, 4, config.data.root, cache, processes=0)
  job = _start(two, 2, config.data.root, cache, processes=2)
  job_logs = _finish(job)
  _finish(reference)
  before_resume = sorted(p.name for p in two.iterdir())
  resume_log = _finish(_start(two, 4, config.data.root, cache, processes=0))[0]
  return {"one": one, "two": two, "job_logs": job_logs, "before_resume": before_resume,
          "resume_log": resume_log}


def test_two_processes_train_as_one_process_with_two_devices(runs):
  reference, job = _losses(runs["one"]), _losses(runs["two"])
  assert sorted(reference) == [1, 2, 3, 4]
  np.testing.assert_allclose([job[s] for s in (1, 2)], [reference[s] for s in (1, 2)],
                             rtol=1e-5, atol=1e-6)
  # Both processes ran the job: each one logged its own index.
  assert "process 0 of 2" in runs["job_logs"][0] and "process 1 of 2" in runs["job_logs"][1]


def test_only_process_0_writes_the_workdir(runs):
  names = runs["before_resume"]
  logs = [n for n in names if n.startswith("train.") and n != "train.INFO"]
  assert len(logs) == 1, names                      # one log file, not one per process
  for name in ("config.json", "splits.json", "summary.json", "metrics.jsonl", "model_info.json"):
    assert name in names
  assert not any(n.endswith(".tmp") or n.startswith(".") for n in names), names


def test_a_checkpoint_of_two_processes_resumes_in_one(runs):
  reference, resumed = _losses(runs["one"]), _losses(runs["two"])
  assert "resumed from step 2" in runs["resume_log"]
  assert sorted(resumed) == [1, 2, 3, 4]
  np.testing.assert_allclose([resumed[s] for s in (3, 4)], [reference[s] for s in (3, 4)],
                             rtol=1e-5, atol=1e-6)
