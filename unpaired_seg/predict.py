"""Label NIfTI files for new images with a trained run; the training dataset is not needed.

  python -m unpaired_seg.predict --workdir=runs/joint --input=/data/new_mr --modality=mr \
      --output=/tmp/pred_mr

Every `*.nii.gz` / `*.nii` in --input (nnU-Net's `<case>_0000` suffix is dropped from the output
name) goes the way the training volumes went, as recorded in the run's model_info.json: its affine
corrected as `prepare` corrected the modality's sources (--source_axis_flips), reoriented to RAS,
resampled in-plane to the run's target spacing (as `prepare` did; an integer image is
rounded to its type as `prepare` stored it), normalised by the modality's scheme (with the
training split's statistics for `dataset_zscore`), predicted slice by slice in tiles of the
training size (one compile), re-stacked, and taken back to the input's grid by nearest neighbour.
The output is a uint8 label file with the input's exact shape and header geometry (affine, qform
and sform), written atomically (a temporary file, then a rename). --output must not be, or lie
inside, --input: nothing is ever written into the input folder.

--checkpoint=best (default; the latest when no best exists) or latest.

--source_axis_flips=auto (default) | none | 0,1,...: voxel axes of the input files whose affine
direction is reversed before anything else (`geometry.reverse_axis_directions`; the voxels are
not touched). `auto` takes the run's value for --modality from model_info.json: the axes `prepare`
reversed in that modality's training sources (axis 1 of BTCV CT, whose affines put the back of
the body in front; none for a run whose model_info.json predates the key). `none` reverses
nothing; `1` or `0,1` name the axes. Only the reading changes: the output keeps the input's
voxel grid and header.
"""

import dataclasses
import os
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence

import ml_collections
import nibabel as nib
import numpy as np
from absl import app, flags, logging

from unpaired_seg import config_schema
from unpaired_seg import evaluate as evaluate_lib
from unpaired_seg import methods
from unpaired_seg import bookkeeping
from unpaired_seg import rng
from unpaired_seg.data import dataset as ds
from unpaired_seg.data import geometry
from unpaired_seg.data import pipeline
from unpaired_seg.data import prepare

_CHANNEL_SUFFIX = re.compile(r"_0000$")


class PredictError(ValueError):
  """A run, an input file or an argument of `predict` is unusable; the message names it."""


@dataclasses.dataclass
class Model:
  """A trained run, ready to predict."""
  workdir: pathlib.Path
  config: ml_collections.ConfigDict
  info: dict
  method: object
  state: object
  step: int
  checkpoint: str
  predictor: Callable


def _example_batch(info: Mapping, config: ml_collections.ConfigDict) -> dict:
  """Zeros shaped as the run's first training batch, to build the state's structure."""
  def build(spec):
    if isinstance(spec, Mapping):
      return {k: build(v) for k, v in spec.items()}
    shape, dtype = spec
    return np.zeros(shape, dtype)

  if "example_batch" in info:
    return build(info["example_batch"])
  h, w = info["image_size"]
  b, c = config.train.batch_size, 2 * info["context_slices"] + 1
  return {m: {"image": np.zeros((b, h, w, c), np.float32), "label": np.zeros((b, h, w), np.int32),
              "labelled": np.ones((b,), np.float32)} for m in info["modalities"]}


def load_model(workdir: os.PathLike, checkpoint: str = "best") -> Model:
  """Rebuilds a run's method from config.json and model_info.json and restores a checkpoint.

  Args:
    workdir: the run folder.
    checkpoint: 'best' (the latest when the run has no best) or 'latest'.

  Raises:
    PredictError / FileNotFoundError: naming the file that is missing or unusable.
  """
  workdir = pathlib.Path(workdir)
  if checkpoint not in ("best", "latest"):
    raise PredictError(f"--checkpoint must be best or latest, got {checkpoint!r}")
  if not (workdir / "checkpoints").is_dir():
    raise PredictError(f"{workdir}: no checkpoints/ folder: not a trained run")
  config = ml_collections.ConfigDict(config_schema.with_added_keys(
      evaluate_lib.read_json(workdir / "config.json", "run config")))
  info = evaluate_lib.read_json(workdir / "model_info.json",
                                "model info (written by training since model_info.json exists)")
  config_schema.validate(config, methods.REGISTRY)
  method = methods.create(config, num_classes=len(info["class_names"]),
                          modalities=tuple(info["modalities"]))
  state = method.init(rng.prng_key(config.seed), _example_batch(info, config))
  checkpoints = bookkeeping.Checkpoints(workdir, config.train.keep_checkpoints)
  try:
    which = checkpoint
    restored, step = checkpoints.restore(which, state)
    if restored is None and which == "best":
      which = "latest"
      restored, step = checkpoints.restore(which, state)
  finally:
    checkpoints.close()
  if restored is None:
    raise PredictError(f"{workdir / 'checkpoints'}: no checkpoint to predict with")
  logging.info("%s: %s checkpoint, step %d", workdir, which, step)
  return Model(workdir, config, info, method, restored, int(step), which,
               evaluate_lib.make_predictor(method))


def parse_source_axis_flips(text: str | None) -> tuple[int, ...] | None:
  """The --source_axis_flips flag: 'auto' (or empty) -> None, 'none' -> (), '0,1' -> (0, 1)."""
  text = "auto" if text is None else str(text).strip()
  if text in ("auto", ""):
    return None
  if text == "none":
    return ()
  try:
    return geometry.check_axes([int(a) for a in text.split(",")], "--source_axis_flips")
  except (ValueError, geometry.GeometryError):
    raise PredictError(f"--source_axis_flips={text!r}: expected auto, none or distinct voxel "
                       "axes in 0..2 such as 1 or 0,1") from None


def run_source_axis_flips(model: Model, modality: str) -> tuple[int, ...]:
  """The axes `prepare` reversed in the run's `modality` sources; () without the key."""
  where = model.workdir / "model_info.json"
  flips = model.info.get("source_axis_flips", {})
  if not isinstance(flips, Mapping):
    raise PredictError(f"{where}: key 'source_axis_flips' must map modalities to lists of axes")
  try:
    return geometry.check_axes(flips.get(modality, []), f"source_axis_flips.{modality}")
  except geometry.GeometryError as e:
    raise PredictError(f"{where}: {e}") from None


def predict_array(model: Model, image: np.ndarray, affine: np.ndarray, modality: str,
                  *, name: str = "image",
                  source_axis_flips: Sequence[int] | None = None) -> np.ndarray:
  """Labels for one [X, Y, Z] image as stored (any orientation), on the same grid.

  Args:
    model: from `load_model`.
    image: [X, Y, Z] intensities as stored in the file (its dtype matters: see the module doc).
    affine: [4, 4] of the file.
    modality: one of the run's modalities.
    name: named in errors.
    source_axis_flips: voxel axes whose affine direction is reversed before reorientation;
      None takes the run's value for `modality` (`run_source_axis_flips`).

  Returns:
    uint8 [X, Y, Z] shared labels.
  """
  info = model.info
  if modality not in info["modalities"]:
    raise PredictError(f"--modality={modality!r}: the run {model.workdir} was trained on "
                       f"{info['modalities']}")
  if source_axis_flips is None:
    flips = run_source_axis_flips(model, modality)
  else:
    try:
      flips = geometry.check_axes(source_axis_flips, "source_axis_flips")
    except geometry.GeometryError as e:
      raise PredictError(str(e)) from None
  # As `prepare` read the training sources: the voxels stay, so the way back needs no undoing.
  affine = geometry.reverse_axis_directions(affine, np.shape(image), flips)
  target = info["target_spacing"]
  grid_image, _, _, record = geometry.to_model_grid(image, None, affine,
                                                    None if target is None else tuple(target))
  # The training volumes were read back from files `prepare` stored in the source's type.
  grid_image = prepare._stored_image(grid_image, image.dtype).astype(np.float32)  # noqa: SLF001
  normalised = pipeline.normalize_intensity(grid_image, info["normalization"][modality], name=name)
  # A method with its own volume inference (3D windows) predicts as it was evaluated in training.
  predict_fn = model.method.predict_volume or evaluate_lib.predict_volume
  labels = predict_fn(
      model.predictor, model.state, modality, normalised, tile_size=info["image_size"],
      context_slices=info["context_slices"], batch_size=model.config.eval.batch_size,
      overlap=model.config.eval.tile_overlap)
  return geometry.to_source_grid(labels, record).astype(np.uint8)


def output_name(path: pathlib.Path) -> str:
  """'<case>_0000.nii.gz' -> '<case>.nii.gz'; other names are kept."""
  for ending in ds.FILE_ENDINGS:
    if path.name.endswith(ending):
      return _CHANNEL_SUFFIX.sub("", path.name[:-len(ending)]) + ending
  return path.name


def write_like(path: pathlib.Path, labels: np.ndarray, like: nib.Nifti1Image) -> None:
  """Writes uint8 labels with the header geometry of `like`, atomically."""
  header = like.header.copy()
  header.set_data_dtype(np.uint8)
  header.set_slope_inter(1.0, 0.0)
  # No affine argument: nibabel then keeps the header's qform and sform exactly as they are.
  image = nib.Nifti1Image(np.asarray(labels, np.uint8), None, header=header)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = ds._temp_name(path)  # noqa: SLF001  (the dataset layer's hidden temporary name)
  try:
    nib.save(image, str(tmp))
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def check_output(input_dir: os.PathLike, output_dir: os.PathLike) -> tuple[pathlib.Path,
                                                                           pathlib.Path]:
  """Resolved (input, output) folders; refuses an output that is, or lies inside, the input."""
  if not output_dir or not str(output_dir).strip():
    raise PredictError("--output: a folder for the predictions is required")
  source = pathlib.Path(input_dir).expanduser().resolve()
  out = pathlib.Path(output_dir).expanduser().resolve()
  if not source.is_dir():
    raise PredictError(f"--input={input_dir}: not a folder of NIfTI images")
  if out == source or out.is_relative_to(source):
    raise PredictError(f"--output={output_dir} is or lies inside --input={input_dir}; predictions "
                       "are never written into the input folder")
  if out.exists() and not out.is_dir():
    raise PredictError(f"--output={output_dir} exists and is not a folder")
  return source, out


def input_files(folder: pathlib.Path) -> list[pathlib.Path]:
  files = sorted(p for p in folder.iterdir()
                 if p.is_file() and not p.name.startswith(".") and p.name.endswith(ds.FILE_ENDINGS))
  if not files:
    raise PredictError(f"--input={folder}: no *.nii.gz or *.nii images")
  names = [output_name(p) for p in files]
  clashes = sorted({n for n in names if names.count(n) > 1})
  if clashes:
    raise PredictError(f"--input={folder}: several images would be written as {clashes}")
  return files


def _read_input(path: pathlib.Path) -> tuple[np.ndarray, nib.Nifti1Image]:
  """An input's voxels and header; a PredictError / DatasetError naming the file if unusable."""
  image, _ = ds._read_nifti(path)  # noqa: SLF001  (checks 3D and the affine, names the file)
  if np.issubdtype(image.dtype, np.floating) and not np.all(np.isfinite(image)):
    raise PredictError(f"{path}: image holds NaN or inf voxels")
  return image, nib.load(str(path))


def predict_folder(model: Model, input_dir: os.PathLike, modality: str,
                   output_dir: os.PathLike, *,
                   source_axis_flips: Sequence[int] | None = None) -> list[pathlib.Path]:
  """Predicts every image in `input_dir` into `output_dir` (see the module docstring).

  `source_axis_flips`: as in `predict_array` (None: the run's value for `modality`).
  """
  source, out = check_output(input_dir, output_dir)
  if source_axis_flips is None and modality in model.info["modalities"]:
    source_axis_flips = run_source_axis_flips(model, modality)   # once, not per file
    logging.info("%s: reversing the affine direction of voxel axes %s (the run's)", modality,
                 list(source_axis_flips))
  files = input_files(source)
  for path in files:   # every input checked before the first output is written
    _read_input(path)
  written = []
  for path in files:
    image, like = _read_input(path)
    labels = predict_array(model, image, np.asarray(like.affine, np.float64), modality,
                           name=str(path), source_axis_flips=source_axis_flips)
    target = out / output_name(path)
    write_like(target, labels, like)
    logging.info("%s -> %s %s", path, target, np.bincount(labels.ravel()).tolist())
    written.append(target)
  return written


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "The trained run's folder.")
  flags.DEFINE_string("input", None, "Folder of NIfTI images of one modality.")
  flags.DEFINE_string("modality", None, "Their modality (one of the run's).")
  flags.DEFINE_string("output", None, "Folder for the label files (not inside --input).")
  flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint predicts.")
  flags.DEFINE_string("source_axis_flips", "auto", "auto (the run's value for --modality), none, "
                      "or voxel axes such as 1 or 0,1 whose affine direction is reversed.")
  flags.mark_flags_as_required(["workdir", "input", "modality", "output"])


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    check_output(f.input, f.output)  # before the model is built: fail in a second
    flips = parse_source_axis_flips(f.source_axis_flips)
    model = load_model(f.workdir, f.checkpoint)
    written = predict_folder(model, f.input, f.modality, f.output, source_axis_flips=flips)
  except (ValueError, FileNotFoundError) as e:  # every error here names its file or flag
    logging.error("%s", e)
    return 1
  logging.info("wrote %d label file(s) to %s", len(written), f.output)
  return 0


if __name__ == "__main__":
  _define_flags()
  app.run(main)
