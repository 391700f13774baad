"""The trainer's data layer: the configured dataset, its splits, normalisation, cases and samplers.

  data = loader.load_data(config, workdir)
  batch = loader.sampler_batch(data, step)     # {modality: {'image', 'label', 'labelled'}}

Cases are read lazily (`arrays`, `lazy_cases`): each volume is decoded once into memory-mapped
arrays, normalised and cut once per configuration, one case at a time, and read from disk as
batches index it, so host memory does not grow with the number of cases. `lazy=False` keeps
every volume in memory as before; both give the same batches, bit for bit.
"""

import dataclasses
import json
import os
import pathlib

import ml_collections
import numpy as np
from absl import logging

from unpaired_seg import config_schema
from unpaired_seg.data import arrays
from unpaired_seg.data import dataset as ds
from unpaired_seg.data import lazy_cases
from unpaired_seg.data import phantom
from unpaired_seg.data import pipeline


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
  # part -> modality -> cases (PreparedCase, or LazyCase with the same attributes)
  cases: dict[str, dict[str, list[pipeline.PreparedCase | lazy_cases.LazyCase]]]
  samplers: dict[str, pipeline.SliceSampler]

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.manifest.labels


def load_data(config: ml_collections.ConfigDict, workdir: pathlib.Path, *,
              write: bool = True, lazy: bool = True) -> Data:
  """Splits, normalisation (training-split statistics), prepared cases and samplers.

  Writes splits.json, normalization.json and model_info.json (what `predict` needs) into the
  workdir; the first two are reused, and checked, when they exist. With `write=False` (every
  process but 0 of a multi-host job) the same data is built and nothing is written to the
  workdir. `lazy` (the default) reads the cases from memory-mapped arrays (`lazy_cases`, built
  in the user cache where the dataset has none); `lazy=False` holds every volume in memory.
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
                                          require_val=config.eval.checkpoint == "best",
                                          write=write)
  if lazy:
    store = arrays.VolumeStore(manifest, default_cache_dir())
    volumes = {m: store.modality(m) for m in modalities}
  else:
    volumes = {m: ds.load_modality(manifest, m) for m in modalities}
  normalization = pipeline.load_or_fit_normalization(
      workdir / "normalization.json",
      pipeline.resolve_normalization(manifest, modalities, config.data.normalization),
      {m: pipeline.cases_in(volumes[m], splits, "train") for m in modalities}, write=write)
  cases = {"train": {}, "val": {}, "test": {}}
  for m in modalities:
    args = (volumes.pop(m), normalization[m], tuple(config.data.image_size))
    prepared = (lazy_cases.prepare_cases(store, *args, crop=config.data.crop, manifest=manifest)
                if lazy else
                pipeline.prepare_cases(*args, crop=config.data.crop, manifest=manifest))
    for part in cases:
      cases[part][m] = pipeline.cases_in(prepared, splits, part)
    logging.info("%s: %d train, %d val, %d test volumes (%s)", m, len(cases["train"][m]),
                 len(cases["val"][m]), len(cases["test"][m]), normalization[m]["scheme"])
  cases["train"] = drop_labels(config, cases["train"], workdir, write=write)
  for m in modalities:
    warn_if_views_clip(config, m, pipeline.view_coverage(cases["train"][m], manifest.labels))
  everything = [c for part in cases.values() for m_cases in part.values() for c in m_cases]
  info = pipeline.model_info(
      method=config.method, class_names=manifest.labels, modalities=modalities,
      image_size=config.data.image_size, context_slices=config.data.context_slices,
      crop=config.data.crop, target_spacing=pipeline.target_spacing_of(everything),
      normalization=normalization, dataset=manifest.name,
      source_axis_flips={m: manifest.modalities[m].source_axis_flips for m in modalities})
  if write:
    pipeline.write_json_atomic(workdir / "model_info.json", info)
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


def drop_labels(config: ml_collections.ConfigDict, train_cases: dict, workdir: pathlib.Path, *,
                write: bool = True) -> dict:
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
    if write:
      pipeline.write_json_atomic(path, {target: sorted(keep)})
  logging.info("%s: %d of %d training subjects keep their labels", target, len(keep), len(subjects))
  out = dict(train_cases)
  out[target] = [c if c.subject in keep else c.without_label() for c in train_cases[target]]
  return out


def sampler_batch(data: Data, step: int, rows: slice | None = None) -> dict:
  """The batch of `step` on the host, one stream per modality: a pure function of the step.

  `rows` selects this process's part of the global batch (None: all of it). What
  `methods.base.Method.host_batch` returns unless a method needs other batches.
  """
  out = {}
  for m, sampler in data.samplers.items():
    b = sampler.batch(step, rows)
    out[m] = {"image": b["image"], "label": b["label"], "labelled": b["labelled"]}
  return out
