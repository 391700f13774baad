"""Volume inference from a 2D model and the summary of a run.

Every slice of a held-out volume is predicted (in fixed-size chunks so the predictor compiles once
per modality), the slices are re-stacked into the 3D volume, and metrics are computed per class per
volume in 3D: the unit of analysis is the volume, never the slice.

  python -m unpaired_seg.main --config=configs/joint.py --workdir=runs/joint --mode=evaluate
"""

from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from unpaired_seg import metrics as metrics_lib
from unpaired_seg.data import pipeline

DEFAULT_METRICS = ("dice",)


def make_predictor(method) -> Callable:
  """jit(state, image, modality) -> integer labels [B, H, W]; the modality is static."""

  cache = {}

  def predict(state, image, modality: str):
    if modality not in cache:
      cache[modality] = jax.jit(
          lambda s, x: jnp.argmax(method.predict(s, x, modality), axis=-1).astype(jnp.int32))
    return cache[modality](state, image)

  return predict


def predict_volume(predict: Callable, state, modality: str, image: np.ndarray, *,
                   context_slices: int, batch_size: int) -> np.ndarray:
  """Predicts every slice of an [H, W, Z] volume and re-stacks them to [H, W, Z] uint8 labels.

  The last chunk is padded to `batch_size` so every call has the same shape.
  """
  z = image.shape[-1]
  out = np.zeros(image.shape, dtype=np.uint8)
  for start in range(0, z, batch_size):
    idx = np.arange(start, min(start + batch_size, z))
    padded = np.concatenate([idx, np.full(batch_size - len(idx), idx[-1])])
    slices = pipeline.slice_stack(image, padded, context_slices)        # [B, H, W, C]
    labels = np.asarray(predict(state, slices, modality))               # [B, H, W]
    out[:, :, idx] = np.moveaxis(labels[: len(idx)], 0, -1)
  return out


def evaluate_cases(predict: Callable, state, cases_by_modality: Mapping[str, Sequence],
                   class_names: Sequence[str], *, context_slices: int, batch_size: int,
                   metrics: Sequence[str] = DEFAULT_METRICS) -> dict:
  """Per modality: per case per class metrics, and their aggregates.

  Returns:
    {modality: {"mean": {...}, "per_class": {...}, "std": {...}, "per_case": {case: {class: {...}}}}}
  """
  result = {}
  for modality, cases in cases_by_modality.items():
    per_case = {}
    for case in cases:
      pred = predict_volume(predict, state, modality, case.image, context_slices=context_slices,
                            batch_size=batch_size)
      per_case[case.case] = metrics_lib.evaluate_volume(pred, case.label, class_names,
                                                        case.spacing, metrics=tuple(metrics))
    agg = metrics_lib.aggregate(per_case)
    result[modality] = {"mean": agg["mean"], "per_class": agg["per_class"], "std": agg["std"],
                        "per_case": per_case}
  return result


def mean_foreground_dice(result: Mapping) -> float:
  """Mean over modalities of the mean foreground Dice (the validation criterion)."""
  values = [r["mean"]["dice"] for r in result.values()]
  values = [v for v in values if v is not None and np.isfinite(v)]
  return float(np.mean(values)) if values else 0.0


def summary(method: str, dataset: str, result: Mapping, *, split: str, checkpoint_step: int,
            checkpoint: str, metrics: Sequence[str] = DEFAULT_METRICS) -> dict:
  """The JSON written as `summary.json`."""
  return metrics_lib.to_jsonable({
      "method": method,
      "dataset": dataset,
      "split": split,
      "checkpoint": {"which": checkpoint, "step": int(checkpoint_step)},
      "metric_settings": metrics_lib.metric_settings(metrics=tuple(metrics)),
      "modalities": dict(result),
  })


def format_table(result: Mapping, class_names: Sequence[str], metric: str = "dice") -> str:
  """A plain-text table: one row per modality, one column per foreground class, then the mean."""
  names = list(class_names)[1:]
  header = ["modality"] + names + ["mean"]
  rows = []
  for modality, r in result.items():
    cells = [modality]
    for n in names:
      mean = r["per_class"].get(n, {}).get(metric)
      std = r["std"].get(n, {}).get(metric)
      cells.append(_fmt(mean) + (f" +- {_fmt(std)}" if std is not None and np.isfinite(std) else ""))
    cells.append(_fmt(r["mean"].get(metric)))
    rows.append(cells)
  widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
  lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [header] + rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return f"{metric} per class (mean +- std over test volumes)\n" + "\n".join(lines)


def _fmt(v) -> str:
  if v is None or not np.isfinite(v):
    return "n/a"
  return f"{v:.3f}"


def log_table(result: Mapping, class_names: Sequence[str]) -> str:
  table = format_table(result, class_names)
  for line in table.splitlines():
    logging.info("%s", line)
  return table
