"""MMSDNet/DAFNet test-time extras: multi-input segmentation and the disentanglement analysis.

Multi input: each test slice's anatomy is fused with the aligned anatomy of its partner slice(s)
from the other modality's TEST volumes, chosen as in training (`pairing.candidates`,
deterministically: the expert slice; with 'auto' also its nearest neighbours; with
'cross_subject' the next k test volumes at the same relative position), and with k candidates the
k predictions are summed with the pair-weighting network's weights. Only the training view of each
volume (data.image_size, cut around the body) is predicted; outside it is background. The
predicted volume is scored exactly as the single-input one (`evaluate.to_reference`,
`metrics.evaluate_volume`), and the block goes into summary.json as "multi_input", shaped as
summary["modalities"].

Alignment (paired data, expert/auto/random pairing): on every test slice, the partner slice's
LABEL warped with the transformer's displacements (the ones the multi-input prediction uses, from
the two anatomies) against the slice's own label, beside the unwarped partner label: Dice per
class pooled over the slices. It shows whether the transformer aligns the pairs, apart from how
well anything is segmented. With the transformer off the two are equal.

Disentanglement: on up to `mmsdnet.analysis_slices` test slices per modality, dCor(s, z), a
logistic-regression modality classifier on z, and a latent traversal figure: the files
disentanglement.json and traversal.png, which the trainer writes into the workdir.

  python -m unpaired_seg.main --config=configs/mmsdnet.py --workdir=/tmp/mmsdnet --mode=evaluate
"""

import json
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from unpaired_seg import analysis
from unpaired_seg import evaluate as evaluate_lib
from unpaired_seg import metrics as metrics_lib
from unpaired_seg.data import geometry
from unpaired_seg.data import pipeline
from unpaired_seg.methods.base import ExtraResults
from unpaired_seg.methods.mmsdnet import pairing as pairing_lib
from unpaired_seg.ops import tps


def extra_evaluations(method, state, data, *, config, settings: Mapping) -> ExtraResults:
  """summary.json's {"multi_input": {modality: block}, "alignment": ..., "disentanglement": ...}
  and, with `mmsdnet.analysis`, the files disentanglement.json and traversal.png."""
  out = {"multi_input": evaluate_multi_input(method, state, data, config, settings)}
  files = {}
  for m, block in out["multi_input"].items():
    logging.info("multi-input test mean foreground Dice %s: %.4f", m, block["mean"].get("dice"))
  if data.manifest.paired and method.settings.pairing != "cross_subject":
    out["alignment"] = evaluate_alignment(method, state, data, config)
    for m, block in out["alignment"].items():
      logging.info("alignment %s <- partner labels: Dice %.4f unwarped, %.4f warped by the "
                   "transformer", m, block["identity"]["mean"], block["transformer"]["mean"])
  if method.settings.analysis:
    out["disentanglement"], files = disentanglement(method, state, data)
  return ExtraResults(summary=metrics_lib.to_jsonable(out), files=files)


# ------------------------------------------------------------------------------------------------
# Multi-input segmentation.
# ------------------------------------------------------------------------------------------------


def _multi_predictor(method):
  cache = {}

  def predict(state, image, modality, partner):
    if modality not in cache:
      cache[modality] = jax.jit(lambda s, x, p: method.predict_multi(s, x, modality, p))
    return np.asarray(cache[modality](state, image, partner))

  return predict


def padded_batches(count: int, batch_size: int):
  """Yields (indices, padded indices) over range(count) in batches of batch_size; the last batch
  repeats its last index up to batch_size, so every batch has one shape and jit compiles once."""
  for start in range(0, count, batch_size):
    indices = list(range(start, min(start + batch_size, count)))
    yield indices, indices + [indices[-1]] * (batch_size - len(indices))


def predict_multi_volume(predict, state, case, partner_cases, partner_index, *, modality: str,
                         partner_modality: str, case_pos: int, pairing: str, k: int, window: int,
                         batch_size: int) -> np.ndarray:
  """uint8 [h, w, Z] labels of the training view of `case`, each slice fused with its partners."""
  z_count = case.num_slices
  labels = np.zeros(case.image.shape[:2] + (z_count,), np.uint8)
  for zs, take in padded_batches(z_count, batch_size):
    images, partners = [], []
    for z in take:
      row = pairing_lib.candidates(pairing, k, window, case, case_pos, z, partner_cases,
                                   partner_index, partner_modality, rng=None)
      images.append(pipeline.slice_stack(case.image, np.array([z]), 0)[0])
      partners.append(np.stack([pipeline.slice_stack(partner_cases[c].image, np.array([s]), 0)[0]
                                for c, s in row]))
    probs = predict(state, np.stack(images).astype(np.float32), modality,
                    np.stack(partners).astype(np.float32))
    labels[:, :, zs] = np.moveaxis(np.argmax(probs[:len(zs)], axis=-1), 0, -1)
  return labels


def evaluate_multi_input(method, state, data, config, settings: Mapping) -> dict:
  """Per modality the test metrics of the multi-input prediction, shaped as evaluate_cases'."""
  s = method.settings
  predict = _multi_predictor(method)
  batch_size = min(config.eval.batch_size, 16)
  result = {}
  for j in method.modalities:
    i = method.other(j)
    cases, partners = data.cases["test"][j], data.cases["test"][i]
    if not cases or not partners:
      continue
    partner_index = {c.subject: n for n, c in enumerate(partners)}
    per_case, grids = {}, set()
    for pos, case in enumerate(cases):
      view = predict_multi_volume(predict, state, case, partners, partner_index, modality=j,
                                  partner_modality=i, case_pos=pos, pairing=s.pairing, k=method.k,
                                  window=s.pair_window, batch_size=batch_size)
      full = geometry.invert_box(view, case.box, case.grid_image.shape[:2])
      pred, ref = evaluate_lib.to_reference(case, full, config.eval.grid)
      per_case[case.case] = metrics_lib.evaluate_volume(
          pred, ref.label, data.class_names, ref.spacing, metrics=tuple(config.eval.metrics),
          slice_axis=ref.slice_axis, **dict(settings))
      grids.add(ref.grid)
    agg = metrics_lib.aggregate(per_case)
    result[j] = {"grid": "+".join(sorted(grids)), "mean": agg["mean"],
                 "per_class": agg["per_class"], "std": agg["std"], "count": agg["count"],
                 "per_case": per_case, "partner_modality": i, "pairing": s.pairing,
                 "candidates": method.k}
  return result


# ------------------------------------------------------------------------------------------------
# Alignment of the partner labels.
# ------------------------------------------------------------------------------------------------


def pooled_dice(counts: np.ndarray, class_names) -> dict:
  """{"per_class": {name: Dice}, "mean": mean over the foreground classes} from [C, 3] counts
  (intersection, predicted size, reference size) pooled over slices; None for an empty class."""
  per_class = {}
  for c, name in enumerate(class_names):
    if c == 0:
      continue
    inter, a, b = counts[c]
    per_class[name] = None if a + b == 0 else float(2 * inter / (a + b))
  values = [v for v in per_class.values() if v is not None]
  return {"per_class": per_class, "mean": float(np.mean(values)) if values else None}


def dice_counts(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> np.ndarray:
  """[C, 3] (intersection, |pred == c|, |ref == c|) of two integer label arrays."""
  return np.array([[np.count_nonzero((pred == c) & (ref == c)), np.count_nonzero(pred == c),
                    np.count_nonzero(ref == c)] for c in range(num_classes)], np.int64)


def _label_warper(method, modality: str, num_classes: int):
  """jit (state, image, partner, partner_label) -> (warped partner label, mean |offset| [B, 2])."""

  @jax.jit
  def warped(state, image, partner, partner_label):
    disp = method.predict_displacements(state, image, modality, partner)
    one_hot = jax.nn.one_hot(partner_label, num_classes, dtype=jnp.float32)
    moved = tps.thin_plate_spline(one_hot, disp)
    return jnp.argmax(moved, axis=-1), jnp.mean(jnp.abs(disp), axis=1)  # per slice (row, col)

  return warped


def evaluate_alignment(method, state, data, config) -> dict:
  """Per modality j: the partner labels' Dice to j's labels, unwarped and warped by the STN."""
  s = method.settings
  num_classes = len(data.class_names)
  batch_size = min(config.eval.batch_size, 16)
  result = {}
  for j in method.modalities:
    i = method.other(j)
    cases, partners = data.cases["test"][j], data.cases["test"][i]
    if not cases or not partners or any(c.label is None for c in cases + partners):
      continue
    partner_index = {c.subject: n for n, c in enumerate(partners)}

    warped = _label_warper(method, j, num_classes)
    counts = {"identity": np.zeros((num_classes, 3), np.int64),
              "transformer": np.zeros((num_classes, 3), np.int64)}
    offsets, slices = [], 0
    for pos, case in enumerate(cases):
      rows = [pairing_lib.candidates(s.pairing, 1, s.pair_window, case, pos, z, partners,
                                     partner_index, i, rng=None)[0]
              for z in range(case.num_slices)]
      for zs, take in padded_batches(case.num_slices, batch_size):
        image = np.stack([case.image[:, :, z, None] for z in take]).astype(np.float32)
        partner = np.stack([partners[rows[z][0]].image[:, :, rows[z][1], None]
                            for z in take]).astype(np.float32)
        partner_label = np.stack([partners[rows[z][0]].label[:, :, rows[z][1]] for z in take])
        moved, offset = warped(state, image, partner, partner_label.astype(np.int32))
        moved = np.asarray(moved)[:len(zs)]
        own = np.stack([case.label[:, :, z] for z in zs])
        counts["identity"] += dice_counts(partner_label[:len(zs)], own, num_classes)
        counts["transformer"] += dice_counts(moved, own, num_classes)
        offsets.append(np.asarray(offset)[:len(zs)])  # the padding slices are not counted
        slices += len(zs)
    height, width = cases[0].image.shape[:2]
    result[j] = {name: pooled_dice(c, data.class_names) for name, c in counts.items()}
    # The control points' mean |offset|, from normalised [0, 1] units to pixels of the view.
    offset_px = np.mean(np.concatenate(offsets), axis=0) * np.array([height - 1, width - 1])
    result[j].update({"partner_modality": i, "slices": slices,
                      "mean_abs_control_point_offset_px": float(np.mean(offset_px))})
  return result


# ------------------------------------------------------------------------------------------------
# Disentanglement.
# ------------------------------------------------------------------------------------------------


def _test_slices(cases, count: int) -> np.ndarray:
  """Up to `count` test slices [n, h, w, 1], spread evenly over the volumes and their slices."""
  pairs = [(c, z) for c in cases for z in range(c.num_slices)]
  if not pairs:
    return np.zeros((0,) + cases[0].image.shape[:2] + (1,), np.float32)
  picks = np.unique(np.linspace(0, len(pairs) - 1, min(count, len(pairs))).round().astype(int))
  return np.stack([pairs[p][0].image[:, :, pairs[p][1], None] for p in picks]).astype(np.float32)


def _encoded_test_slices(method, state, data):
  """Per modality with test slices: their anatomies s [n, H, W, A], modality means z [n, Z] and
  the (s, z) of the middle slice, the traversal's."""
  params, stats = state.swa_params, state.swa_stats

  def encode(x, modality):
    s, _ = method.apply_generator(params, stats, "anatomy", x, modality)
    mean = method.apply_generator(params, stats, "encode_modality", s, x, False)[0][1]
    return s, mean

  factors, codes, middle = {}, {}, {}
  for m in method.modalities:
    x = _test_slices(data.cases["test"][m], method.settings.analysis_slices)
    if not len(x):
      continue
    s, z = jax.jit(encode, static_argnums=1)(jnp.asarray(x), m)
    factors[m], codes[m] = np.asarray(s), np.asarray(z)
    middle[m] = (factors[m][len(x) // 2:len(x) // 2 + 1], codes[m][len(x) // 2])
  return factors, codes, middle


def _traversal_png(method, state, middle: dict) -> bytes:
  """Each modality's middle slice decoded with each z dimension run over traversal_values()."""
  params, stats = state.swa_params, state.swa_stats
  decode = jax.jit(lambda s, z: method.apply_generator(params, stats, "decode", s, z)[0])
  values = analysis.traversal_values()
  rows, row_labels = [], []
  for m, (s, z) in middle.items():
    for d in range(z.shape[0]):
      zs = np.repeat(z[None], len(values), axis=0)
      zs[:, d] = values
      rows.append(np.asarray(decode(np.repeat(s, len(values), axis=0), zs))[..., 0])
      row_labels.append(f"{m} z{d}")
  return analysis.traversal_png(np.stack(rows), row_labels=row_labels, values=values)


def disentanglement(method, state, data) -> tuple[dict, dict[str, bytes | str]]:
  """dCor(s, z) and the modality classifier on z; with the files disentanglement.json (the same
  block) and traversal.png."""
  factors, codes, middle = _encoded_test_slices(method, state, data)
  s_all = np.concatenate(list(factors.values()))
  z_all = np.concatenate(list(codes.values()))
  out = {"samples": int(len(z_all)), "modalities": list(method.modalities),
         "dcor_s_z": analysis.distance_correlation(s_all.reshape(len(s_all), -1), z_all),
         "dcor_s_z_per_modality": {m: analysis.distance_correlation(
             factors[m].reshape(len(factors[m]), -1), codes[m]) for m in factors}}
  modality = np.concatenate([np.full(len(codes[m]), method.modalities.index(m)) for m in codes])
  if min(np.bincount(modality, minlength=2)) >= 4:
    out["modality_classifier"] = analysis.modality_classifier(z_all, modality)
  png = _traversal_png(method, state, middle)
  out = metrics_lib.to_jsonable(out)
  logging.info("disentanglement: dCor(s, z) %.3f, modality accuracy from z %s", out["dcor_s_z"],
               out.get("modality_classifier", {}).get("accuracy"))
  # The text of pipeline.write_json_atomic, as the workdir's other JSON files.
  return out, {"disentanglement.json": json.dumps(out, indent=2, sort_keys=True),
               "traversal.png": png}
