"""A baseline run: load the data as the trainer does, predict every test volume, evaluate alike.

  python -m unpaired_seg.baselines --config=configs/multi_atlas.py --workdir=runs/multi_atlas

The methods (`config.method`, see `section.METHODS`), for each test volume of a target modality:

  copy         paired data: the source modality's labels of the same subject, resampled onto the
               target's grid through world coordinates (what the scanner geometry says);
  register     paired data: the source image of the same subject registered onto the target
               image (mutual-information affine, then B-spline), its labels warped by nearest
               neighbour;
  multi_atlas  any data: k labelled training volumes of the source modality (a seeded choice,
               the same for every target) registered onto the target alike, their warped labels
               fused by per-voxel majority vote.

Scoring is the trainer's (`evaluate.evaluate_cases` on the same splits, grid and metrics), so
the workdir has what a trained method's has for `compare`: config.json, splits.json,
normalization.json, summary.json (with a `baseline` block: settings, atlases, seconds per
volume), summary.txt, summary_per_case.csv and predictions/.
"""

import os
import pathlib
import time
from collections.abc import Callable, Mapping

import ml_collections
import numpy as np
from absl import logging

from unpaired_seg import bookkeeping, config_schema
from unpaired_seg import evaluate as evaluate_lib
from unpaired_seg import workdir as workdir_lib
from unpaired_seg.baselines import registration, section
from unpaired_seg.data import dataset as ds
from unpaired_seg.data import loader
from unpaired_seg.data import pipeline

# What a user's input can get wrong: the command line prints these as one line.
USER_ERRORS = (config_schema.ConfigError, ds.DatasetError, pipeline.SplitError,
               workdir_lib.WorkdirError)


def check_paired(config: ml_collections.ConfigDict, manifest: ds.Manifest) -> None:
  """copy and register need the same subjects in both modalities: a ConfigError otherwise."""
  if config.method in section.PAIRED_METHODS and not manifest.paired:
    hint = ("--config.data.phantom.mode=paired" if config.data.dataset == "phantom"
            else "a dataset whose dataset.json says \"paired\": true")
    raise config_schema.ConfigError(
        f"config key 'method': {config.method!r} needs paired data (the same subjects in every "
        f"modality), but {manifest.root / 'dataset.json'} is unpaired; use {hint}, or "
        f"method 'multi_atlas'")


def choose_atlases(candidates, k: int, seed: int) -> list:
  """k of the labelled candidates, a seeded choice; k = 0 takes them all."""
  labelled = sorted((c for c in candidates if c.label is not None), key=lambda c: c.case)
  if k > len(labelled):
    raise config_schema.ConfigError(
        f"config key 'baseline.atlases': {k} atlases asked for, but the training split has "
        f"{len(labelled)} labelled volumes of the source modality")
  if k == 0:
    return labelled
  order = np.random.default_rng([seed, 11]).permutation(len(labelled))
  return [labelled[i] for i in sorted(order[:k])]


def _partner(case, sources: Mapping[str, object]):
  partner = sources.get(case.subject)
  if partner is None or partner.grid_label is None:
    raise ds.DatasetError(f"{case.modality}/{case.case}: subject {case.subject!r} has no labelled "
                          f"volume of the source modality to transfer labels from")
  return partner


def make_case_predictor(config: ml_collections.ConfigDict, data: loader.Data, source: str,
                        record: dict) -> Callable:
  """predict(case) -> uint8 [X, Y, Z] labels on the case's model grid, for `config.method`.

  `record` gathers what was used per target case (partner or atlases, seconds).
  """
  settings = registration.Settings.from_config(config.baseline)
  num_classes = len(data.class_names)
  every = {c.subject: c for part in data.cases.values() for c in part.get(source, [])}
  atlases = (choose_atlases(data.cases["train"][source], config.baseline.atlases, settings.seed)
             if config.method == "multi_atlas" else [])

  def transfer(fixed, moving_case, register: bool) -> np.ndarray:
    transform = None
    if register:
      moving = registration.to_image(moving_case.grid_image, moving_case.affine)
      transform = registration.register(fixed, moving, settings)
    return registration.warp_labels(moving_case.grid_label, moving_case.affine, fixed,
                                    transform, settings.threads)

  def predict(case) -> np.ndarray:
    start = time.perf_counter()
    fixed = registration.to_image(case.grid_image, case.affine)
    if config.method == "multi_atlas":
      used = atlases
      labels = registration.majority_vote([transfer(fixed, a, True) for a in used], num_classes)
    else:
      used = [_partner(case, every)]
      labels = transfer(fixed, used[0], config.method == "register")
    seconds = time.perf_counter() - start
    record[f"{case.modality}/{case.case}"] = {"from": [f"{c.modality}/{c.case}" for c in used],
                                              "seconds": round(seconds, 3)}
    logging.info("%s %s/%s from %d volume(s) in %.1f s", config.method, case.modality, case.case,
                 len(used), seconds)
    return labels

  return predict


class InOrder:
  """`evaluate_cases`' volume predictor for predictions made per case, not per image.

  `evaluate_cases` hands a predictor the image of each case of a modality in the order of its
  case list; this takes the next case of that list, checks that the image is the case's, and
  predicts the case.
  """

  def __init__(self, cases_by_modality: Mapping[str, list], predict_case: Callable):
    self._pending = {m: list(cases) for m, cases in cases_by_modality.items()}
    self._predict_case = predict_case

  def __call__(self, predict, state, modality: str, image: np.ndarray, **unused) -> np.ndarray:
    del predict, state, unused       # no model: the baselines predict from registration
    case = self._pending[modality].pop(0)
    if np.shape(image) != np.shape(case.grid_image):
      raise RuntimeError(f"{modality}/{case.case}: evaluation passed an image of shape "
                         f"{np.shape(image)}, the case has {np.shape(case.grid_image)}")
    return self._predict_case(case)


def run(config: ml_collections.ConfigDict, workdir: os.PathLike) -> dict:
  """Predicts and scores the test split with `config.method`; returns summary.json's content."""
  section.validate(config)
  path = workdir_lib.check_workdir(workdir)
  with workdir_lib.WorkdirLock(path):
    return _run(config, path)


def _run(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  start = time.perf_counter()
  check_paired(config, loader.resolve_dataset(config))
  bookkeeping.log_to_file(workdir)
  pipeline.write_json_atomic(workdir / "config.json", config.to_dict())
  pipeline.write_json_atomic(workdir / "versions.json", bookkeeping.provenance())
  logging.info("config:\n%s", config)
  data = loader.load_data(config, workdir)
  record, result = {}, {}
  settings = {"surface_tolerance_mm": config.eval.surface_tolerance_mm,
              "hd95_variant": config.eval.hd95_variant, "assd_variant": config.eval.assd_variant}
  writer = evaluate_lib.PredictionWriter(workdir / evaluate_lib.PREDICTIONS_DIR,
                                         config.eval.save_predictions)
  for target, source in section.targets(config).items():
    cases = {target: data.cases["test"][target]}
    predict_case = make_case_predictor(config, data, source, record)
    result.update(evaluate_lib.evaluate_cases(
        None, None, cases, data.class_names, context_slices=0, batch_size=1,
        metrics=tuple(config.eval.metrics), settings=settings, grid=config.eval.grid,
        on_prediction=writer if config.eval.save_predictions else None,
        volume_predictor=InOrder(cases, predict_case)))
  split = config.data.split
  normalization = evaluate_lib.read_json(workdir / "normalization.json", "normalisation")
  out = evaluate_lib.summary(
      config.method, data.manifest.name, result, split="test", checkpoint_step=0,
      checkpoint="none", metrics=tuple(config.eval.metrics), settings=settings,
      extra={"class_names": list(data.class_names), "modality_order": list(result),
             "folds": split.folds, "fold": split.fold if split.folds else None,
             "normalization": {m: normalization["modalities"][m] for m in data.modalities},
             "baseline": {"settings": config.baseline.to_dict(),
                          "sources": section.targets(config), "cases": record,
                          "seconds": round(time.perf_counter() - start, 1)}})
  pipeline.write_json_atomic(workdir / "summary.json", out)
  pipeline.write_text_atomic(workdir / "summary_per_case.csv",
                             evaluate_lib.per_case_csv(out["modalities"]))
  table = evaluate_lib.log_table(result, data.class_names, tuple(config.eval.metrics))
  pipeline.write_text_atomic(workdir / "summary.txt", table + "\n")
  return out
