"""Real data into the project's dataset layout: check, reorient, resample in-plane, write.

Every case is reoriented to canonical RAS (slices along the last axis) and resampled in-plane to
`--spacing` (the slice axis is kept; images linearly, labels by nearest neighbour, see
`geometry`). Label files keep their RAW values; the manifest's label_map maps them onto the
shared labels at load time. Beside each case, `<out>/geometry/<modality>/<case>.json` holds its
`GeometryRecord`, source files and `source_axis_flips`, so that predictions go back onto the
source grid (`geometry.to_source_grid`, then write with the source file's header; the record's
`source_affine` is that file's affine after any direction correction). `<out>/arrays/` holds every
case as .npy arrays, which the trainer memory-maps instead of decoding the NIfTI files (`arrays`).

The abdominal CT/MR set (CHAOS T2-SPIR MR + BTCV CT, see the data folder's README). The BTCV CT
affines reverse the front-to-back direction: in every case they put the stomach, pancreas and
gallbladder behind the kidneys (and in most the kidneys in front of the body's centre), while
left-right and head-feet agree with the anatomy. Their voxel axis 1 is therefore read with its direction
reversed (`geometry.reverse_axis_directions`; the voxels are not touched, so the way back still
lands on the source file's grid); the manifest's `source_axis_flips` of `ct` and each case's
geometry JSON say so, and `predict` applies the same correction to new CT files of a run.

  python -m unpaired_seg.data.prepare --source=abdomen_ctmr \
      --input=/work/shared/data/abdomen_ctmr --output=/tmp/abdomen_ctmr_1.5 --spacing=1.5,1.5

An nnU-Net-style folder per modality (`imagesTr/<case>_0000.nii.gz` or `imagesTr/<case>.nii.gz`,
`labelsTr/<case>.nii.gz`); `--modality` repeats, and the i-th `--label_map` (and the i-th
`--normalization`, or a single one for all) belongs to the i-th `--modality`:

  python -m unpaired_seg.data.prepare --source=folder --input=/data/raw --output=/data/liver \
      --labels=background,liver,spleen \
      --modality=ct --label_map=0:0,6:1,1:2,*:0 --normalization=clip_zscore:-200:300 \
      --modality=mr=/data/chaos_t2 --label_map=0:0,1:1,4:2 --normalization=zscore

  --modality=NAME reads <input>/NAME; --modality=NAME=DIR reads DIR (relative to --input).
  --label_map=RAW:SHARED,...: every raw label value of that modality and its shared value (an
    index into --labels); a final `*:0` sends every other raw value to background (manifest
    "unmapped": "background"); without it an unlisted value is an error.
  --normalization=zscore | minmax | none | clip_zscore:LO:HI (default zscore).
  --paired: the modalities show the same subjects, matched by case id. Without it, a case id that
    occurs in more than one modality gets the subject id `<modality>_<case>` in the manifest, so
    that the split code never mistakes two people for one.

Checking only (reads everything, writes nothing, exit status 1 when a problem is found):

  python -m unpaired_seg.data.prepare --source=abdomen_ctmr --input=... --check
  python -m unpaired_seg.data.prepare --source=dataset --input=/tmp/abdomen_ctmr_1.5 --check

The check covers shapes and affines (image vs label), spacings (finite, slices along the last
canonical axis), label values against the label map, NaN/inf in images, missing or orphan files;
every problem names its file, and all problems are reported together. Preparing runs the same
check: on any problem nothing is left on disk (the dataset is built in a hidden folder beside
`--output` and renamed at the end). `--output` must not be, or lie inside, an input folder, and
must be absent or an empty folder. `--limit=N` takes the first N cases of each modality.
"""

import json
import os
import pathlib
import re
import shutil
import time
import uuid
from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging

from unpaired_seg.data import arrays as arrays_lib
from unpaired_seg.data import dataset as ds
from unpaired_seg.data import geometry
# The importer's parts, re-exported: `prepare` is the module callers know.
from unpaired_seg.data.prepare_check import _check_case, _modality_spec, check_dataset  # noqa: F401
from unpaired_seg.data.prepare_records import (  # noqa: F401
    GEOMETRY_DIR, PrepareError, _stored_image, _stored_label, geometry_path, load_geometry)
from unpaired_seg.data.prepare_sources import (  # noqa: F401
    ABDOMEN_CT_LABEL_MAP, ABDOMEN_LABELS, ABDOMEN_MR_LABEL_MAP, OUTPUT_ENDING, FolderModality,
    SourceCase, _abdomen_plan, _check_spacing, _folder_plan, _Plan, parse_label_map,
    parse_normalization, parse_spacing)


# ---------------------------------------------------------------------------------------------
# Writing.
# ---------------------------------------------------------------------------------------------

def _write_case(tmp_root: pathlib.Path, source: SourceCase, image, label, affine,
                spacing) -> None:
  # The record's source_affine is the corrected one: it and the model grid agree in world space.
  affine = geometry.reverse_axis_directions(affine, image.shape, source.axis_flips)
  model_image, model_label, model_affine, record = geometry.to_model_grid(image, label, affine,
                                                                          spacing)
  folder = tmp_root / source.modality
  ds.save_nifti(folder / ds.IMAGES_DIR / f"{source.case}{OUTPUT_ENDING}",
                _stored_image(model_image, image.dtype), model_affine)
  ds.save_nifti(folder / ds.LABELS_DIR / f"{source.case}{OUTPUT_ENDING}",
                _stored_label(model_label), model_affine)
  info = {
      "modality": source.modality,
      "case": source.case,
      "source_image": str(source.image.resolve()),
      "source_label": str(source.label.resolve()),
      "target_spacing": None if spacing is None else list(spacing),
      "source_axis_flips": list(source.axis_flips),
      "geometry": record.to_dict(),
  }
  path = geometry_path(tmp_root, source.modality, source.case)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(info, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _check_output(output, inputs: Sequence[pathlib.Path]) -> pathlib.Path:
  """Refuses an output that is an input, lies inside one, or already holds something."""
  if output is None or not str(output).strip():
    raise PrepareError("argument 'output' (--output): a new dataset folder is required")
  out = pathlib.Path(output).expanduser().resolve()
  for source in inputs:
    src = pathlib.Path(source).expanduser().resolve()
    if out == src or out.is_relative_to(src):
      raise PrepareError(f"{out}: --output must not be or lie inside the input folder {src}; "
                         "nothing is ever written into the source data")
    if src.is_relative_to(out):
      raise PrepareError(f"{out}: --output must not contain the input folder {src}")
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise PrepareError(f"{out}: --output exists and is not an empty folder; refusing to "
                       "overwrite it")
  return out


def _run(plan: _Plan, output: pathlib.Path | None, spacing) -> list[str]:
  """Checks every case and, when `output` is given and nothing is wrong, writes the dataset.

  The dataset is built in a hidden folder beside `output` and renamed at the end, so `output`
  appears complete or not at all. Returns the problems found (nothing written when any).
  """
  problems = list(plan.problems)
  if not plan.cases and not problems:
    problems.append(f"{', '.join(str(p) for p in plan.inputs)}: no cases found")
  try:
    # Validate the manifest before reading any volume: a bad label map fails in a second.
    ds._parse_manifest(pathlib.Path("."), "manifest to be written", plan.manifest)  # noqa: SLF001
  except ds.DatasetError as e:
    return problems + [str(e)]
  specs = {m: _modality_spec(plan.manifest, m) for m in plan.manifest["modalities"]}

  tmp, created = None, []
  if output is not None:
    created = [p for p in reversed(output.parents) if not p.exists()]
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.parent / f".{output.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
  try:
    start = time.monotonic()
    for i, source in enumerate(plan.cases):
      arrays = _check_case(source.image, source.label, specs[source.modality], problems)
      # After the first problem only checking goes on: all problems are reported at once.
      if tmp is not None and arrays is not None and not problems:
        _write_case(tmp, source, *arrays, spacing)
      logging.info("%s %d/%d %s/%s (%.1f s)", "prepared" if tmp is not None and not problems
                   else "checked", i + 1, len(plan.cases), source.modality, source.case,
                   time.monotonic() - start)
    if tmp is not None and not problems:
      for modality in plan.manifest["modalities"]:
        (tmp / modality / ds.IMAGES_DIR).mkdir(parents=True, exist_ok=True)
        (tmp / modality / ds.LABELS_DIR).mkdir(parents=True, exist_ok=True)
      ds.write_manifest(tmp, plan.manifest)
      arrays_lib.write_dataset_arrays(tmp)   # readers memory-map these instead of decoding NIfTI
      if output.exists():
        output.rmdir()  # checked empty by _check_output
      os.rename(tmp, output)
      tmp = None
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
      for parent in reversed(created):
        try:
          parent.rmdir()
        except OSError:
          pass
  return problems


def _prepare(plan: _Plan, output_dir, spacing) -> ds.Manifest:
  output = _check_output(output_dir, plan.inputs)
  problems = _run(plan, output, spacing)
  if problems:
    where = ", ".join(str(p) for p in plan.inputs)
    raise PrepareError(f"{len(problems)} problem(s) in {where}; nothing was written to "
                       f"{output}:\n  " + "\n  ".join(problems))
  return ds.load_manifest(output)


# ---------------------------------------------------------------------------------------------
# Public entry points.
# ---------------------------------------------------------------------------------------------


def _check_limit(limit) -> int | None:
  if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
    raise PrepareError(f"argument 'limit' (--limit) must be a positive integer or None, got "
                       f"{limit!r}")
  return limit


def prepare_abdomen_ctmr(input_dir, output_dir, spacing=(1.5, 1.5), *,
                         limit: int | None = None) -> ds.Manifest:
  """Imports the abdominal CHAOS-MR / BTCV-CT set into a new dataset folder.

  Args:
    input_dir: folder with mr/ and ct/, each holding image_<id>.nii.gz and label_<id>.nii.gz.
    output_dir: the new dataset folder (absent or empty, not inside `input_dir`).
    spacing: target in-plane spacing (mm) or None to keep each volume's own.
    limit: import only the first `limit` subjects of each modality (by id).

  Returns:
    The written dataset's manifest.

  Raises:
    PrepareError: listing every problem with its file; nothing is written then.
  """
  spacing = _check_spacing(spacing)
  return _prepare(_abdomen_plan(input_dir, _check_limit(limit), spacing), output_dir, spacing)


def check_abdomen_ctmr(input_dir, *, limit: int | None = None) -> list[str]:
  """Every problem of the abdominal source folder, each naming its file; [] when it is sound."""
  return _run(_abdomen_plan(input_dir, _check_limit(limit), None), None, None)


def import_folder(modalities: Sequence[FolderModality], output_dir, labels: Sequence[str],
                  spacing=(1.5, 1.5), *, name: str | None = None, paired: bool = False,
                  limit: int | None = None, input_dir=None) -> ds.Manifest:
  """Imports nnU-Net-style folders, one per modality, into a new dataset folder.

  Args:
    modalities: the modalities, each with its folder, label map and normalisation.
    output_dir: the new dataset folder (absent or empty, not inside any input folder).
    labels: shared label names, index 0 background.
    spacing: target in-plane spacing (mm) or None to keep each volume's own.
    name: the dataset name in the manifest (default: the output folder's name).
    paired: whether the modalities show the same subjects (matched by case id).
    limit: import only the first `limit` cases (sorted by id) of each modality.
    input_dir: the source root (--input) when there is one; `output_dir` may not lie in it
      either.

  Returns:
    The written dataset's manifest.

  Raises:
    PrepareError: listing every problem with its file; nothing is written then.
  """
  spacing = _check_spacing(spacing)
  name = name or pathlib.Path(output_dir).name or "imported"
  plan = _folder_plan(modalities, labels, name=name, paired=paired, limit=_check_limit(limit),
                      spacing=spacing)
  if input_dir is not None:
    plan.inputs.append(pathlib.Path(input_dir))
  return _prepare(plan, output_dir, spacing)


def check_folder(modalities: Sequence[FolderModality], labels: Sequence[str], *,
                 paired: bool = False, limit: int | None = None) -> list[str]:
  """Every problem of the generic importer's sources, each naming its file; [] when sound."""
  plan = _folder_plan(modalities, labels, name="check", paired=paired, limit=_check_limit(limit),
                      spacing=None)
  return _run(plan, None, None)


# ---------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------


def _define_flags() -> None:
  flags.DEFINE_enum("source", None, ["abdomen_ctmr", "folder", "dataset"],
                    "Source layout; 'dataset' (a prepared dataset) only with --check.")
  flags.DEFINE_string("input", None, "Source root folder.")
  flags.DEFINE_string("output", None, "New dataset folder (absent or empty).")
  flags.DEFINE_string("spacing", "1.5,1.5", "Target in-plane spacing in mm; empty keeps the grid.")
  flags.DEFINE_bool("check", False, "Only check the source; write nothing.")
  flags.DEFINE_bool("plan", True, "Then write plan.json (data/plan.py): view size, normalisation, "
                    "network width and steps for --budget_minutes, timed on this machine.")
  flags.DEFINE_float("budget_minutes", 30.0, "With --plan: training and evaluation wall time.")
  flags.DEFINE_integer("limit", None, "Take only the first N cases of each modality.",
                       lower_bound=1)
  flags.DEFINE_multi_string("modality", [], "folder source: NAME or NAME=DIR, repeatable.")
  flags.DEFINE_multi_string("label_map", [], "folder source: RAW:SHARED,...[,*:0], one per "
                            "--modality.")
  flags.DEFINE_string("labels", None, "folder source: shared label names, comma-separated, "
                      "background first.")
  flags.DEFINE_multi_string("normalization", [], "folder source: zscore | minmax | none | "
                            "clip_zscore:LO:HI; one for all or one per --modality.")
  flags.DEFINE_bool("paired", False, "folder source: the modalities show the same subjects.")
  flags.DEFINE_string("name", None, "folder source: dataset name (default: output folder name).")


def _folder_modalities(input_dir) -> list[FolderModality]:
  f = flags.FLAGS
  if not f.modality:
    raise PrepareError("--source=folder needs at least one --modality=NAME[=DIR]")
  if len(f.label_map) != len(f.modality):
    raise PrepareError(f"--label_map is given {len(f.label_map)} time(s) for "
                       f"{len(f.modality)} --modality; give one per modality, in the same order")
  norms = list(f.normalization) or ["zscore"]
  if len(norms) == 1:
    norms = norms * len(f.modality)
  if len(norms) != len(f.modality):
    raise PrepareError(f"--normalization is given {len(f.normalization)} times for "
                       f"{len(f.modality)} --modality; give one for all or one per modality")
  out = []
  for text, label_map_text, norm_text in zip(f.modality, f.label_map, norms):
    name, _, folder = text.partition("=")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
      raise PrepareError(f"--modality={text!r}: NAME must be a plain folder name")
    label_map, unmapped = parse_label_map(label_map_text)
    out.append(FolderModality(name=name, folder=pathlib.Path(input_dir) / (folder or name),
                              label_map=label_map, unmapped=unmapped,
                              normalization=parse_normalization(norm_text)))
  return out


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if not f.source or not f.input:
    raise app.UsageError("--source and --input are required")
  folder_only = ("modality", "label_map", "labels", "normalization", "paired", "name")
  try:
    if f.source != "folder":
      given = [name for name in folder_only if f[name].present]
      if given:
        raise PrepareError(f"--{', --'.join(given)}: only for --source=folder")
    if f.source == "dataset":
      if not f.check:
        raise PrepareError("--source=dataset only checks an already prepared dataset; add --check")
      problems = check_dataset(f.input)
    elif f.source == "abdomen_ctmr":
      if f.check:
        problems = check_abdomen_ctmr(f.input, limit=f.limit)
      else:
        manifest = prepare_abdomen_ctmr(f.input, f.output, parse_spacing(f.spacing),
                                        limit=f.limit)
    else:
      if not f.labels:
        raise PrepareError("--source=folder needs --labels=background,NAME,...")
      modalities = _folder_modalities(f.input)
      labels = [s.strip() for s in f.labels.split(",")]
      if f.check:
        problems = check_folder(modalities, labels, paired=f.paired, limit=f.limit)
      else:
        manifest = import_folder(modalities, f.output, labels, parse_spacing(f.spacing),
                                 name=f.name, paired=f.paired, limit=f.limit, input_dir=f.input)
  except PrepareError as e:
    logging.error("%s", e)
    return 1
  if f.check:
    for problem in problems:
      logging.error("%s", problem)
    logging.info("%s: %d problem(s)", f.input, len(problems))
    return 1 if problems else 0
  counts = {m: len(ds.list_cases(manifest, m)) for m in manifest.modalities}
  logging.info("wrote %s: %s", manifest.root, counts)
  if f.plan:
    from unpaired_seg.data import plan as plan_lib  # times the network: JAX only when asked
    path = plan_lib.plan_dataset(manifest.root, f.budget_minutes)
    logging.info("wrote %s (a %s-minute budget; python -m unpaired_seg.plan plans again)", path,
                 f.budget_minutes)
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)
