"""The one trainer for every method: the update loop and evaluation, on one process or many.

  python -m unpaired_seg.main --config=configs/joint.py --workdir=runs/joint

Re-running the same command resumes from the latest checkpoint in the workdir. Everything a run
needs to be reproduced is in the workdir: config.json, splits.json, versions, metrics.jsonl,
TensorBoard events (tb/), train.log, checkpoints/{latest,best}, summary.json. The data layer is
`data.loader`, the run's files `bookkeeping`, processes and devices `distributed`; a method is a
plug-in behind `methods.base.Method`.
"""

import contextlib
import json
import os
import pathlib
import sys
from collections.abc import Mapping

import jax
import ml_collections
import numpy as np
from absl import logging

from unpaired_seg import bookkeeping, compile_cache, config_schema, distributed
from unpaired_seg import workdir as workdir_lib
from unpaired_seg.bookkeeping import Checkpoints, MetricWriter, TrainingDiverged
from unpaired_seg.workdir import NoRunError, WorkdirError  # noqa: F401  (part of the API)
from unpaired_seg import evaluate as evaluate_lib
from unpaired_seg import methods
from unpaired_seg import rng
from unpaired_seg.data import augment as augment_lib
from unpaired_seg.data import dataset as ds
from unpaired_seg.data import loader
from unpaired_seg.data import pipeline


# What a user's input can get wrong: main.py prints these as one line, without a traceback.
USER_ERRORS = (config_schema.ConfigError, ds.DatasetError, pipeline.SplitError, WorkdirError,
               TrainingDiverged)


# =============================================================================================
# Workdir.
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
                                  default=loader.default_cache_dir() / "jax_compilation_cache")
  if distributed.is_main_process():
    bookkeeping.log_to_file(workdir)
    pipeline.write_json_atomic(workdir / "config.json", config.to_dict())
    pipeline.write_json_atomic(workdir / "versions.json", bookkeeping.provenance())
  logging.info("config:\n%s", config)
  logging.info("JAX %s, process %d of %d, devices: %s", jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  logging.info("persistent compilation cache: %s", cache or "off")
  return workdir


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
  with_partners = bool(method.augment_partners)
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
# Train and evaluate.
# =============================================================================================

def build(config: ml_collections.ConfigDict, workdir: pathlib.Path):
  """Data, mesh, method, initial state (on the mesh) and checkpoints; for training and evaluation."""
  data = loader.load_data(config, workdir, write=distributed.is_main_process())
  mesh = distributed.make_mesh()
  n_shards = mesh.shape["data"]
  if config.train.batch_size % n_shards:
    raise config_schema.ConfigError(
        f"config key 'train.batch_size' ({config.train.batch_size}) must be divisible by the "
        f"{n_shards} data-parallel devices")
  method = methods.create(config, num_classes=len(data.class_names), modalities=data.modalities,
                          num_data_shards=n_shards)
  example = method.host_batch(data, 0)
  state = distributed.replicate(method.init(rng.prng_key(config.seed), example), mesh)
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
  lock = (workdir_lib.WorkdirLock(path) if distributed.is_main_process()
          else contextlib.nullcontext())
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
  train_steps = make_train_steps(method, config)
  predictor = evaluate_lib.make_predictor(method)
  writer = MetricWriter(workdir, resume_step=start)
  chrono = bookkeeping.Chrono(start, config.train.steps)
  total = config.train.steps
  rows = distributed.local_rows(mesh, config.train.batch_size)
  logging.info("training %s from step %d to %d", config.method, start, total)
  distributed.sync("train_loop")   # the processes start compiling the step together

  step = start
  try:
    for step in range(start + 1, total + 1):
      batch = distributed.shard_batch(method.host_batch(data, step - 1, rows), mesh,
                                      config.train.batch_size)
      state, step_metrics = train_steps[method.variant_of_step(step - 1)](state, batch)
      chrono.tick(step)
      log_now = step % config.train.log_every == 0 or step == total
      save_now = step % config.train.checkpoint_every == 0 or step == total
      eval_now = step % config.train.eval_every == 0 or step == total
      if log_now or save_now or eval_now:
        scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        bookkeeping.check_finite(step, scalars, checkpoints.latest.latest_step())
        rate, eta = chrono.rate(step)
        if log_now:
          scalars["steps_per_s"] = rate
          writer.write(step, scalars)
          logging.info("step %d/%d  loss %.4f  %.2f steps/s  ETA %s", step, total,
                       scalars["loss"], rate, _format_seconds(eta))
      if eval_now:
        val = evaluate_lib.evaluate_cases(
            predictor, distributed.local_copy(state),
            _first(data.cases["val"], config.eval.max_val_cases),
            data.class_names, context_slices=config.data.context_slices,
            batch_size=config.eval.batch_size, volume_predictor=method.predict_volume)
        # Every process evaluates alike; the best checkpoint is chosen by process 0's figure.
        val_dice = distributed.broadcast_from_main(evaluate_lib.mean_foreground_dice(val))
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
  if distributed.is_main_process():
    from unpaired_seg import report  # matplotlib is loaded only here
    report.plot_progress(workdir / "metrics.jsonl", workdir / "progress.png")
  return result


def evaluate(config: ml_collections.ConfigDict, workdir: os.PathLike, *, method=None, data=None,
             state_template=None, checkpoints=None, predictor=None) -> dict:
  """Evaluates the configured checkpoint on the test split and writes summary.json.

  Also summary.txt (a table per metric), summary_per_case.csv, and the first
  `eval.save_predictions` test predictions per modality under predictions/ (for `compare`).
  Every process evaluates its own copy of the state alike; process 0 writes.
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
  state = distributed.local_copy(state)
  main = distributed.is_main_process()
  logging.info("evaluating the %s checkpoint (step %d) on the test split, %s grid", which, step,
               config.eval.grid)
  settings = {"surface_tolerance_mm": config.eval.surface_tolerance_mm,
              "hd95_variant": config.eval.hd95_variant, "assd_variant": config.eval.assd_variant}
  save = config.eval.save_predictions if main else 0
  writer = evaluate_lib.PredictionWriter(workdir / evaluate_lib.PREDICTIONS_DIR, save)
  result = evaluate_lib.evaluate_cases(
      predictor, state, data.cases["test"], data.class_names,
      context_slices=config.data.context_slices, batch_size=config.eval.batch_size,
      metrics=tuple(config.eval.metrics), settings=settings, grid=config.eval.grid,
      overlap=config.eval.tile_overlap, on_prediction=writer if save else None,
      volume_predictor=method.predict_volume)
  split = config.data.split
  out = evaluate_lib.summary(
      config.method, data.manifest.name, result, split="test", checkpoint_step=step,
      checkpoint=which, metrics=tuple(config.eval.metrics), settings=settings,
      extra={"class_names": list(data.class_names), "modality_order": list(data.modalities),
             "folds": split.folds, "fold": split.fold if split.folds else None,
             "normalization": {m: json.loads((workdir / "normalization.json").read_text())
                               ["modalities"][m] for m in data.modalities}})
  # Method-specific test results (e.g. MMSDNet's multi-input segmentation) beside the others.
  extra = method.extra_evaluations(state, data, config=config, workdir=workdir,
                                   settings=settings, checkpoint_step=step)
  out.update(extra.summary)
  if main:
    for name, content in extra.files.items():
      pipeline.write_text_atomic(workdir / name, content)
    pipeline.write_json_atomic(workdir / "summary.json", out)
    # `predict` builds the state from the shapes of a training batch (methods may add keys).
    info = json.loads((workdir / "model_info.json").read_text())
    info["example_batch"] = evaluate_lib.batch_spec(method.host_batch(data, 0))
    pipeline.write_json_atomic(workdir / "model_info.json", info)
    pipeline.write_text_atomic(workdir / "summary_per_case.csv",
                               evaluate_lib.per_case_csv(out["modalities"]))
    table = evaluate_lib.log_table(result, data.class_names, tuple(config.eval.metrics))
    pipeline.write_text_atomic(workdir / "summary.txt", table + "\n")
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
