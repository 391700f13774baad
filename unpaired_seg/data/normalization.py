"""Intensity normalisation: the schemes, their settings, and statistics fitted on the training split.

Schemes (the manifest's, or `data.normalization` of the config): `zscore` per volume, `minmax`
per volume to [-1, 1], `clip_zscore` (window, then z-score per volume), `none`, `dataset_zscore`
(optionally with a window): one mean and standard deviation over every voxel of the TRAINING
split's volumes of that modality, and `foreground_zscore` (nnU-Net's CT scheme). Fitted numbers
are kept in the workdir's normalization.json so that evaluation and `predict` use the same ones.
"""

import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from unpaired_seg.data import dataset as ds
from unpaired_seg.data.jsonio import write_json_atomic

NORMALIZATION_SCHEMES = ("zscore", "minmax", "clip_zscore", "none", "dataset_zscore")


class NormalizationError(ds.DatasetError):
  """A normalisation scheme, its settings or its saved statistics do not fit the data."""


# Schemes whose statistics are fitted on the training split (`fit_normalization`).
FITTED_SCHEMES = ("dataset_zscore", "foreground_zscore")
FOREGROUND_PERCENTILES = (0.5, 99.5)


def normalize_intensity(image: np.ndarray, spec: Mapping, *, name: str = "image") -> np.ndarray:
  """Normalises one volume by its modality's scheme.

  Args:
    image: raw intensities, any shape.
    spec: the normalisation block: scheme `zscore`, `minmax` (to [-1, 1]), `clip_zscore` (with
      `window: [lo, hi]`), `none`, or `dataset_zscore` (with the training split's `mean` and
      `std` from `fit_normalization`, and an optional `window` applied first), or
      `foreground_zscore` (nnU-Net's CT scheme: clipped to the 0.5th and 99.5th percentiles of
      the training split's labelled voxels, then z-scored with their mean and std).
    name: used in error messages (the case's file).

  Returns:
    float32 array of the same shape.
  """
  x = image.astype(np.float32)
  scheme = spec.get("scheme")
  if scheme == "none":
    return x
  if scheme in FITTED_SCHEMES:
    if "mean" not in spec or "std" not in spec:
      raise NormalizationError(f"{name}: scheme {scheme!r} needs the training split's "
                               "'mean' and 'std' (fit_normalization); none were given")
    if spec.get("window") is not None:
      x = np.clip(x, *spec["window"])
    return (x - float(spec["mean"])) / float(spec["std"])
  if scheme == "clip_zscore":
    lo, hi = spec["window"]
    x = np.clip(x, lo, hi)
    scheme = "zscore"
  if scheme == "zscore":
    std = float(x.std())
    return (x - float(x.mean())) / (std if std > 1e-8 else 1.0)
  if scheme == "minmax":
    lo, hi = float(x.min()), float(x.max())
    return 2.0 * (x - lo) / max(hi - lo, 1e-8) - 1.0
  raise ds.DatasetError(f"{name}: unknown normalization scheme {scheme!r}")


def parse_scheme(text: str, *, where: str) -> dict:
  """A scheme as text: zscore, minmax, none, dataset_zscore, clip_zscore:LO:HI, dataset_zscore:LO:HI."""
  parts = str(text).strip().split(":")
  scheme = parts[0]
  if scheme in ("zscore", "minmax", "none", "dataset_zscore", "foreground_zscore") \
      and len(parts) == 1:
    return {"scheme": scheme}
  if scheme in ("clip_zscore", "dataset_zscore") and len(parts) == 3:
    try:
      lo, hi = float(parts[1]), float(parts[2])
    except ValueError:
      lo, hi = math.nan, math.nan
    if math.isfinite(lo) and math.isfinite(hi) and lo < hi:
      return {"scheme": scheme, "window": [lo, hi]}
  raise NormalizationError(f"{where}: {text!r} is not one of zscore, minmax, none, dataset_zscore, "
                           "foreground_zscore, clip_zscore:LO:HI, dataset_zscore:LO:HI (numbers "
                           "LO < HI)")


def resolve_normalization(manifest: ds.Manifest, modalities: Sequence[str],
                          overrides: str = "") -> dict[str, dict]:
  """Each modality's normalisation: the manifest's, or the override for that modality.

  Args:
    manifest: the dataset's manifest.
    modalities: the modalities in use.
    overrides: 'ct=dataset_zscore,mr=zscore' (config key `data.normalization`); '' keeps the
      manifest's schemes.

  Returns:
    {modality: normalisation block} (statistics not fitted yet).
  """
  where = "config key 'data.normalization'"
  result = {m: dict(manifest.modalities[m].normalization) for m in modalities}
  for item in filter(None, (s.strip() for s in str(overrides or "").split(","))):
    modality, sep, scheme = item.partition("=")
    if not sep:
      raise NormalizationError(f"{where}: {item!r} is not MODALITY=SCHEME")
    if modality not in result:
      raise NormalizationError(f"{where}: modality {modality!r} is not one of {list(modalities)}")
    result[modality] = parse_scheme(scheme, where=f"{where} ({modality})")
  return result


def fit_normalization(spec: Mapping, volumes: Sequence[ds.Volume]) -> dict:
  """The normalisation block with its statistics, fitted on `volumes` (the training split).

  Only `dataset_zscore` has statistics: the mean and (population) standard deviation over every
  voxel of every volume, after the optional window, accumulated in float64. Other schemes are
  returned as they are.
  """
  spec = dict(spec)
  if spec.get("scheme") not in FITTED_SCHEMES:
    return spec
  if not volumes:
    raise NormalizationError(f"scheme {spec['scheme']!r}: the training split has no volume to "
                             "fit the statistics on")
  if spec["scheme"] == "foreground_zscore":
    return _fit_foreground(spec, volumes)
  window = spec.get("window")

  def values(v):
    x = v.image.astype(np.float64)
    return np.clip(x, *window) if window is not None else x

  count = sum(int(v.image.size) for v in volumes)
  mean = sum(float(values(v).sum()) for v in volumes) / count
  # Two passes: the sum of squared deviations does not cancel as E[x^2] - E[x]^2 can.
  var = sum(float(np.square(values(v) - mean).sum()) for v in volumes) / count
  std = math.sqrt(var)
  spec.update(mean=mean, std=std if std > 1e-8 else 1.0, voxels=count,
              fitted_on=sorted(v.case for v in volumes))
  return spec


def _fit_foreground(spec: dict, volumes: Sequence[ds.Volume]) -> dict:
  """nnU-Net's CT statistics over the labelled voxels of the training volumes."""
  values = [v.image[v.label > 0].astype(np.float64) for v in volumes if v.label is not None]
  values = np.concatenate(values) if values else np.zeros(0)
  if not values.size:
    raise NormalizationError("scheme 'foreground_zscore': the training split has no labelled "
                             "voxel to fit the statistics on")
  lo, hi = np.percentile(values, FOREGROUND_PERCENTILES)
  clipped = np.clip(values, lo, hi)
  std = float(clipped.std())
  spec.update(window=[float(lo), float(hi)], mean=float(clipped.mean()),
              std=std if std > 1e-8 else 1.0, voxels=int(values.size),
              fitted_on=sorted(v.case for v in volumes))
  return spec


def load_or_fit_normalization(path: os.PathLike, specs: Mapping[str, Mapping],
                              train_volumes: Mapping[str, Sequence[ds.Volume]], *,
                              write: bool = True) -> dict[str, dict]:
  """Each modality's normalisation with statistics: reused from `path`, else fitted and written.

  A saved block is reused only if it has the same scheme and window and, for `dataset_zscore`,
  was fitted on exactly the current training cases; anything else fails naming `path` (a model
  trained with other numbers would silently get other inputs). `write=False` (processes other
  than 0) fits the same numbers without writing them.
  """
  path = pathlib.Path(path)
  saved = {}
  if path.exists():
    try:
      saved = json.loads(path.read_text())["modalities"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise NormalizationError(f"{path}: not a normalisation file ({e})") from e
  result, changed = {}, not path.exists()
  for modality, spec in specs.items():
    train_cases = sorted(v.case for v in train_volumes.get(modality, ()))
    if modality in saved:
      old = saved[modality]
      # foreground_zscore's window is fitted, not configured: only its scheme is compared.
      window_differs = (spec.get("scheme") != "foreground_zscore"
                        and old.get("window") != spec.get("window"))
      if old.get("scheme") != spec.get("scheme") or window_differs:
        raise NormalizationError(
            f"{path}: modality {modality!r} was normalised with {_describe(old)}, the config and "
            f"manifest now ask for {_describe(spec)}; use a new workdir")
      if spec.get("scheme") in FITTED_SCHEMES and old.get("fitted_on") != train_cases:
        raise NormalizationError(
            f"{path}: the statistics of {modality!r} were fitted on other training cases than the "
            f"current split's {train_cases}")
      result[modality] = dict(old)
    else:
      result[modality] = fit_normalization(spec, train_volumes.get(modality, ()))
      changed = True
  if changed and write:
    write_json_atomic(path, {"modalities": {**saved, **result}})
  return result


def _describe(spec: Mapping) -> str:
  window = spec.get("window")
  return repr(spec.get("scheme")) + (f" with window {list(window)}" if window is not None else "")
