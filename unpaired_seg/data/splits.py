"""Splits by subject: seeded fractions or k folds, written once per workdir and checked on reuse.

A paired dataset splits its common subjects once for all modalities; no validation or test
subject of any modality may be a training subject of any modality (`check_no_leakage`).
"""

import json
import os
import pathlib
import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from unpaired_seg.data import dataset as ds
from unpaired_seg.data.jsonio import write_json_atomic


class SplitError(ValueError):
  """A splits file is inconsistent with the dataset, or a test subject leaks into training."""


def _fold_settings(split: Mapping) -> tuple[int, int]:
  folds, fold = int(split.get("folds", 0)), int(split.get("fold", 0))
  if folds == 1 or folds < 0:
    raise SplitError(f"split 'folds' must be 0 (fractions) or >= 2, got {folds}")
  if folds and not 0 <= fold < folds:
    raise SplitError(f"split 'fold' must be in 0..{folds - 1}, got {fold}")
  return folds, fold


def _split_subjects(subjects: Sequence[str], split: Mapping[str, float],
                    rng: np.random.Generator) -> dict[str, list[str]]:
  order = list(rng.permutation(sorted(subjects)))
  n = len(order)
  folds, fold = _fold_settings(split)
  if folds:
    # k-fold: the permuted subjects in k near-equal groups; test = group `fold`, validation the
    # first `val` share (of all subjects) of the others, the rest trains.
    if n < folds:
      raise SplitError(f"{n} subjects are too few for {folds} folds")
    groups = np.array_split(np.arange(n), folds)
    test = [order[i] for i in groups[fold]]
    rest = [s for s in order if s not in test]
    n_val = int(round(split["val"] * n))
    n_val = max(n_val, 1) if split["val"] > 0 else 0
    if len(rest) - n_val < 1:
      raise SplitError(f"{n} subjects are too few for {folds} folds and validation share "
                       f"{split['val']}")
    return {"test": sorted(test), "val": sorted(rest[:n_val]), "train": sorted(rest[n_val:])}
  n_test = int(round(split["test"] * n))
  n_val = int(round(split["val"] * n))
  if n >= 3:  # every non-zero share gets at least one subject
    n_test = max(n_test, 1) if split["test"] > 0 else 0
    n_val = max(n_val, 1) if split["val"] > 0 else 0
  if n - n_test - n_val < 1:
    raise SplitError(f"{n} subjects are too few for split fractions {dict(split)}")
  return {"test": sorted(order[:n_test]), "val": sorted(order[n_test:n_test + n_val]),
          "train": sorted(order[n_test + n_val:])}


def subjects_of(manifest: ds.Manifest, modality: str) -> list[str]:
  return sorted({manifest.subject_of(modality, c) for c in ds.list_cases(manifest, modality)})


def make_splits(manifest: ds.Manifest, modalities: Sequence[str], split: Mapping[str, float],
                seed: int) -> dict:
  """Seeded per-subject split. A paired dataset splits its common subjects once for all modalities.

  Args:
    manifest: the dataset.
    modalities: the modalities to split.
    split: fractions `train`, `val`, `test` (summing to 1); with `folds` >= 2, k-fold
      cross-validation instead: test = fold `fold` of `folds`, validation a `val` share of all
      subjects taken from the other folds.
    seed: the permutation's seed (per modality for unpaired data).
  """
  folds, fold = _fold_settings(split)
  result = {"seed": seed, "fractions": {k: split[k] for k in ("train", "val", "test")},
            "folds": folds, "fold": fold, "paired": manifest.paired, "modalities": {}}
  if manifest.paired:
    common = set.intersection(*(set(subjects_of(manifest, m)) for m in modalities))
    shared = _split_subjects(sorted(common), split, np.random.default_rng(seed))
    for m in modalities:
      result["modalities"][m] = {k: list(v) for k, v in shared.items()}
  else:
    for m in modalities:
      rng = np.random.default_rng([seed, zlib.crc32(m.encode())])
      result["modalities"][m] = _split_subjects(subjects_of(manifest, m), split, rng)
  check_no_leakage(result)
  return result


def check_split_sizes(splits: Mapping, *, require_val: bool) -> None:
  """A SplitError naming `data.split` when a modality has no test subject (the summary would
  score no volume) or, with `require_val`, no validation subject (the best checkpoint would be
  picked on nothing)."""
  for m, parts in splits["modalities"].items():
    counts = f"{len(parts['train'])} train, {len(parts['val'])} val, {len(parts['test'])} test"
    if not parts["test"]:
      raise SplitError(f"config key 'data.split': {m!r} gets no test subject ({counts}); raise "
                       f"data.split.test or add subjects")
    if require_val and not parts["val"]:
      raise SplitError(f"config key 'data.split': {m!r} gets no validation subject ({counts}) to "
                       f"pick the best checkpoint by; raise data.split.val or set "
                       f"eval.checkpoint='latest'")


def check_no_leakage(splits: Mapping, *, where: str = "splits") -> None:
  """Fails loudly if any subject of any val/test list is a training subject of any modality."""
  mods = splits["modalities"]
  train = {s for m in mods.values() for s in m["train"]}
  for name, m in mods.items():
    for part in ("val", "test"):
      leaked = sorted(train & set(m[part]))
      if leaked:
        raise SplitError(f"{where}: {part} subjects of {name!r} are also training subjects: {leaked}")
  for name, m in mods.items():
    overlap = sorted(set(m["val"]) & set(m["test"]))
    if overlap:
      raise SplitError(f"{where}: subjects of {name!r} are in both val and test: {overlap}")


def load_or_create_splits(path: os.PathLike, manifest: ds.Manifest, modalities: Sequence[str],
                          split: Mapping[str, float], seed: int, *,
                          require_val: bool = False, write: bool = True) -> dict:
  """Reuses `path` if it exists (checked against the dataset and the fold), else creates it.

  A new split must give every modality a test subject (and, with `require_val`, a validation
  subject): see `check_split_sizes`. `write=False` (processes other than 0) makes the same split
  without writing it.
  """
  path = pathlib.Path(path)
  folds, fold = _fold_settings(split)
  if path.exists():
    try:
      splits = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise SplitError(f"{path}: not valid JSON ({e})") from e
    saved = (int(splits.get("folds", 0)), int(splits.get("fold", 0)) if splits.get("folds") else 0)
    if saved != (folds, fold if folds else 0):
      raise SplitError(f"{path}: made for folds={saved[0]}, fold={saved[1]}; the config asks for "
                       f"folds={folds}, fold={fold}: give each fold its own workdir")
    for m in modalities:
      if m not in splits.get("modalities", {}):
        raise SplitError(f"{path}: has no split for modality {m!r}")
      known = set(subjects_of(manifest, m))
      listed = {s for part in ("train", "val", "test") for s in splits["modalities"][m][part]}
      missing = sorted(listed - known)
      if missing:
        raise SplitError(f"{path}: subjects {missing} of {m!r} are not in the dataset {manifest.root}")
    check_no_leakage(splits, where=str(path))
    return splits
  splits = make_splits(manifest, modalities, split, seed)
  check_split_sizes(splits, require_val=require_val)   # before a useless split is written
  if write:
    write_json_atomic(path, splits)
  return splits


def cases_in(cases: Sequence, splits: Mapping, part: str) -> list:
  """The cases (PreparedCase or dataset.Volume) whose subject is in split `part` of their
  modality."""
  return [c for c in cases if c.subject in set(splits["modalities"][c.modality][part])]
