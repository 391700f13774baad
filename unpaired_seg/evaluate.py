"""Volume inference from a 2D model, scoring in the original geometry, and the run's summary.

Inference (`predict_volume`): every slice of a volume on the model grid is predicted in tiles of
the training view's size (overlapping, Gaussian-weighted class probabilities summed on the host),
so a volume of any size is covered with one tile shape and one batch size: the predictor compiles
once per modality. A volume smaller than a tile is padded around the body, exactly as the training
view was cut. The slices are re-stacked into the 3D volume.

Scoring (`evaluate_cases`): the predicted volume goes back to a reference grid and is scored there
per class per volume in 3D (the unit of analysis is the volume, never the slice):
  grid='source'   for a dataset written by `prepare` (it has geometry records): the SOURCE file's
                  grid (`geometry.to_source_grid`), against the source labels mapped to the shared
                  labels, with the source spacing: numbers in the original geometry;
  grid='dataset'  the grid of the dataset's stored files (always the choice without records).

  python -m unpaired_seg.main --config=configs/joint.py --workdir=runs/joint --mode=evaluate
"""

import csv
import dataclasses
import io
import json
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from unpaired_seg import metrics as metrics_lib
from unpaired_seg.data import dataset as ds
from unpaired_seg.data import geometry
from unpaired_seg.data import pipeline

# Validation during training: Dice only (the distance metrics cost seconds per volume).
DEFAULT_METRICS = ("dice",)
GRIDS = ("source", "dataset")
PREDICTIONS_DIR = "predictions"


# =============================================================================================
# Inference.
# =============================================================================================

def make_predictor(method) -> Callable:
  """jit(state, image, modality) -> class probabilities [B, H, W, K] float32; modality static."""

  cache = {}

  def predict(state, image, modality: str):
    if modality not in cache:
      cache[modality] = jax.jit(lambda s, x: jax.nn.softmax(
          method.predict(s, x, modality).astype(jnp.float32), axis=-1))
    return cache[modality](state, image)

  return predict


def local_replica(state):
  """The state on one local device where it is replicated over the mesh.

  Tiles are predicted one batch at a time on the host's first device: a replicated state would
  make every device compute the same batch (on a CPU with virtual devices, twice the work).
  Arrays sharded across devices are left as they are.
  """
  def one(x):
    if (isinstance(x, jax.Array) and len(x.sharding.device_set) > 1
        and x.sharding.is_fully_replicated):
      return x.addressable_data(0)
    return x
  return jax.tree.map(one, state)


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
  """Start indices of tiles of `tile` covering [0, length), neighbours overlapping by `overlap`."""
  if length <= tile:
    return [0]
  step = max(1, int(tile * (1.0 - overlap)))
  count = math.ceil((length - tile) / step) + 1
  return sorted({int(round(s)) for s in np.linspace(0, length - tile, count)})


def gaussian_weights(size: Sequence[int], sigma_scale: float = 0.125) -> np.ndarray:
  """[h, w] weights, 1 at the centre, sigma = `sigma_scale` * size (nnU-Net's choice).

  Tile borders, where the network sees the least context, count least where tiles overlap.
  """
  axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2.0) / (sigma_scale * n)) ** 2) for n in size]
  return np.outer(axes[0], axes[1]).astype(np.float32)


def predict_volume(predict: Callable, state, modality: str, image: np.ndarray, *,
                   tile_size: Sequence[int], context_slices: int, batch_size: int,
                   overlap: float = 0.5) -> np.ndarray:
  """Predicts every slice of a normalised [X, Y, Z] volume on the model grid.

  Args:
    predict: from `make_predictor`.
    state: the method's state.
    modality: the volume's modality.
    image: float32 [X, Y, Z], normalised.
    tile_size: (h, w) of the network input (the training view).
    context_slices: neighbours on each side stacked as channels.
    batch_size: tiles per call; the last call is padded, so every call has the same shape.
    overlap: share of a tile that neighbouring tiles overlap.

  Returns:
    uint8 [X, Y, Z] labels.
  """
  image = np.asarray(image, np.float32)
  th, tw = (int(s) for s in tile_size)
  canvas_size = (max(image.shape[0], th), max(image.shape[1], tw))
  # Only where the volume is smaller than a tile does the box reach outside it (padding around
  # the body, as the training view); elsewhere it covers the whole axis.
  box = geometry.body_crop_box(image, canvas_size)
  canvas = geometry.apply_box(image, box, canvas_size, pad_value=float(image.min()))  # [X', Y', Z]
  starts = [(i, j) for i in tile_starts(canvas_size[0], th, overlap)
            for j in tile_starts(canvas_size[1], tw, overlap)]
  weights = (gaussian_weights((th, tw)) if len(starts) > 1 else np.ones((th, tw), np.float32))
  z = image.shape[-1]
  labels = np.zeros(canvas_size + (z,), np.uint8)
  # Slices per chunk: their tiles fill whole batches (lcm of tiles per slice and batch size), so
  # no call is padded but the last; the chunk's probabilities stay small on the host.
  chunk = batch_size // math.gcd(batch_size, len(starts))
  for z0 in range(0, z, chunk):
    zs = np.arange(z0, min(z0 + chunk, z))
    stack = pipeline.slice_stack(canvas, zs, context_slices)              # [n, X', Y', C]
    items = [(k, i, j) for k in range(len(zs)) for i, j in starts]
    total = None                                                            # [n, X', Y', K]
    for b0 in range(0, len(items), batch_size):
      part = items[b0:b0 + batch_size]
      tiles = [stack[k, i:i + th, j:j + tw] for k, i, j in part]
      tiles += [tiles[-1]] * (batch_size - len(tiles))
      probs = np.asarray(predict(state, np.stack(tiles), modality))        # [B, h, w, K]
      if total is None:
        total = np.zeros((len(zs),) + canvas_size + (probs.shape[-1],), np.float32)
      for p, (k, i, j) in zip(probs, part):
        total[k, i:i + th, j:j + tw] += p * weights[..., None]
    # Every pixel's weights sum to a positive number: the argmax needs no normalisation.
    labels[:, :, zs] = np.moveaxis(np.argmax(total, axis=-1), 0, -1)
  return geometry.invert_box(labels, box, image.shape[:2])


# =============================================================================================
# Scoring in the original geometry.
# =============================================================================================

@dataclasses.dataclass
class Reference:
  """A case's reference labels on the grid it is scored on.

  Attributes:
    label: uint8 shared labels on the reference grid.
    affine: [4, 4] of that grid (on the source grid, the source file's own affine).
    spacing: its voxel size in mm.
    slice_axis: its array axis that runs along the canonical superior-inferior (slice) axis.
    image: the image file on that grid, when known.
    grid: 'source' or 'dataset'.
  """
  label: np.ndarray
  affine: np.ndarray
  spacing: tuple[float, float, float]
  slice_axis: int
  image: pathlib.Path | None
  grid: str


def _slice_axis(record: geometry.GeometryRecord) -> int:
  """The source axis that reorientation turns into the last (slice) axis."""
  return next(axis for axis, (target, _) in enumerate(record.orientation) if target == 2)


def to_reference(case: pipeline.PreparedCase, prediction: np.ndarray,
                 grid: str = "source") -> tuple[np.ndarray, Reference]:
  """Maps a prediction on the model grid onto the case's reference grid.

  Args:
    case: the prepared case.
    prediction: uint8 [X, Y, Z] labels on the model grid.
    grid: 'source' (the source file's grid when the case has a geometry record, else the
      dataset's) or 'dataset'.

  Returns:
    (prediction on the reference grid, the Reference).
  """
  if grid not in GRIDS:
    raise ValueError(f"config key 'eval.grid': {grid!r} is not one of {GRIDS}")
  # Undoing the reorientation is exact (a permutation and flips): the dataset's stored grid.
  stored = geometry.to_source_grid(prediction, case.record)
  if grid == "source" and case.source is not None:
    record = case.source.record
    affine = case.source.file_affine     # saved predictions overlay the source image file
    return geometry.to_source_grid(stored, record), Reference(
        case.source_label, affine, geometry.spacing_of(affine), _slice_axis(record),
        case.source.image, "source")
  affine = np.asarray(case.record.source_affine)
  label = geometry.to_source_grid(case.grid_label, case.record)
  return stored, Reference(label, affine, geometry.spacing_of(affine),
                           _slice_axis(case.record), case.image_path, "dataset")


def evaluate_cases(predict: Callable, state, cases_by_modality: Mapping[str, Sequence],
                   class_names: Sequence[str], *, context_slices: int, batch_size: int,
                   metrics: Sequence[str] = DEFAULT_METRICS, settings: Mapping | None = None,
                   grid: str = "source", overlap: float = 0.5,
                   on_prediction: Callable | None = None,
                   volume_predictor: Callable | None = None) -> dict:
  """Per modality: per case per class metrics on the reference grid, and their aggregates.

  Args:
    predict: from `make_predictor`.
    state: the method's state.
    cases_by_modality: {modality: [PreparedCase]}.
    class_names: shared label names, background first.
    context_slices, batch_size, overlap: as `predict_volume`; tiles have the size of each case's
      training view.
    metrics: names from `metrics.METRIC_NAMES`.
    settings: `surface_tolerance_mm`, `hd95_variant`, `assd_variant` for `evaluate_volume`.
    grid: see `to_reference`.
    on_prediction: called as on_prediction(case, prediction on the reference grid, Reference).
    volume_predictor: replaces `predict_volume` (same arguments), e.g. a 3D method's sliding
      window over the volume.

  Returns:
    {modality: {"grid", "mean", "per_class", "std", "count", "per_case": {case: {class: {...}}}}}
  """
  settings = dict(settings or {})
  state = local_replica(state)
  result = {}
  for modality, cases in cases_by_modality.items():
    per_case, grids = {}, set()
    for case in cases:
      predict_fn = volume_predictor or predict_volume
      pred = predict_fn(predict, state, modality, case.grid_image,
                        tile_size=case.image.shape[:2], context_slices=context_slices,
                        batch_size=batch_size, overlap=overlap)
      pred, ref = to_reference(case, pred, grid)
      per_case[case.case] = metrics_lib.evaluate_volume(
          pred, ref.label, class_names, ref.spacing, metrics=tuple(metrics),
          slice_axis=ref.slice_axis, **settings)
      grids.add(ref.grid)
      if on_prediction is not None:
        on_prediction(case, pred, ref)
    if not per_case:
      continue
    agg = metrics_lib.aggregate(per_case)
    result[modality] = {"grid": "+".join(sorted(grids)), "mean": agg["mean"],
                        "per_class": agg["per_class"], "std": agg["std"], "count": agg["count"],
                        "per_case": per_case}
  return result


def mean_foreground_dice(result: Mapping) -> float:
  """Mean over modalities of the mean foreground Dice (the validation criterion)."""
  values = [r["mean"]["dice"] for r in result.values()]
  values = [v for v in values if v is not None and np.isfinite(v)]
  return float(np.mean(values)) if values else 0.0


# =============================================================================================
# What a run writes.
# =============================================================================================

def summary(method: str, dataset: str, result: Mapping, *, split: str, checkpoint_step: int,
            checkpoint: str, metrics: Sequence[str] = DEFAULT_METRICS,
            settings: Mapping | None = None, extra: Mapping | None = None) -> dict:
  """The JSON written as `summary.json`: settings, empty-mask policy, per-modality blocks."""
  metric_settings = metrics_lib.metric_settings(metrics=tuple(metrics), **dict(settings or {}))
  metric_settings["per_slice_dice"]["slice_axis"] = (
      "the array axis of the reference grid that reorientation to RAS makes the last "
      "(superior-inferior) axis: the acquisition's slice axis")
  return metrics_lib.to_jsonable({
      "method": method,
      "dataset": dataset,
      "split": split,
      "checkpoint": {"which": checkpoint, "step": int(checkpoint_step)},
      "metric_settings": metric_settings,
      **dict(extra or {}),
      "modalities": dict(result),
  })


def per_case_csv(result: Mapping) -> str:
  """One row per (modality, case, class), one column per metric: summary_per_case.csv."""
  metric_names = []
  for block in result.values():
    for classes in block["per_case"].values():
      for values in classes.values():
        metric_names += [m for m in values if m not in metric_names]
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(["modality", "case", "class"] + metric_names)
  for modality, block in result.items():
    for case, classes in block["per_case"].items():
      for name, values in classes.items():
        writer.writerow([modality, case, name] + [_csv_value(values.get(m)) for m in metric_names])
  return out.getvalue()


def _csv_value(v) -> str:
  return "" if v is None or not np.isfinite(v) else repr(float(v))


class PredictionWriter:
  """Saves the first `per_modality` predictions of each modality for overlays (`compare`).

  Writes <folder>/<modality>/<case>_pred.nii.gz and <case>_ref.nii.gz (uint8 shared labels on the
  reference grid, with its affine) and <folder>/index.json: {modality: {case: {"prediction",
  "reference", "image", "grid"}}}, paths relative to <folder> except the image's.
  """

  def __init__(self, folder: pathlib.Path, per_modality: int):
    self.folder = pathlib.Path(folder)
    self.per_modality = per_modality
    self.index: dict[str, dict] = {}

  def __call__(self, case, prediction: np.ndarray, ref: Reference) -> None:
    saved = self.index.setdefault(case.modality, {})
    if len(saved) >= self.per_modality:
      return
    pred_name = f"{case.modality}/{case.case}_pred.nii.gz"
    ref_name = f"{case.modality}/{case.case}_ref.nii.gz"
    ds.save_nifti(self.folder / pred_name, prediction.astype(np.uint8), ref.affine)
    ds.save_nifti(self.folder / ref_name, ref.label.astype(np.uint8), ref.affine)
    saved[case.case] = {"prediction": pred_name, "reference": ref_name,
                        "image": None if ref.image is None else str(ref.image), "grid": ref.grid}
    pipeline.write_json_atomic(self.folder / "index.json", self.index)


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
      spread = f" +- {_fmt(std)}" if std is not None and np.isfinite(std) else ""
      cells.append(_fmt(mean) + spread)
    cells.append(_fmt(r["mean"].get(metric)))
    rows.append(cells)
  widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
  lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in [header] + rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  unit = "" if metric in ("dice", "per_slice_dice", "surface_dice") else " (mm)"
  grids = sorted({str(r.get("grid")) for r in result.values() if r.get("grid")})
  where = f", {'/'.join(grids)} grid" if grids else ""
  label = TABLE_LABELS.get(metric, metric)
  return (f"{label}{unit} per class (mean +- std over test volumes{where})\n"
          + "\n".join(lines))


# Every score is 3D per volume but the authors' per-slice Dice, which is labelled as what it is.
TABLE_LABELS = {"dice": "3D Dice", "hd95": "3D HD95", "assd": "3D ASSD",
                "hausdorff": "3D Hausdorff", "surface_dice": "3D surface Dice",
                "per_slice_dice": "per-slice Dice (2D, averaged over slices; not a 3D score)"}


def _fmt(v) -> str:
  if v is None or not np.isfinite(v):
    return "n/a"
  return f"{v:.3f}"


def log_table(result: Mapping, class_names: Sequence[str],
              metrics: Sequence[str] = DEFAULT_METRICS) -> str:
  """Logs one table per metric; the 3D Dice table comes last, as the run's last word."""
  ordered = [m for m in metrics if m != "dice"] + [m for m in metrics if m == "dice"]
  tables = "\n\n".join(format_table(result, class_names, m) for m in ordered)
  for line in tables.splitlines():
    logging.info("%s", line)
  return tables


def batch_spec(batch: Mapping) -> dict:
  """{modality: {key: [shape, dtype]}} of a host batch, for model_info.json."""
  return {k: batch_spec(v) if isinstance(v, Mapping)
          else [list(np.shape(v)), str(np.asarray(v).dtype)] for k, v in batch.items()}


def read_json(path: pathlib.Path, what: str) -> dict:
  """A JSON file of a run; a missing or broken file is named in the error."""
  try:
    return json.loads(pathlib.Path(path).read_text())
  except FileNotFoundError:
    raise FileNotFoundError(f"{path}: {what} not found") from None
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: cannot read the {what}: {e}") from e
