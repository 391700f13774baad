"""Tests of unpaired_seg.metrics: hand-computed cases, analytic shapes and independent references.

The metrics of one pair of masks; label volumes, aggregation, settings and JSON are tested in
tests/test_metrics_volume.py.

  python -m pytest -q tests/test_metrics.py
"""

import math

import numpy as np
import pytest
from scipy import ndimage

from unpaired_seg import metrics

SQRT2 = math.sqrt(2.0)


# ------------------------------------------------------------------------------------------------
# Helpers written independently of the implementation.
# ------------------------------------------------------------------------------------------------


def ball(shape, spacing, radius_mm):
  """A ball of `radius_mm` around the grid centre, round in mm (an ellipsoid in voxels)."""
  grid = np.indices(shape, dtype=np.float64)
  centre = [(n - 1) / 2.0 for n in shape]
  dist2 = sum(((grid[i] - centre[i]) * spacing[i]) ** 2 for i in range(len(shape)))
  return dist2 <= radius_mm ** 2


def random_blobs(shape, seed, sigma=2.0, level=0.3):
  """Smoothed random field thresholded: irregular blobs, often several components."""
  field = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)
  return field > level * field.std()


def brute_force_surface(mask):
  """Mask voxels with at least one face neighbour outside, by explicit neighbour look-ups."""
  padded = np.pad(mask, 1, constant_values=False)
  surface = np.zeros_like(mask)
  for index in np.argwhere(mask):
    centre = tuple(index + 1)
    for axis in range(mask.ndim):
      for step in (-1, 1):
        neighbour = list(centre)
        neighbour[axis] += step
        if not padded[tuple(neighbour)]:
          surface[tuple(index)] = True
  return surface


def brute_force_directed(from_mask, to_mask, spacing):
  """For each surface voxel of `from_mask` (C order): min distance in mm to `to_mask`'s surface."""
  a = np.argwhere(brute_force_surface(from_mask)) * np.asarray(spacing, dtype=np.float64)
  b = np.argwhere(brute_force_surface(to_mask)) * np.asarray(spacing, dtype=np.float64)
  pairwise = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
  return pairwise.min(axis=1)


def linear_percentile(values, q):
  """The q-th percentile with linear interpolation between order statistics."""
  ordered = sorted(float(v) for v in values)
  rank = q / 100.0 * (len(ordered) - 1)
  lo = math.floor(rank)
  hi = min(lo + 1, len(ordered) - 1)
  return ordered[lo] + (rank - lo) * (ordered[hi] - ordered[lo])


# ------------------------------------------------------------------------------------------------
# Dice.
# ------------------------------------------------------------------------------------------------


def test_dice_by_hand():
  assert metrics.dice(np.array([1, 1, 0, 0]), np.array([0, 1, 1, 1])) == pytest.approx(2 / 5)
  pred = np.zeros((4, 4), bool)
  ref = np.zeros((4, 4), bool)
  pred[0:2, 0:2] = True  # 4 voxels
  ref[1:3, 1:4] = True  # 6 voxels, overlap {(1, 1)}
  assert metrics.dice(pred, ref) == pytest.approx(2 * 1 / 10)
  assert metrics.dice(pred, pred) == 1.0


def test_dice_empty_policy():
  empty = np.zeros((3, 3, 3), bool)
  one = empty.copy()
  one[1, 1, 1] = True
  assert math.isnan(metrics.dice(empty, empty))
  assert metrics.dice(one, empty) == 0.0
  assert metrics.dice(empty, one) == 0.0
  assert metrics.EMPTY_POLICY["one_empty"]["dice"] == 0.0


def test_mask_input_errors():
  with pytest.raises(metrics.MetricInputError, match="pred"):
    metrics.dice(np.array([0, 2, 1]), np.array([0, 1, 1]))  # a label volume, not a mask
  with pytest.raises(metrics.MetricInputError, match="shapes differ"):
    metrics.dice(np.zeros((2, 3), bool), np.zeros((3, 2), bool))
  with pytest.raises(ValueError, match="spacing"):
    metrics.hausdorff(np.ones((3, 3), bool), np.ones((3, 3), bool), spacing=(1.0, 1.0, 1.0))
  with pytest.raises(ValueError, match="spacing"):
    metrics.assd(np.ones((3, 3), bool), np.ones((3, 3), bool), spacing=(1.0, -1.0))
  with pytest.raises(ValueError, match="variant"):
    metrics.hd95(np.ones((3, 3), bool), np.ones((3, 3), bool), (1, 1), variant="p95")
  with pytest.raises(ValueError, match="tolerance_mm"):
    metrics.surface_dice(np.ones((3, 3), bool), np.ones((3, 3), bool), (1, 1), tolerance_mm=-1)


# ------------------------------------------------------------------------------------------------
# Surface distances: hand-computed cases.
# ------------------------------------------------------------------------------------------------


def test_1d_runs_by_hand_separate_the_variants():
  # pred: one run at 2..6, surface {2, 6}. ref: the same run plus a lone voxel at 16,
  # surface {2, 6, 16}. pred->ref: [0, 0]; ref->pred: [0, 0, 10] voxels.
  pred = np.zeros(20, bool)
  pred[2:7] = True
  ref = pred.copy()
  ref[16] = True
  for s in (1.0, 0.5):
    to_ref, to_pred = metrics.surface_distances(pred, ref, (s,))
    np.testing.assert_allclose(to_ref, [0.0, 0.0])
    np.testing.assert_allclose(to_pred, [0.0, 0.0, 10 * s])
    assert metrics.hausdorff(pred, ref, (s,)) == pytest.approx(10 * s)
    # Directed p95 of [0, 0, 10]: rank 1.9 -> 0.9 * 10. Pooled [0, 0, 0, 0, 10]: rank 3.8 -> 8.
    assert metrics.hd95(pred, ref, (s,)) == pytest.approx(9 * s)
    assert metrics.hd95(pred, ref, (s,), variant="pooled") == pytest.approx(8 * s)
    # Directed means 0 and 10/3; pooled mean 10/5.
    assert metrics.assd(pred, ref, (s,)) == pytest.approx(5 / 3 * s)
    assert metrics.assd(pred, ref, (s,), variant="pooled") == pytest.approx(2 * s)
    # Within 1 voxel: 2 of 2 pred surface voxels, 2 of 3 ref surface voxels.
    assert metrics.surface_dice(pred, ref, (s,), tolerance_mm=s) == pytest.approx(4 / 5)
  assert metrics.dice(pred, ref) == pytest.approx(10 / 11)


def test_2d_shifted_squares_by_hand():
  # 3x3 squares, ref one column to the right of pred. Each surface is the 8 border voxels.
  pred = np.zeros((5, 6), bool)
  pred[1:4, 1:4] = True
  ref = np.zeros((5, 6), bool)
  ref[1:4, 2:5] = True
  assert metrics.dice(pred, ref) == pytest.approx(12 / 18)
  # Spacing (1, 3): column steps are 3 mm. pred's left column is 3 mm from ref's; the voxels in
  # the shared columns lie on ref's surface except pred's (2, 3), which is ref's centre and 1 mm
  # (one row) from ref's surface voxel (1, 3). pred->ref = [3, 3, 3, 0, 0, 0, 1, 0] and, by
  # mirror symmetry, ref->pred holds the same values.
  spacing = (1.0, 3.0)
  to_ref, to_pred = metrics.surface_distances(pred, ref, spacing)
  # C order of pred's surface: (1,1) (1,2) (1,3) (2,1) (2,3) (3,1) (3,2) (3,3).
  np.testing.assert_allclose(to_ref, [3, 0, 0, 3, 1, 3, 0, 0])
  np.testing.assert_allclose(np.sort(to_pred), [0, 0, 0, 0, 1, 3, 3, 3])
  assert metrics.hausdorff(pred, ref, spacing) == pytest.approx(3.0)
  assert metrics.hd95(pred, ref, spacing) == pytest.approx(3.0)
  assert metrics.assd(pred, ref, spacing) == pytest.approx(10 / 8)
  assert metrics.surface_dice(pred, ref, spacing, tolerance_mm=0.5) == pytest.approx(8 / 16)
  assert metrics.surface_dice(pred, ref, spacing, tolerance_mm=1.0) == pytest.approx(10 / 16)
  assert metrics.surface_dice(pred, ref, spacing, tolerance_mm=3.0) == pytest.approx(1.0)
  # Isotropic: every nonzero distance is 1 voxel.
  assert metrics.hausdorff(pred, ref, (1.0, 1.0)) == pytest.approx(1.0)
  assert metrics.assd(pred, ref, (1.0, 1.0)) == pytest.approx(4 / 8)


def test_single_voxel_in_square_by_hand():
  # pred: the centre voxel; ref: the 3x3 square around it (surface: its 8 border voxels).
  pred = np.zeros((5, 5), bool)
  pred[2, 2] = True
  ref = np.zeros((5, 5), bool)
  ref[1:4, 1:4] = True
  to_ref, to_pred = metrics.surface_distances(pred, ref, (1.0, 1.0))
  np.testing.assert_allclose(to_ref, [1.0])
  np.testing.assert_allclose(to_pred, [SQRT2, 1, SQRT2, 1, 1, SQRT2, 1, SQRT2])
  assert metrics.hausdorff(pred, ref, (1, 1)) == pytest.approx(SQRT2)
  assert metrics.assd(pred, ref, (1, 1)) == pytest.approx((1 + (1 + SQRT2) / 2) / 2)
  assert metrics.assd(pred, ref, (1, 1), variant="pooled") == pytest.approx((5 + 4 * SQRT2) / 9)
  assert metrics.dice(pred, ref) == pytest.approx(2 / 10)


# ------------------------------------------------------------------------------------------------
# Surface distances: analytic shapes.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing, shape", [
    ((1.0, 1.0, 1.0), (31, 31, 31)),
    ((1.0, 1.0, 2.0), (31, 31, 16)),
    ((0.8, 1.2, 2.5), (40, 28, 14)),
])
@pytest.mark.parametrize("r_inner, r_outer", [(5.0, 11.0), (4.0, 13.0)])
def test_concentric_spheres(spacing, shape, r_inner, r_outer):
  inner = ball(shape, spacing, r_inner)
  outer = ball(shape, spacing, r_outer)
  gap = r_outer - r_inner
  # Surface voxels of a digital ball of radius r lie at radii in (r - max spacing, r], so the
  # surfaces' distances differ from the gap by less than about one voxel.
  voxel = max(spacing)
  assert abs(metrics.hausdorff(inner, outer, spacing) - gap) <= voxel
  assert abs(metrics.hd95(inner, outer, spacing) - gap) <= voxel
  assert abs(metrics.assd(inner, outer, spacing) - gap) <= 0.5 * voxel
  assert metrics.hausdorff(inner, outer, spacing) == metrics.hausdorff(outer, inner, spacing)
  # Nothing of either surface is within a tolerance well below the gap.
  assert metrics.surface_dice(inner, outer, spacing, tolerance_mm=gap - 2 * voxel) == 0.0


def test_mask_against_itself_is_zero():
  mask = random_blobs((20, 18, 12), seed=3)
  spacing = (0.7, 1.1, 3.0)
  to_ref, to_pred = metrics.surface_distances(mask, mask, spacing)
  assert to_ref.size > 0 and to_pred.size == to_ref.size
  assert np.all(to_ref == 0) and np.all(to_pred == 0)
  assert metrics.hausdorff(mask, mask, spacing) == 0.0
  assert metrics.hd95(mask, mask, spacing) == 0.0
  assert metrics.assd(mask, mask, spacing) == 0.0
  assert metrics.surface_dice(mask, mask, spacing, tolerance_mm=0.0) == 1.0
  assert metrics.dice(mask, mask) == 1.0


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 3])
def test_shifted_mask_hausdorff_is_shift(axis, k):
  # For any bounded set and its translate by v the Hausdorff distance is |v|: the extreme surface
  # voxel opposite to v is |v| away from everything in the translate.
  spacing = (0.9, 1.3, 2.5)
  mask = np.zeros((26, 26, 26), bool)
  mask[5:19, 5:19, 5:19] = random_blobs((14, 14, 14), seed=7)
  assert mask.any()
  shifted = np.roll(mask, k, axis=axis)  # Stays clear of the array border.
  expected = k * spacing[axis]
  assert metrics.hausdorff(mask, shifted, spacing) == pytest.approx(expected)
  assert metrics.hausdorff(shifted, mask, spacing) == pytest.approx(expected)
  assert 0.0 < metrics.hd95(mask, shifted, spacing) <= expected + 1e-12
  assert metrics.surface_dice(mask, shifted, spacing, tolerance_mm=expected) == 1.0


# ------------------------------------------------------------------------------------------------
# Against independent implementations.
# ------------------------------------------------------------------------------------------------


def _blob_pairs():
  """Pairs of overlapping random blobs, 2D and 3D, one touching the array border."""
  pairs = []
  for seed, shape, spacing in [
      (0, (24, 20), (1.0, 1.0)),
      (1, (22, 26), (0.6, 2.2)),
      (2, (14, 16, 10), (1.0, 1.0, 1.0)),
      (3, (16, 12, 10), (0.8, 1.5, 3.0)),
  ]:
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.standard_normal(shape), 2.0)
    noise = ndimage.gaussian_filter(rng.standard_normal(shape), 1.5)
    pred = field + 0.5 * noise > 0.2 * field.std()
    ref = field > 0.2 * field.std()
    pairs.append((pred, ref, spacing))
  # Objects on the border of the array, and a far-away speck in a large empty volume.
  pred = np.zeros((12, 30, 9), bool)
  ref = np.zeros((12, 30, 9), bool)
  pred[:5, :6, 3:] = True
  ref[:4, 1:7, 2:] = True
  ref[10, 27, 1] = True
  pairs.append((pred, ref, (1.2, 0.7, 2.0)))
  for pred, ref, _ in pairs:
    assert pred.any() and ref.any() and (pred != ref).any()
  return pairs


@pytest.mark.parametrize("case", range(5))
def test_against_brute_force_reference(case):
  pred, ref, spacing = _blob_pairs()[case]
  expected_to_ref = brute_force_directed(pred, ref, spacing)
  expected_to_pred = brute_force_directed(ref, pred, spacing)
  to_ref, to_pred = metrics.surface_distances(pred, ref, spacing)
  np.testing.assert_allclose(to_ref, expected_to_ref, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(to_pred, expected_to_pred, rtol=1e-12, atol=1e-12)

  pooled = np.concatenate([expected_to_ref, expected_to_pred])
  assert metrics.hausdorff(pred, ref, spacing) == pytest.approx(pooled.max())
  assert metrics.hd95(pred, ref, spacing) == pytest.approx(
      max(linear_percentile(expected_to_ref, 95), linear_percentile(expected_to_pred, 95)))
  assert metrics.hd95(pred, ref, spacing, variant="pooled") == pytest.approx(
      linear_percentile(pooled, 95))
  assert metrics.assd(pred, ref, spacing) == pytest.approx(
      (expected_to_ref.mean() + expected_to_pred.mean()) / 2)
  assert metrics.assd(pred, ref, spacing, variant="pooled") == pytest.approx(pooled.mean())
  for tol in (0.0, 1.0, 2.5):
    within = np.count_nonzero(expected_to_ref <= tol) + np.count_nonzero(expected_to_pred <= tol)
    assert metrics.surface_dice(pred, ref, spacing, tol) == pytest.approx(within / pooled.size)
  assert metrics.dice(pred, ref) == pytest.approx(
      2 * np.logical_and(pred, ref).sum() / (pred.sum() + ref.sum()))


@pytest.mark.parametrize("case", range(5))
def test_against_medpy(case):
  medpy_binary = pytest.importorskip("medpy.metric.binary")
  pred, ref, spacing = _blob_pairs()[case]
  kwargs = dict(voxelspacing=spacing, connectivity=1)
  assert metrics.hausdorff(pred, ref, spacing) == pytest.approx(
      medpy_binary.hd(pred, ref, **kwargs), rel=1e-12)
  # MedPy 0.5 pools both directions for hd95 and assd.
  assert metrics.hd95(pred, ref, spacing, variant="pooled") == pytest.approx(
      medpy_binary.hd95(pred, ref, **kwargs), rel=1e-12)
  assert metrics.assd(pred, ref, spacing, variant="pooled") == pytest.approx(
      medpy_binary.assd(pred, ref, **kwargs), rel=1e-12)
  # Its directed means give the default ASSD.
  directed = (medpy_binary.asd(pred, ref, **kwargs), medpy_binary.asd(ref, pred, **kwargs))
  assert metrics.assd(pred, ref, spacing) == pytest.approx(np.mean(directed), rel=1e-12)
  assert metrics.dice(pred, ref) == pytest.approx(medpy_binary.dc(pred, ref), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# Empty masks.
# ------------------------------------------------------------------------------------------------


def test_distance_metrics_empty_policy():
  empty = np.zeros((6, 6, 6), bool)
  cube = empty.copy()
  cube[1:4, 1:4, 1:4] = True
  spacing = (1.0, 1.0, 2.0)
  for pred, ref in ((empty, empty), (cube, empty), (empty, cube)):
    assert math.isnan(metrics.hausdorff(pred, ref, spacing))
    assert math.isnan(metrics.hd95(pred, ref, spacing))
    assert math.isnan(metrics.hd95(pred, ref, spacing, variant="pooled"))
    assert math.isnan(metrics.assd(pred, ref, spacing))
  assert math.isnan(metrics.surface_dice(empty, empty, spacing, 2.0))
  assert metrics.surface_dice(cube, empty, spacing, 2.0) == 0.0
  assert metrics.surface_dice(empty, cube, spacing, 2.0) == 0.0
  with pytest.raises(metrics.EmptyMaskError, match="ref"):
    metrics.surface_distances(cube, empty, spacing)
  with pytest.raises(ValueError, match="pred"):
    metrics.surface_distances(empty, cube, spacing)


# ------------------------------------------------------------------------------------------------
# Per-slice Dice.
# ------------------------------------------------------------------------------------------------


def test_per_slice_dice_by_hand():
  pred = np.zeros((2, 2, 4), bool)
  ref = np.zeros((2, 2, 4), bool)
  # Slice 0 (last axis): both empty -> 1.
  pred[0, 0, 1] = ref[0, 0, 1] = True  # Slice 1: identical -> 1.
  pred[1, 1, 2] = True  # Slice 2: pred 1 voxel, ref 2, overlap 1 -> 2/3.
  ref[1, 1, 2] = ref[0, 1, 2] = True
  pred[1, 0, 3] = True  # Slice 3: ref empty -> 0.
  assert metrics.per_slice_dice(pred, ref) == pytest.approx((1 + 1 + 2 / 3 + 0) / 4)
  assert metrics.per_slice_dice(pred, ref, axis=2) == pytest.approx((1 + 1 + 2 / 3 + 0) / 4)
  # Along axis 0: slice 0 has pred {(0,1)}, ref {(0,1), (1,2)} -> 2/3; slice 1 has pred
  # {(1,2), (0,3)}, ref {(1,2)} -> 2/3.
  assert metrics.per_slice_dice(pred, ref, axis=0) == pytest.approx(2 / 3)
  # The 3D Dice of the same volumes differs: overlap 2, sizes 3 + 3.
  assert metrics.dice(pred, ref) == pytest.approx(4 / 6)
  empty = np.zeros((3, 3, 5), bool)
  assert metrics.per_slice_dice(empty, empty) == 1.0
  with pytest.raises(ValueError, match="axis"):
    metrics.per_slice_dice(pred, ref, axis=3)
