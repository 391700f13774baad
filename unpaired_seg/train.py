"""The one trainer for every method: data, mesh, state, update loop, checkpoints, logs, evaluation.

  python -m unpaired_seg.main --config=configs/joint.py --workdir=runs/joint

Re-running the same command resumes from the latest checkpoint in the workdir. Everything a run
needs to be reproduced is in the workdir: config.json, splits.json, versions, metrics.jsonl,
TensorBoard events (tb/), train.log, checkpoints/{latest,best}, summary.json.
"""

import contextlib
import dataclasses
import json
import logging as std_logging
import os
import pathlib
import platform
import subprocess
import sys
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unpaired_seg import compile_cache, config_schema
from unpaired_seg import workdir as workdir_lib
from unpaired_seg.workdir import NoRunError, WorkdirError  # noqa: F401  (part of the API)
from unpaired_seg import evaluate as evaluate_lib
from unpaired_seg import methods
from unpaired_seg import rng
from unpaired_seg.data import augment as augment_lib
from unpaired_seg.data import dataset as ds
from unpaired_seg.data import phantom
from unpaired_seg.data import pipeline


class TrainingDiverged(FloatingPointError):
  """A loss or metric became NaN or inf."""


# What a user's input can get wrong: main.py prints these as one line, without a traceback.
USER_ERRORS = (config_schema.ConfigError, ds.DatasetError, pipeline.SplitError, WorkdirError,
               TrainingDiverged)


# =============================================================================================
# Workdir, logging, provenance.
# =============================================================================================

def setup_workdir(config: ml_collections.ConfigDict, workdir: os.PathLike, *,
                  resuming_check: bool = False, allow_config_change: bool = False) -> pathlib.Path:
  """Validates the config, creates the workdir, logs to a file there and writes config.json.

  With `resuming_check`, a workdir that holds a checkpoint must have been trained with the same
  config (train.steps aside: extending a run is what resuming is for); otherwise a ConfigError
  lists the changed keys, unless `allow_config_change`.
  """
  config_schema.validate(config, methods.REGISTRY)
  workdir = workdir_lib.check_workdir(workdir)
  if resuming_check:
    changed = workdir_lib.changed_keys(workdir, config)
    if changed and not allow_config_change:
      raise config_schema.ConfigError(
          f"{workdir / 'config.json'}: resuming with changed config keys {', '.join(changed)}; "
          f"use a new --workdir, or --allow_config_change to resume anyway")
    if changed:
      logging.warning("resuming with changed config keys: %s", ", ".join(changed))
  cache = compile_cache.configure(config.train.compilation_cache,
                                  default=default_cache_dir() / "jax_compilation_cache")
  _log_to_file(workdir)
  pipeline.write_json_atomic(workdir / "config.json", config.to_dict())
  pipeline.write_json_atomic(workdir / "versions.json", provenance())
  logging.info("config:\n%s", config)
  logging.info("JAX %s, process %d of %d, devices: %s", jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  logging.info("persistent compilation cache: %s", cache or "off")
  return workdir


class _QuietLibraries:
  """Drops INFO records from orbax and JAX internals: every checkpoint would log dozens of lines."""
  _NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}jax{os.sep}_src{os.sep}")

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or not any(n in record.pathname for n in self._NOISY)


def _log_to_file(workdir: pathlib.Path) -> None:
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


# =============================================================================================
# Data.
# =============================================================================================

def default_cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("UNPAIRED_SEG_CACHE",
                                     pathlib.Path.home() / ".cache" / "unpaired_seg"))


def resolve_dataset(config: ml_collections.ConfigDict) -> ds.Manifest:
  """The manifest of the configured dataset; the phantom is generated on first use."""
  data = config.data
  if data.dataset == "phantom":
    p = data.phantom
    shape = tuple(int(s) for s in p.shape)
    misalignment = float(p.get("pair_misalignment", 1.0))
    name = f"phantom_{p.mode}_n{p.num_subjects}_{'x'.join(map(str, shape))}_seed{p.seed}"
    if misalignment != 1:
      name += f"_misalign{misalignment:g}"
    root = pathlib.Path(data.root) if data.root else default_cache_dir() / name
    try:
      return phantom.ensure(root, mode=p.mode, num_subjects=p.num_subjects, shape=shape,
                            seed=p.seed, modalities=tuple(data.modalities),
                            pair_misalignment=misalignment)
    except ValueError as e:
      raise ValueError(f"config keys 'data.phantom.*' / 'data.modalities': {e}") from e
  return ds.load_manifest(pathlib.Path(data.root))


@dataclasses.dataclass
class Data:
  manifest: ds.Manifest
  modalities: tuple[str, ...]
  splits: dict
  cases: dict[str, dict[str, list[pipeline.PreparedCase]]]   # part -> modality -> cases
  samplers: dict[str, pipeline.SliceSampler]

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.manifest.labels


def load_data(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> Data:
  """Splits, normalisation (training-split statistics), prepared cases and samplers.

  Writes splits.json, normalization.json and model_info.json (what `predict` needs) into the
  workdir; the first two are reused, and checked, when they exist.
  """
  manifest = resolve_dataset(config)
  modalities = tuple(config.data.modalities)
  for m in modalities:
    if m not in manifest.modalities:
      raise config_schema.ConfigError(
          f"config key 'data.modalities': {m!r} is not in {manifest.root / 'dataset.json'} "
          f"(it has {sorted(manifest.modalities)})")
  splits = pipeline.load_or_create_splits(workdir / "splits.json", manifest, modalities,
                                          config.data.split.to_dict(), seed=config.seed,
                                          require_val=config.eval.checkpoint == "best")
  volumes = {m: ds.load_modality(manifest, m) for m in modalities}
  normalization = pipeline.load_or_fit_normalization(
      workdir / "normalization.json",
      pipeline.resolve_normalization(manifest, modalities, config.data.normalization),
      {m: pipeline.cases_in(volumes[m], splits, "train") for m in modalities})
  cases = {"train": {}, "val": {}, "test": {}}
  for m in modalities:
    prepared = pipeline.prepare_cases(volumes.pop(m), normalization[m],
                                      tuple(config.data.image_size), crop=config.data.crop,
                                      manifest=manifest)
    for part in cases:
      cases[part][m] = pipeline.cases_in(prepared, splits, part)
    logging.info("%s: %d train, %d val, %d test volumes (%s)", m, len(cases["train"][m]),
                 len(cases["val"][m]), len(cases["test"][m]), normalization[m]["scheme"])
  cases["train"] = drop_labels(config, cases["train"], workdir)
  for m in modalities:
    warn_if_views_clip(config, m, pipeline.view_coverage(cases["train"][m], manifest.labels))
  everything = [c for part in cases.values() for m_cases in part.values() for c in m_cases]
  pipeline.write_json_atomic(workdir / "model_info.json", pipeline.model_info(
      method=config.method, class_names=manifest.labels, modalities=modalities,
      image_size=config.data.image_size, context_slices=config.data.context_slices,
      crop=config.data.crop, target_spacing=pipeline.target_spacing_of(everything),
      normalization=normalization, dataset=manifest.name,
      source_axis_flips={m: manifest.modalities[m].source_axis_flips for m in modalities}))
  samplers = {
      m: pipeline.SliceSampler(cases["train"][m], config.train.batch_size,
                               config.data.foreground_fraction, config.data.context_slices,
                               seed=config.seed, stream=i,
                               oversample=config.data.oversample)
      for i, m in enumerate(modalities)}
  return Data(manifest, modalities, splits, cases, samplers)


VIEW_COVERAGE_WARNING = 0.9


def warn_if_views_clip(config: ml_collections.ConfigDict, modality: str,
                       coverage: dict[str, float]) -> None:
  """Logs what the training views keep of each organ; warns where the view size clips one."""
  if not coverage:
    return
  logging.info("%s: training views keep %s of each class's labelled voxels", modality,
               ", ".join(f"{k} {v:.0%}" for k, v in coverage.items()))
  clipped = {k: v for k, v in coverage.items() if v < VIEW_COVERAGE_WARNING}
  if clipped:
    logging.warning(
        "%s: the %s training views (config key 'data.image_size') keep only %s of the labelled "
        "voxels; the model may not learn what it cannot see: a larger data.image_size (or a "
        "coarser prepare --spacing) keeps more", modality,
        "x".join(str(int(s)) for s in config.data.image_size),
        ", ".join(f"{v:.0%} of {k}" for k, v in clipped.items()))


def drop_labels(config: ml_collections.ConfigDict, train_cases: dict, workdir: pathlib.Path) -> dict:
  """Keeps the labels of `data.label_fraction` of the target modality's training subjects.

  The choice is per subject (never per slice), seeded, and written to `labelled_subjects.json`; a
  resumed run reads it back instead of drawing again.
  """
  target = config.data.target_modality
  if not target:
    return train_cases
  if target not in train_cases:
    raise config_schema.ConfigError(
        f"config key 'data.target_modality': {target!r} is not one of {sorted(train_cases)}")
  path = workdir / "labelled_subjects.json"
  subjects = sorted({c.subject for c in train_cases[target]})
  if path.exists():
    keep = set(json.loads(path.read_text())[target])
  else:
    n_keep = int(round(config.data.label_fraction * len(subjects)))
    order = np.random.default_rng([config.seed, 7]).permutation(subjects)
    keep = set(order[:n_keep].tolist())
    pipeline.write_json_atomic(path, {target: sorted(keep)})
  logging.info("%s: %d of %d training subjects keep their labels", target, len(keep), len(subjects))
  out = dict(train_cases)
  out[target] = [c if c.subject in keep else dataclasses.replace(c, label=None)
                 for c in train_cases[target]]
  return out


def host_batch(data: Data, step: int, method=None) -> dict:
  """The global batch of `step` on the host, one stream per modality.

  A method that needs other batches (e.g. pairs of slices across modalities) defines
  `host_batch(data, step)` itself; it must be a pure function of the step, as this one is.
  """
  if method is not None and hasattr(method, "host_batch"):
    return method.host_batch(data, step)
  out = {}
  for m, sampler in data.samplers.items():
    b = sampler.batch(step)
    out[m] = {"image": b["image"], "label": b["label"], "labelled": b["labelled"]}
  return out


# =============================================================================================
# Mesh and sharding.
# =============================================================================================

def make_mesh() -> Mesh:
  """All devices on one `data` axis (one device on a laptop)."""
  return Mesh(np.asarray(jax.devices()), ("data",))


def shard_batch(batch: Mapping, mesh: Mesh):
  """Puts this process's rows of the global host batch on the mesh, batch axis on `data`."""
  sharding = NamedSharding(mesh, P("data"))
  n, i = jax.process_count(), jax.process_index()

  def put(x):
    rows = x.shape[0] // n
    return jax.make_array_from_process_local_data(sharding, x[i * rows:(i + 1) * rows],
                                                  global_shape=x.shape)
  return jax.tree.map(put, batch)


def replicate(tree, mesh: Mesh):
  return jax.device_put(tree, NamedSharding(mesh, P()))


# =============================================================================================
# Update step.
# =============================================================================================

def make_train_step(method, config: ml_collections.ConfigDict, variant=None):
  """The jitted update: on-device augmentation, then the method's own step. State is donated.

  `variant` is one of `method.step_variants()`, a static choice made on the host.
  """
  aug = config.data.augment
  seed = config.seed
  # A method whose batches carry partner slices ('partner_image' [B, k, H, W, C]) may ask for them
  # to move with their own slice's transform, so that augmentation keeps each pair's alignment.
  with_partners = bool(getattr(method, "augment_partners", False))
  settings = augment_lib.Settings.from_config(aug) if aug.enabled else None

  def step_fn(state, batch):
    key = jax.random.fold_in(rng.prng_key(seed), state.step)
    aug_rng, method_rng = jax.random.split(key)
    if settings is not None:
      batch = augment_on_device(aug_rng, batch, settings, with_partners, method.num_classes)
    return method.train_step(state, batch, method_rng, variant)

  return jax.jit(step_fn, donate_argnums=(0,))


def augment_on_device(key: jax.Array, batch: dict, settings, with_partners: bool,
                      num_classes: int = 0) -> dict:
  """The train step's augmentation of every modality's batch (traced inside the step).

  With `with_partners`, a batch's 'partner_image' slices get their own slice's spatial transform.
  Intensity randomisation (`data.augment.intensity`) touches the samples whose label is used.
  """
  batch = dict(batch)
  for i, m in enumerate(sorted(batch)):
    key_m = jax.random.fold_in(key, i)
    image, label = augment_lib.augment_batch(key_m, batch[m]["image"], batch[m]["label"],
                                             settings, batch[m].get("labelled"), num_classes)
    batch[m] = {**batch[m], "image": image, "label": label}
    if with_partners and "partner_image" in batch[m]:
      batch[m]["partner_image"] = augment_lib.augment_partners(
          key_m, batch[m]["partner_image"], settings)
  return batch


def make_train_steps(method, config: ml_collections.ConfigDict) -> dict:
  """One jitted update per step variant of the method, keyed by variant (see methods.base)."""
  return {v: make_train_step(method, config, v) for v in method.step_variants()}


# =============================================================================================
# Checkpoints.
# =============================================================================================

class Checkpoints:
  """The latest N checkpoints and the best one by validation Dice, each written atomically."""

  def __init__(self, workdir: pathlib.Path, keep: int):
    # Orbax's background commit rejects a relative path, as in `--workdir=runs/mmsdnet`.
    root = pathlib.Path(workdir).absolute() / "checkpoints"
    self.latest = ocp.CheckpointManager(
        root / "latest", options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    self.best = ocp.CheckpointManager(
        root / "best", options=ocp.CheckpointManagerOptions(
            max_to_keep=1, create=True, best_fn=lambda m: m["val_dice"], best_mode="max"))

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
    if self.path.exists():
      rows = [(line, json.loads(line)) for line in self.path.read_text().splitlines()
              if line.strip()]
      kept = [(line, row) for line, row in rows if row.get("step", 0) <= resume_step]
      self._wall_offset = max((row.get("wall_s", 0.0) for _, row in kept), default=0.0)
      tmp = self.path.with_suffix(".jsonl.tmp")
      tmp.write_text("".join(line + "\n" for line, _ in kept))
      os.replace(tmp, self.path)
    self._started = time.monotonic()
    self._tb = None
    if jax.process_index() == 0:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(workdir / "tb"))
      except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard events")

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if jax.process_index() != 0:
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


# =============================================================================================
# Train and evaluate.
# =============================================================================================

def build(config: ml_collections.ConfigDict, workdir: pathlib.Path):
  """Data, mesh, method, initial state and checkpoints; shared by training and evaluation."""
  data = load_data(config, workdir)
  mesh = make_mesh()
  n_shards = mesh.shape["data"]
  if config.train.batch_size % n_shards:
    raise config_schema.ConfigError(
        f"config key 'train.batch_size' ({config.train.batch_size}) must be divisible by the "
        f"{n_shards} data-parallel devices")
  method = methods.create(config, num_classes=len(data.class_names), modalities=data.modalities,
                          num_data_shards=n_shards)
  example = host_batch(data, 0, method)
  state = method.init(rng.prng_key(config.seed), example)
  checkpoints = Checkpoints(workdir, config.train.keep_checkpoints)
  return data, mesh, method, state, checkpoints


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: os.PathLike, *,
                       allow_config_change: bool = False) -> dict:
  """Trains (resuming from the workdir if a checkpoint is there), then evaluates on the test split.

  A resume must use the checkpoint's config (see `setup_workdir`) unless `allow_config_change`.

  A second run in the same workdir stops at once with a WorkdirError while the first is alive
  (`workdir.WorkdirLock`; process 0 holds it).

  Returns:
    The summary written to workdir/summary.json.
  """
  path = workdir_lib.check_workdir(workdir)
  lock = workdir_lib.WorkdirLock(path) if jax.process_index() == 0 else contextlib.nullcontext()
  with lock:
    return _train_and_evaluate(config, path, allow_config_change)


def _train_and_evaluate(config, workdir: pathlib.Path, allow_config_change: bool) -> dict:
  workdir = setup_workdir(config, workdir, resuming_check=True,
                          allow_config_change=allow_config_change)
  data, mesh, method, state, checkpoints = build(config, workdir)
  for k, v in method.parameter_counts(state).items():
    logging.info("parameters %s: %d", k, v)
  restored, start = checkpoints.restore("latest", state)
  if restored is not None:
    state = restored
    logging.info("resumed from step %d of %s", start, checkpoints.latest.directory)
  start = int(start or 0)
  state = replicate(state, mesh)
  train_steps = make_train_steps(method, config)
  predictor = evaluate_lib.make_predictor(method)
  writer = MetricWriter(workdir, resume_step=start)
  chrono = Chrono(start, config.train.steps)
  total = config.train.steps
  logging.info("training %s from step %d to %d", config.method, start, total)

  step = start
  try:
    for step in range(start + 1, total + 1):
      batch = shard_batch(host_batch(data, step - 1, method), mesh)
      state, step_metrics = train_steps[method.variant_of_step(step - 1)](state, batch)
      chrono.tick(step)
      log_now = step % config.train.log_every == 0 or step == total
      save_now = step % config.train.checkpoint_every == 0 or step == total
      eval_now = step % config.train.eval_every == 0 or step == total
      if log_now or save_now or eval_now:
        scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        check_finite(step, scalars, checkpoints.latest.latest_step())
        rate, eta = chrono.rate(step)
        if log_now:
          scalars["steps_per_s"] = rate
          writer.write(step, scalars)
          logging.info("step %d/%d  loss %.4f  %.2f steps/s  ETA %s", step, total,
                       scalars["loss"], rate, _format_seconds(eta))
      if eval_now:
        val = evaluate_lib.evaluate_cases(
            predictor, state, _first(data.cases["val"], config.eval.max_val_cases),
            data.class_names, context_slices=config.data.context_slices,
            batch_size=config.eval.batch_size,
            volume_predictor=getattr(method, "predict_volume", None))
        val_dice = evaluate_lib.mean_foreground_dice(val)
        writer.write(step, {"val_dice": val_dice,
                            **{f"val_dice_{m}": r["mean"]["dice"] for m, r in val.items()}})
        logging.info("step %d  validation mean foreground Dice %.4f", step, val_dice)
        checkpoints.save_best(step, state, val_dice)
      if save_now:
        checkpoints.save_latest(step, state)
      if checkpoints.latest.reached_preemption(step):
        checkpoints.save_latest(step, state, force=True)
        checkpoints.wait()
        logging.warning("preempted at step %d; checkpoint saved, re-run the command to resume", step)
        return {}
  finally:
    checkpoints.wait()
    writer.close()

  result = evaluate(config, workdir, method=method, data=data, state_template=state,
                    checkpoints=checkpoints, predictor=predictor)
  checkpoints.close()
  if jax.process_index() == 0:
    from unpaired_seg import report  # matplotlib is loaded only here
    report.plot_progress(workdir / "metrics.jsonl", workdir / "progress.png")
  return result


def evaluate(config: ml_collections.ConfigDict, workdir: os.PathLike, *, method=None, data=None,
             state_template=None, checkpoints=None, predictor=None) -> dict:
  """Evaluates the configured checkpoint on the test split and writes summary.json.

  Also summary.txt (a table per metric), summary_per_case.csv, and the first
  `eval.save_predictions` test predictions per modality under predictions/ (for `compare`).
  """
  workdir = pathlib.Path(workdir)
  owns = checkpoints is None
  if method is None:
    if not (workdir / "checkpoints").is_dir():   # before anything is written there
      raise NoRunError(f"--workdir={workdir}: no checkpoint to evaluate; train first")
    workdir = setup_workdir(config, workdir)
    data, _, method, state_template, checkpoints = build(config, workdir)
    predictor = evaluate_lib.make_predictor(method)
  which = config.eval.checkpoint
  state, step = checkpoints.restore(which, state_template)
  if state is None and which == "best":
    which = "latest"
    state, step = checkpoints.restore(which, state_template)
  if state is None:
    raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}: train first")
  logging.info("evaluating the %s checkpoint (step %d) on the test split, %s grid", which, step,
               config.eval.grid)
  settings = {"surface_tolerance_mm": config.eval.surface_tolerance_mm,
              "hd95_variant": config.eval.hd95_variant, "assd_variant": config.eval.assd_variant}
  writer = evaluate_lib.PredictionWriter(workdir / evaluate_lib.PREDICTIONS_DIR,
                                         config.eval.save_predictions)
  result = evaluate_lib.evaluate_cases(
      predictor, state, data.cases["test"], data.class_names,
      context_slices=config.data.context_slices, batch_size=config.eval.batch_size,
      metrics=tuple(config.eval.metrics), settings=settings, grid=config.eval.grid,
      overlap=config.eval.tile_overlap,
      on_prediction=writer if config.eval.save_predictions else None,
      volume_predictor=getattr(method, "predict_volume", None))
  split = config.data.split
  out = evaluate_lib.summary(
      config.method, data.manifest.name, result, split="test", checkpoint_step=step,
      checkpoint=which, metrics=tuple(config.eval.metrics), settings=settings,
      extra={"class_names": list(data.class_names), "modality_order": list(data.modalities),
             "folds": split.folds, "fold": split.fold if split.folds else None,
             "normalization": {m: json.loads((workdir / "normalization.json").read_text())
                               ["modalities"][m] for m in data.modalities}})
  if hasattr(method, "extra_evaluations"):
    # Method-specific test results (e.g. MMSDNet's multi-input segmentation) beside the others.
    out.update(method.extra_evaluations(state, data, config=config, workdir=workdir,
                                        settings=settings, checkpoint_step=step))
  pipeline.write_json_atomic(workdir / "summary.json", out)
  # `predict` builds the state from the shapes of a training batch (methods may add keys).
  info = json.loads((workdir / "model_info.json").read_text())
  info["example_batch"] = evaluate_lib.batch_spec(host_batch(data, 0, method))
  pipeline.write_json_atomic(workdir / "model_info.json", info)
  (workdir / "summary_per_case.csv").write_text(evaluate_lib.per_case_csv(out["modalities"]))
  table = evaluate_lib.log_table(result, data.class_names, tuple(config.eval.metrics))
  (workdir / "summary.txt").write_text(table + "\n")
  if owns:
    checkpoints.close()
  return out


def _first(cases: Mapping[str, list], n: int) -> dict[str, list]:
  return {m: c[:n] for m, c in cases.items()}


def _format_seconds(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "--"
  seconds = int(seconds)
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def main_entry(argv_config, workdir: str, mode: str, allow_config_change: bool = False) -> None:
  """Called by main.py; kept here so main.py holds no logic."""
  if mode == "train":
    train_and_evaluate(argv_config, workdir, allow_config_change=allow_config_change)
  elif mode == "evaluate":
    evaluate(argv_config, workdir)
  else:
    raise ValueError(f"--mode must be train or evaluate, got {mode!r}")
  sys.stdout.flush()
