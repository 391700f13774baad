"""Classical registration with SimpleITK: arrays <-> images, affine and B-spline stages, labels.

Arrays are [X, Y, Z] volumes on the model grid with their voxel-to-world affine in RAS (as
`PreparedCase.affine`); SimpleITK images live in ITK's LPS world, so the first two world axes
change sign on the way in (`to_image`). Image index (i, j, k) is array element [i, j, k].

Registration maps FIXED (target) points to MOVING (partner or atlas) points, as ITK does:

  1. start: the identity in world coordinates (what the scanner geometry says), or a translation
     that puts the moving body's centre of mass on the fixed body's ('body_centre'; bodies by
     Otsu's threshold, so that the intensities of two modalities need not agree);
  2. affine: Mattes mutual information, gradient descent with scales from physical shifts,
     a multi-resolution pyramid (`Settings.shrink_factors`);
  3. B-spline: a cubic free-form deformation on a control-point mesh over the fixed image
     (`Settings.mesh_size`), composed after the affine, Mattes mutual information, L-BFGS-B.

Labels are warped by nearest neighbour (`warp_labels`) and fused per voxel by majority vote
(`majority_vote`). Every call runs on `Settings.threads` threads; with one thread and a fixed
`Settings.seed` the random metric samples, and so the result, repeat exactly.
"""

import contextlib
import dataclasses
from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from unpaired_seg.data import geometry

INITS = ("identity", "body_centre")
# ITK's LPS world from RAS: the first two world axes change sign.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


@dataclasses.dataclass(frozen=True)
class Settings:
  """How a pair of volumes is registered (the config's `baseline` section).

  Attributes:
    init: 'identity' or 'body_centre' (see the module docstring).
    affine_iterations: gradient-descent iterations per pyramid level of the affine stage.
    bspline_iterations: L-BFGS-B iterations per level of the B-spline stage; 0 skips the stage.
    mesh_size: B-spline control-point mesh over the fixed image, cells per axis (X, Y, Z).
    histogram_bins: of the Mattes mutual information.
    sampling: share of the fixed voxels drawn at random for the metric at full resolution (the
      same number of samples at coarser levels, see `_method`).
    shrink_factors: affine pyramid, coarse to fine; Gaussian sigma f / 2 voxels (0 at f = 1).
    bspline_shrink_factors: the B-spline stage's pyramid.
    threads: SimpleITK threads.
    seed: of the metric's random samples.
  """
  init: str = "body_centre"
  affine_iterations: int = 200
  bspline_iterations: int = 100
  mesh_size: tuple[int, int, int] = (8, 8, 4)
  histogram_bins: int = 32
  sampling: float = 0.05
  shrink_factors: tuple[int, ...] = (4, 2, 1)
  bspline_shrink_factors: tuple[int, ...] = (2, 1)
  threads: int = 1
  seed: int = 0

  @classmethod
  def from_config(cls, section) -> "Settings":
    names = [f.name for f in dataclasses.fields(cls)]
    values = {n: section[n] for n in names}
    for n in ("mesh_size", "shrink_factors", "bspline_shrink_factors"):
      values[n] = tuple(int(v) for v in values[n])
    return cls(**values)


@contextlib.contextmanager
def _threads(n: int):
  """SimpleITK's default thread count set to `n` for the filters run inside, then restored."""
  before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
  sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(n))
  try:
    yield
  finally:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


# =============================================================================================
# Arrays and images.
# =============================================================================================

def to_image(array: np.ndarray, affine: np.ndarray, dtype=np.float32) -> sitk.Image:
  """A SimpleITK image of an [X, Y, Z] array with its RAS voxel-to-world affine."""
  array = np.asarray(array, dtype)
  if array.ndim != 3:
    raise ValueError(f"expected an [X, Y, Z] volume, got shape {array.shape}")
  linear = _RAS_TO_LPS @ np.asarray(affine, np.float64)[:3, :3]
  spacing = np.linalg.norm(linear, axis=0)
  image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
  image.SetSpacing([float(s) for s in spacing])
  image.SetDirection([float(v) for v in (linear / spacing).ravel()])
  image.SetOrigin([float(v) for v in _RAS_TO_LPS @ np.asarray(affine, np.float64)[:3, 3]])
  return image


def to_array(image: sitk.Image) -> np.ndarray:
  """The [X, Y, Z] array of an image (the inverse of `to_image`'s voxel order)."""
  return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def _body(image: sitk.Image) -> sitk.Image:
  """The voxels above Otsu's threshold, as a uint8 mask image on the same grid."""
  values = to_array(image)
  mask = sitk.GetImageFromArray(
      (values > geometry.otsu_threshold(values)).astype(np.uint8).transpose(2, 1, 0))
  mask.CopyInformation(image)
  return mask


# =============================================================================================
# Registration.
# =============================================================================================

def _method(settings: Settings, shrink_factors: Sequence[int]) -> sitk.ImageRegistrationMethod:
  """Mattes MI with random samples, linear interpolation, a pyramid of `shrink_factors`."""
  reg = sitk.ImageRegistrationMethod()
  reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=settings.histogram_bins)
  reg.SetMetricSamplingStrategy(reg.RANDOM)
  # `sampling` is the share at full resolution; a level shrunk by f keeps about the same number
  # of samples (f**3 times the share, all of its voxels at most), so coarse levels' histograms
  # are not starved.
  reg.SetMetricSamplingPercentagePerLevel(
      [min(1.0, settings.sampling * f ** 3) for f in shrink_factors], settings.seed)
  reg.SetInterpolator(sitk.sitkLinear)
  reg.SetShrinkFactorsPerLevel([int(f) for f in shrink_factors])
  reg.SetSmoothingSigmasPerLevel([0.0 if f == 1 else f / 2.0 for f in shrink_factors])
  reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
  reg.SetNumberOfThreads(settings.threads)
  return reg


def initial_transform(fixed: sitk.Image, moving: sitk.Image, init: str) -> sitk.AffineTransform:
  """The affine the affine stage starts from (see the module docstring)."""
  if init not in INITS:
    raise ValueError(f"config key 'baseline.init': {init!r} is not one of {INITS}")
  transform = sitk.AffineTransform(3)
  if init == "body_centre":
    moments = sitk.CenteredTransformInitializer(
        _body(fixed), _body(moving), sitk.AffineTransform(3),
        sitk.CenteredTransformInitializerFilter.MOMENTS)
    transform = sitk.AffineTransform(moments)
  else:
    # Rotate and scale about the fixed volume's centre, not the world origin.
    size = np.asarray(fixed.GetSize(), np.float64)
    transform.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint(
        [float(v) for v in (size - 1) / 2]))
  return transform


def affine_stage(fixed: sitk.Image, moving: sitk.Image, settings: Settings) -> sitk.Transform:
  """The mutual-information affine from `initial_transform`."""
  transform = initial_transform(fixed, moving, settings.init)
  if settings.affine_iterations == 0:
    return transform
  reg = _method(settings, settings.shrink_factors)
  # Steps in mm (scales from physical shifts), halved at each reversal of the gradient; plain
  # gradient descent with its convergence window stopped far from the optimum on the phantom.
  reg.SetOptimizerAsRegularStepGradientDescent(
      learningRate=1.0, minStep=1e-3, numberOfIterations=settings.affine_iterations,
      relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
  reg.SetOptimizerScalesFromPhysicalShift()
  reg.SetInitialTransform(transform, inPlace=True)
  reg.Execute(fixed, moving)
  return transform


def bspline_stage(fixed: sitk.Image, moving: sitk.Image, affine: sitk.Transform,
                  settings: Settings) -> sitk.Transform:
  """The B-spline deformation after `affine`: the composite fixed -> affine(bspline(x))."""
  if settings.bspline_iterations == 0:
    return affine
  bspline = sitk.BSplineTransformInitializer(fixed, list(settings.mesh_size), order=3)
  reg = _method(settings, settings.bspline_shrink_factors)
  # L-BFGS-B needs no parameter scales: estimating them from physical shifts perturbs every
  # control point and cost more than the optimisation on the phantom.
  reg.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5,
                           numberOfIterations=settings.bspline_iterations,
                           maximumNumberOfCorrections=5,
                           maximumNumberOfFunctionEvaluations=4 * settings.bspline_iterations)
  reg.SetMovingInitialTransform(affine)
  reg.SetInitialTransform(bspline, inPlace=True)
  reg.Execute(fixed, moving)
  # A composite applies its last transform first: x -> affine(bspline(x)), as optimised.
  return sitk.CompositeTransform([affine, bspline])


def register(fixed: sitk.Image, moving: sitk.Image, settings: Settings) -> sitk.Transform:
  """Fixed -> moving: the affine stage, then the B-spline stage."""
  with _threads(settings.threads):
    affine = affine_stage(fixed, moving, settings)
    return bspline_stage(fixed, moving, affine, settings)


# =============================================================================================
# Labels.
# =============================================================================================

def warp_labels(label: np.ndarray, label_affine: np.ndarray, reference: sitk.Image,
                transform: sitk.Transform | None = None, threads: int = 1) -> np.ndarray:
  """uint8 [X, Y, Z] labels on `reference`'s grid: label(transform(x)), nearest neighbour.

  Without a transform the labels are resampled through world coordinates alone (the identity):
  what the scanner geometry says. Outside the label volume: background.
  """
  moving = to_image(label, label_affine, np.uint8)
  with _threads(threads):
    warped = sitk.Resample(moving, reference, transform or sitk.Transform(3, sitk.sitkIdentity),
                           sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
  return to_array(warped).astype(np.uint8)


def majority_vote(labels: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
  """Per voxel the label most of `labels` give; a tie goes to the lowest label (background first).

  Args:
    labels: uint8 volumes of one shape (warped atlases).
    num_classes: labels are in [0, num_classes).

  Returns:
    uint8 fused labels.
  """
  if not labels:
    raise ValueError("majority_vote needs at least one label volume")
  votes = np.zeros((num_classes,) + np.shape(labels[0]), np.uint16)
  for label in labels:
    label = np.asarray(label)
    if label.shape != votes.shape[1:]:
      raise ValueError(f"label volumes differ in shape: {label.shape} vs {votes.shape[1:]}")
    for k in range(num_classes):
      votes[k] += label == k
  return np.argmax(votes, axis=0).astype(np.uint8)    # argmax takes the first of equal counts
