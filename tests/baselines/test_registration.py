"""SimpleITK registration: world coordinates, recovery of a known affine, label fusion."""

import numpy as np
import pytest

from unpaired_seg import metrics
from unpaired_seg.baselines import registration as reg
from unpaired_seg.data import dataset as ds
from unpaired_seg.data import phantom

FAST = dict(affine_iterations=60, bspline_iterations=3, mesh_size=(2, 2, 1), histogram_bins=16,
            sampling=0.25, shrink_factors=(2, 1), bspline_shrink_factors=(1,), threads=1)


@pytest.fixture(scope="module")
def mr_volume(tmp_path_factory):
  """A tiny phantom MR volume: z-scored image, shared labels, affine."""
  manifest = phantom.ensure(tmp_path_factory.mktemp("phantom") / "unpaired", mode="unpaired",
                            num_subjects=3, shape=(32, 32, 12), seed=0)
  volume = ds.load_modality(manifest, "mr")[0]
  image = np.asarray(volume.image, np.float32)
  return (image - image.mean()) / image.std(), volume.label.astype(np.uint8), volume.affine


def _mean_dice(a, b, classes=range(1, 5)):
  return float(np.mean([metrics.dice(a == k, b == k) for k in classes]))


def _known_affine():
  """8 degrees about the slice axis, 5 % larger, shifted by (6, -4, 5) mm (RAS world)."""
  t = np.deg2rad(8.0)
  out = np.eye(4)
  out[:3, :3] = 1.05 * np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0],
                                 [0, 0, 1]])
  out[:3, 3] = (6.0, -4.0, 5.0)
  return out


def test_images_keep_the_world_coordinates_of_the_arrays():
  affine = np.array([[0, -2.0, 0, 10], [1.5, 0, 0, -3], [0, 0, 5.0, 7], [0, 0, 0, 1]])
  array = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
  image = reg.to_image(array, affine)
  assert image.GetSize() == (4, 5, 6)
  np.testing.assert_array_equal(reg.to_array(image), array)
  index = (3, 1, 2)
  ras = affine @ np.array(index + (1,), np.float64)
  lps = image.TransformIndexToPhysicalPoint(index)
  np.testing.assert_allclose(lps, (-ras[0], -ras[1], ras[2]))


def test_labels_resampled_on_their_own_geometry_are_unchanged(mr_volume):
  image, label, affine = mr_volume
  np.testing.assert_array_equal(reg.warp_labels(label, affine, reg.to_image(image, affine)), label)


def test_register_recovers_a_known_affine(mr_volume):
  image, label, affine = mr_volume
  moved = _known_affine() @ affine        # the same voxels, placed elsewhere in the world
  fixed, moving = reg.to_image(image, affine), reg.to_image(image, moved)
  # Control: through world coordinates alone the labels are far off.
  assert _mean_dice(reg.warp_labels(label, moved, fixed), label) < 0.5
  transform = reg.register(fixed, moving, reg.Settings(init="identity", **FAST))
  assert _mean_dice(reg.warp_labels(label, moved, fixed, transform), label) >= 0.95


def test_register_is_repeatable_with_one_thread(mr_volume):
  image, label, affine = mr_volume
  moved = _known_affine() @ affine
  fixed, moving = reg.to_image(image, affine), reg.to_image(image, moved)
  settings = reg.Settings(init="body_centre", **FAST)
  first, second = (reg.warp_labels(label, moved, fixed, reg.register(fixed, moving, settings))
                   for _ in range(2))
  np.testing.assert_array_equal(first, second)


def test_majority_vote_counts_per_voxel_and_breaks_ties_towards_the_lower_label():
  a = np.array([[1, 2, 0, 3]], np.uint8)
  b = np.array([[1, 2, 2, 4]], np.uint8)
  c = np.array([[2, 2, 2, 0]], np.uint8)
  np.testing.assert_array_equal(reg.majority_vote([a, b, c], 5), [[1, 2, 2, 0]])
  np.testing.assert_array_equal(reg.majority_vote([a, b], 5), [[1, 2, 0, 3]])
  with pytest.raises(ValueError, match="shape"):
    reg.majority_vote([a, a[:, :2]], 5)


def test_an_unknown_start_names_its_key(mr_volume):
  image, _, affine = mr_volume
  fixed = reg.to_image(image, affine)
  with pytest.raises(ValueError, match="baseline.init"):
    reg.initial_transform(fixed, fixed, "moments")
