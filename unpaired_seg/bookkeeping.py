"""A run's bookkeeping: checkpoints, the metric log, provenance, the log file, the finiteness check.

Used by the trainer and by `predict` (which restores checkpoints without training). Only process 0
writes files (see `distributed.is_main_process`); orbax's checkpoint managers coordinate the
processes themselves.
"""

import json
import logging as std_logging
import os
import pathlib
import platform
import subprocess
import time
from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging


class TrainingDiverged(FloatingPointError):
  """A loss or metric became NaN or inf."""


class _QuietLibraries:
  """Drops INFO records from orbax and JAX internals: every checkpoint would log dozens of lines."""
  _NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}_src{os.sep}")

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or not any(n in record.pathname for n in self._NOISY)


def log_to_file(workdir: pathlib.Path) -> None:
  handler = logging.get_absl_handler()
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _QuietLibraries) for f in absl_logger.filters):
    absl_logger.addFilter(_QuietLibraries())
  try:
    handler.use_absl_log_file("train", str(workdir))
    # Keep the terminal informed as well as the file.
    from absl import flags
    if flags.FLAGS.is_parsed():
      flags.FLAGS.alsologtostderr = True
  except OSError as e:  # an unwritable log file must not stop training
    logging.warning("could not log to %s: %s", workdir, e)


def provenance() -> dict:
  """Git revision and package versions, saved with every run."""
  versions = {"python": platform.python_version()}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "nibabel"):
    try:
      module = __import__(name, fromlist=["__version__"])
      versions[name] = getattr(module, "__version__", "?")
    except ImportError:
      versions[name] = None
  try:
    root = pathlib.Path(__file__).resolve().parents[1]
    versions["git"] = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"],
                                     capture_output=True, text=True, timeout=5).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    versions["git"] = None
  return versions


def _processes(name: str) -> ocp.options.MultiprocessingOptions:
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=f"checkpoints_{name}")


class Checkpoints:
  """The latest N checkpoints and the best one by validation Dice, each written atomically."""

  def __init__(self, workdir: pathlib.Path, keep: int):
    # Orbax's background commit rejects a relative path, as in `--workdir=runs/mmsdnet`.
    root = pathlib.Path(workdir).absolute() / "checkpoints"
    # In a multi-process job both managers save the same step; their barriers need distinct names.
    self.latest = ocp.CheckpointManager(
        root / "latest", options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, multiprocessing_options=_processes("latest")))
    self.best = ocp.CheckpointManager(
        root / "best", options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m["val_dice"], best_mode="max",
            multiprocessing_options=_processes("best")))

  # A run killed after a 'best' save but before the next 'latest' one resumes from an earlier step
  # and reaches that step again; training is deterministic, so the state saved then is the same and
  # the existing checkpoint is kept.

  def save_latest(self, step: int, state, force: bool = False) -> None:
    if step not in self.latest.all_steps():
      self.latest.save(step, args=ocp.args.StandardSave(state), force=force)

  def save_best(self, step: int, state, val_dice: float) -> None:
    if step not in self.best.all_steps():
      self.best.save(step, args=ocp.args.StandardSave(state), metrics={"val_dice": val_dice},
                     force=True)

  def restore(self, which: str, target):
    """Restores `which` ('latest' or 'best') into the structure of `target`; None if absent.

    A 'latest' checkpoint that cannot be read (a run killed while writing it, a truncated file) is
    skipped with a warning naming its step and deleted, so that the run resumes from the newest
    good one and saves that step anew; when none can be read, the newest one's error is raised.
    """
    manager = self.latest if which == "latest" else self.best
    if which == "latest":
      steps = sorted(manager.all_steps(), reverse=True)
    else:
      steps = [] if manager.best_step() is None else [manager.best_step()]
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    first_error, skipped = None, []
    for step in steps:
      try:
        restored = manager.restore(step, args=ocp.args.StandardRestore(abstract))
      except Exception as e:  # noqa: BLE001  (orbax and tensorstore raise many kinds)
        first_error = first_error or (step, e)
        skipped.append(step)
        continue
      for bad in skipped:
        logging.warning("%s: checkpoint of step %d cannot be read (%s); resuming from step %d",
                        manager.directory, bad, type(first_error[1]).__name__, step)
        manager.delete(bad)
      return restored, step
    if first_error is None:
      return None, None
    step, e = first_error
    if isinstance(e, ValueError):
      # Orbax restores into the structure the config builds; its own message lists leaves only.
      raise ValueError(
          f"{manager.directory / str(step)}: the checkpoint does not fit the state this config "
          f"builds; keys that shape the state (train.ema_decay, train.optimizer, "
          f"train.grad_clip, model.*) may differ from the run that saved it. {e}") from e
    raise e

  def wait(self) -> None:
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.latest.close()
    self.best.close()


# =============================================================================================
# Metric writers: JSONL and TensorBoard event files (no TensorFlow).
# =============================================================================================

class MetricWriter:
  """Appends metrics to metrics.jsonl and TensorBoard events; on resume drops rows past the step.

  Every row carries `wall_s`, the run's wall time in seconds, counted on across resumes from the
  last kept row, so that a learning curve against time shows where a compute budget saturates.
  """

  def __init__(self, workdir: pathlib.Path, resume_step: int):
    self.path = workdir / "metrics.jsonl"
    self._wall_offset = 0.0
    self._main = jax.process_index() == 0   # the other processes of a job write nothing
    if self._main and self.path.exists():
      rows = [(line, json.loads(line)) for line in self.path.read_text().splitlines()
              if line.strip()]
      kept = [(line, row) for line, row in rows if row.get("step", 0) <= resume_step]
      self._wall_offset = max((row.get("wall_s", 0.0) for _, row in kept), default=0.0)
      tmp = self.path.with_suffix(".jsonl.tmp")
      tmp.write_text("".join(line + "\n" for line, _ in kept))
      os.replace(tmp, self.path)
    self._started = time.monotonic()
    self._tb = None
    if self._main:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(workdir / "tb"))
      except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard events")

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._main:
      return
    # NaN and inf are not JSON: a non-finite value is written as null.
    row = {"step": int(step),
           **{k: float(v) if np.isfinite(float(v)) else None for k, v in scalars.items()},
           "wall_s": round(self._wall_offset + time.monotonic() - self._started, 2)}
    with self.path.open("a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, float(v), int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


class Chrono:
  """Steps per second and ETA, measured from the first step after compilation."""

  def __init__(self, first_step: int, total_steps: int):
    self.total = total_steps
    self.start_step = None
    self.start_time = None
    self.first_step = first_step

  def tick(self, step: int) -> None:
    if self.start_step is None and step > self.first_step:   # the first step paid for compilation
      self.start_step, self.start_time = step, time.perf_counter()

  def rate(self, step: int) -> tuple[float, float]:
    """(steps/s, ETA seconds); NaN until two timed steps exist."""
    if self.start_step is None or step <= self.start_step:
      return float("nan"), float("nan")
    rate = (step - self.start_step) / (time.perf_counter() - self.start_time)
    return rate, (self.total - step) / rate


def check_finite(step: int, metrics: Mapping[str, float], last_saved: int | None = None) -> None:
  """Stops training on a non-finite metric; says which checkpoint (if any) is left to resume."""
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    kept = (f"the last good checkpoint (step {last_saved}) is kept in the workdir"
            if last_saved else "no checkpoint was saved before it")
    raise TrainingDiverged(
        f"step {step}: non-finite {bad}; training stopped, {kept}; lower train.learning_rate "
        f"or check the data.")
