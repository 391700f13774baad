"""Tests of the geometry layer: reorientation, in-plane resampling, the way back, body crop.

  python -m pytest -q tests/data/test_geometry.py
"""

import itertools
import json

import nibabel as nib
import numpy as np
import pytest
import scipy.ndimage as ndi

from unpaired_seg.data import dataset
from unpaired_seg.data import geometry

# A canonical (RAS) grid with distinct spacings and an origin off zero.
RAS_AFFINE = np.array([[1.25, 0., 0., -40.],
                       [0., 2.0, 0., 12.],
                       [0., 0., 7.7, -90.],
                       [0., 0., 0., 1.]])
RAS_SHAPE = (7, 5, 4)


def _on_disk(canonical, affine, perm, flips):
  """The same voxels stored with disk axis k = canonical axis perm[k], reversed where flipped.

  Written out by hand (transpose, flip, and the index map as a matrix) rather than with nibabel's
  orientation helpers, which the implementation uses.
  """
  disk = np.transpose(canonical, perm)
  for k, flip in enumerate(flips):
    if flip:
      disk = np.flip(disk, axis=k)
  # Canonical index c from disk index d: c[perm[k]] = d[k], or n - 1 - d[k] when flipped.
  index_map = np.zeros((4, 4))
  index_map[3, 3] = 1.0
  for k, (axis, flip) in enumerate(zip(perm, flips)):
    n = canonical.shape[axis]
    index_map[axis, k] = -1.0 if flip else 1.0
    index_map[axis, 3] = n - 1 if flip else 0.0
  return np.ascontiguousarray(disk), affine @ index_map


def _world(affine, index):
  return (affine @ np.append(np.asarray(index, float), 1.0))[:3]


ORIENTATIONS = [(perm, flips) for perm in itertools.permutations(range(3))
                for flips in itertools.product((False, True), repeat=3)]


@pytest.mark.parametrize("perm,flips", ORIENTATIONS)
def test_to_canonical_undoes_any_axis_order_and_flip(perm, flips):
  canonical = np.arange(np.prod(RAS_SHAPE), dtype=np.int32).reshape(RAS_SHAPE)
  disk, disk_affine = _on_disk(canonical, RAS_AFFINE, perm, flips)

  array, affine, ornt = geometry.to_canonical(disk, disk_affine)

  np.testing.assert_array_equal(array, canonical)
  np.testing.assert_allclose(affine, RAS_AFFINE, atol=1e-12)
  assert nib.aff2axcodes(affine) == ("R", "A", "S")
  # Same world position for the same voxel value, looked up independently in both arrays.
  for value in (0, 17, 93, canonical.size - 1):
    d = np.argwhere(disk == value)[0]
    c = np.argwhere(array == value)[0]
    np.testing.assert_allclose(_world(disk_affine, d), _world(affine, c), atol=1e-9)
  # And back exactly.
  record = geometry.GeometryRecord(
      source_shape=disk.shape, source_affine=tuple(map(tuple, disk_affine)),
      orientation=tuple(map(tuple, ornt)), canonical_shape=array.shape,
      canonical_affine=tuple(map(tuple, affine)), zoom=(1.0, 1.0, 1.0),
      resampled_shape=array.shape, resampled_affine=tuple(map(tuple, affine)))
  np.testing.assert_array_equal(geometry.from_canonical(array, record), disk)


def test_lps_volume_written_to_disk_reads_back_canonical(tmp_path):
  """An LPS file (as the CT set is stored) gives the RAS array and the same world positions."""
  canonical = np.random.default_rng(0).integers(0, 200, RAS_SHAPE).astype(np.int16)
  disk, disk_affine = _on_disk(canonical, RAS_AFFINE, (0, 1, 2), (True, True, False))
  path = tmp_path / "lps.nii.gz"
  dataset.save_nifti(path, disk, disk_affine)
  img = nib.load(str(path))
  assert nib.aff2axcodes(img.affine) == ("L", "P", "S")

  array, affine, _ = geometry.to_canonical(np.asarray(img.dataobj), img.affine)

  np.testing.assert_array_equal(array, canonical)
  np.testing.assert_allclose(affine, RAS_AFFINE, atol=1e-5)   # float32 in the header
  # The first stored voxel is the last canonical one along x and y.
  np.testing.assert_allclose(_world(img.affine, (0, 0, 0)), _world(affine, (6, 4, 0)), atol=1e-4)


def test_to_canonical_keeps_trailing_axes():
  canonical = np.arange(np.prod(RAS_SHAPE) * 2).reshape(RAS_SHAPE + (2,))
  disk, disk_affine = _on_disk(canonical[..., 0], RAS_AFFINE, (2, 0, 1), (True, False, True))
  disk_two = np.stack([_on_disk(canonical[..., i], RAS_AFFINE, (2, 0, 1),
                                (True, False, True))[0] for i in range(2)], axis=-1)
  array, _, _ = geometry.to_canonical(disk_two, disk_affine)
  np.testing.assert_array_equal(array, canonical)


def _linear_image(shape, affine, weights=(1.0, 0.5, 0.25)):
  """Intensity = a linear function of world position: linear interpolation must reproduce it."""
  index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
  world = index @ affine[:3, :3].T + affine[:3, 3]
  return world @ np.asarray(weights)


def test_model_grid_affine_maps_voxel_centres_to_their_world_positions():
  # Stored as L, I, P (axes 0, 1, 2): the canonical order is x, y <- axis 2, z <- axis 1.
  affine = np.array([[-1.25, 0., 0., 100.],
                     [0., 0., -2.0, 30.],
                     [0., 7.7, 0., -50.],
                     [0., 0., 0., 1.]])
  shape = (40, 9, 30)
  image = _linear_image(shape, affine)

  model_image, _, model_affine, record = geometry.to_model_grid(image, None, affine, (1.5, 1.5))

  assert nib.aff2axcodes(model_affine) == ("R", "A", "S")
  assert record.canonical_shape == (40, 30, 9)
  # Exactly the target spacing in-plane; the slice axis (7.7 mm) untouched.
  np.testing.assert_allclose(geometry.spacing_of(model_affine), (1.5, 1.5, 7.7), rtol=1e-12)
  assert model_image.shape == (round(40 * 1.25 / 1.5), round(30 * 2.0 / 1.5), 9) == (33, 40, 9)
  # Same grid centre in the world.
  centre = lambda a, s: _world(a, (np.asarray(s) - 1) / 2)  # noqa: E731
  np.testing.assert_allclose(centre(model_affine, model_image.shape), centre(affine, shape),
                             atol=1e-9)
  # A few voxels well inside the grid (the edges repeat the border voxel instead).
  for index in [(5, 5, 0), (16, 20, 4), (27, 33, 8), (10, 31, 2)]:
    expected = _world(model_affine, index) @ np.array([1.0, 0.5, 0.25])
    assert model_image[index] == pytest.approx(expected, abs=1e-3)
  np.testing.assert_allclose(np.asarray(record.resampled_affine), model_affine)


def test_resample_inplane_hand_computed():
  # 6 voxels of 1 mm -> 1.5 mm: round(6 / 1.5) = 4 voxels, centres aligned, so new voxel j sits at
  # old coordinate 2.5 + (j - 1.5) * 1.5 = 0.25, 1.75, 3.25, 4.75.
  image = np.array([0., 10., 20., 30., 40., 50.]).reshape(6, 1, 1)
  label = np.array([0, 0, 1, 1, 2, 2], np.uint8).reshape(6, 1, 1)
  out = geometry.resample_inplane(image, (1.0, 1.0, 3.0), (1.5, 1.0), is_label=False)
  np.testing.assert_allclose(out.ravel(), [2.5, 17.5, 32.5, 47.5], atol=1e-5)
  assert out.dtype == np.float32
  out = geometry.resample_inplane(label, (1.0, 1.0, 3.0), (1.5, 1.0), is_label=True)
  # Nearest old voxel of 0.25, 1.75, 3.25, 4.75: 0, 2, 3, 5.
  np.testing.assert_array_equal(out.ravel(), [0, 1, 1, 2])
  assert out.dtype == np.uint8
  # Same spacing: the array itself.
  np.testing.assert_array_equal(
      geometry.resample_inplane(image, (1.0, 1.0, 3.0), (1.0, 1.0), is_label=False), image)
  np.testing.assert_array_equal(
      geometry.resample_inplane(image, (1.0, 1.0, 3.0), None, is_label=False), image)


def _blobs(shape, sigma, seed):
  """Smooth random blobs, three labels."""
  field = ndi.gaussian_filter(np.random.default_rng(seed).normal(size=shape), sigma)
  field /= field.std()
  return np.digitize(field, [-0.3, 0.6]).astype(np.uint8)


def _dice(a, b):
  return 2.0 * np.sum(a & b) / (np.sum(a) + np.sum(b))


@pytest.mark.parametrize("perm,flips", [((0, 1, 2), (True, True, False)),
                                        ((1, 2, 0), (False, True, True))])
def test_round_trip_is_exact_at_source_spacing(perm, flips):
  canonical = _blobs((30, 26, 5), (4, 4, 0), seed=1)
  label, affine = _on_disk(canonical, RAS_AFFINE, perm, flips)
  image = label.astype(np.float32) * 10
  _, model_label, _, record = geometry.to_model_grid(image, label, affine, (1.25, 2.0))
  np.testing.assert_array_equal(model_label, canonical)
  back = geometry.to_source_grid(model_label, record)
  assert back.shape == label.shape and back.dtype == label.dtype
  np.testing.assert_array_equal(back, label)


def _organs(shape):
  """Two organ-sized ellipses (radii 18-31 voxels) that change a little from slice to slice."""
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  label = np.zeros(shape, np.uint8)
  for z in range(shape[2]):
    grow = 1.0 + 0.1 * z
    label[((yy - 44) / (28 * grow)) ** 2 + ((xx - 36) / (20 * grow)) ** 2 <= 1, z] = 1
    label[((yy - 88) / 24) ** 2 + ((xx - 72) / (18 * grow)) ** 2 <= 1, z] = 2
  return label


@pytest.mark.parametrize("target,min_dice", [((2.0, 2.0), 0.97), ((1.3, 0.7), 0.98),
                                             ((0.5, 0.5), 1.0)])
def test_round_trip_after_zoom_keeps_organs(target, min_dice):
  affine = np.diag([1.0, 1.0, 3.0, 1.0])
  affine[:3, 3] = (5.0, -7.0, 2.0)
  label = _organs((120, 100, 3))
  # Stored as LPS, as the CT files are.
  label_lps, affine_lps = _on_disk(label, affine, (0, 1, 2), (True, True, False))
  _, model_label, model_affine, record = geometry.to_model_grid(label_lps * 1.0, label_lps,
                                                                affine_lps, target)
  np.testing.assert_allclose(geometry.spacing_of(model_affine)[:2], target, rtol=1e-12)
  back = geometry.to_source_grid(model_label, record)
  assert back.shape == label_lps.shape
  for value in (1, 2):
    assert _dice(back == value, label_lps == value) >= min_dice
  if target == (0.5, 0.5):
    # Nearest up by exactly 2, then down by 2, picks the same voxels again.
    np.testing.assert_array_equal(back, label_lps)


def test_record_json_round_trip_and_errors():
  rng = np.random.default_rng(3)
  label = rng.integers(0, 3, (11, 9, 4)).astype(np.uint8)
  affine = np.array([[-0.8, 0.01, 0., 3.3], [0., -0.8, 0., 1.1], [0., 0., 2.5, -4.], [0, 0, 0, 1]])
  _, _, _, record = geometry.to_model_grid(label * 1.0, label, affine, (1.1, 1.7))
  again = geometry.GeometryRecord.from_dict(json.loads(json.dumps(record.to_dict())))
  assert again == record
  broken = record.to_dict()
  broken["canonical_shape"] = [9, 11, 4]
  with pytest.raises(geometry.GeometryError, match="case.json.*canonical_shape"):
    geometry.GeometryRecord.from_dict(broken, where="case.json")
  broken = record.to_dict()
  del broken["zoom"]
  with pytest.raises(geometry.GeometryError, match="case.json.*zoom"):
    geometry.GeometryRecord.from_dict(broken, where="case.json")
  with pytest.raises(geometry.GeometryError, match="label_on_model_grid"):
    geometry.to_source_grid(np.zeros((3, 3, 3), np.uint8), record)


def test_bad_arguments_name_themselves():
  with pytest.raises(geometry.GeometryError, match="'affine'"):
    geometry.to_canonical(np.zeros((2, 2, 2)), np.zeros((4, 4)))
  with pytest.raises(geometry.GeometryError, match="'target_spacing'"):
    geometry.resample_inplane(np.zeros((2, 2, 2)), (1, 1, 1), (0.0, 1.0), is_label=False)
  with pytest.raises(geometry.GeometryError, match="'label'"):
    geometry.to_model_grid(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)), np.eye(4), None)
  with pytest.raises(geometry.GeometryError, match="'size'"):
    geometry.body_crop_box(np.zeros((4, 4)), (0, 2))


def test_otsu_threshold_splits_two_levels():
  assert 0.0 <= geometry.otsu_threshold([0, 0, 0, 10, 10]) < 10.0
  values = np.r_[np.full(900, 5.0), np.full(100, 200.0)]
  t = geometry.otsu_threshold(values)
  assert 5.0 <= t < 200.0 and np.sum(values > t) == 100


def _body(shape, centre, radius, seed=0):
  """Noisy background, a bright disc (the body) in every slice."""
  rng = np.random.default_rng(seed)
  image = rng.normal(0.0, 5.0, shape)
  yy, xx = np.mgrid[:shape[0], :shape[1]]
  image[(yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius ** 2] += 100.0
  return image


def test_body_crop_box_centres_a_shifted_body():
  image = _body((80, 70, 5), centre=(50, 24), radius=12)
  box = geometry.body_crop_box(image, (40, 30))
  assert [b.stop - b.start for b in box] == [40, 30]
  for b, c in zip(box, (50, 24)):
    assert abs((b.start + b.stop - 1) / 2 - c) <= 0.5
  cropped = geometry.apply_box(image, box, (40, 30))
  assert np.sum(cropped > 50) == np.sum(image > 50)   # the whole body is inside
  # Same answer with an explicit threshold and for a 2D image.
  assert geometry.body_crop_box(image, (40, 30), threshold=50.0) == box
  assert geometry.body_crop_box(image[..., 0], (40, 30)) == box


def test_body_crop_box_clips_inside_and_pads_past_small_images():
  image = _body((60, 60, 2), centre=(5, 55), radius=4)
  box = geometry.body_crop_box(image, (30, 30))
  assert box == (slice(0, 30), slice(30, 60))   # shifted inside, body near the corner
  box = geometry.body_crop_box(image, (80, 30))
  assert box[0].stop - box[0].start == 80 and box[0].start <= 0 and box[0].stop >= 60
  empty = np.zeros((20, 10, 2))
  assert geometry.body_crop_box(empty, (10, 4)) == (slice(5, 15), slice(3, 7))


@pytest.mark.parametrize("box", [(slice(3, 13), slice(2, 8)),
                                 (slice(-4, 6), slice(5, 11)),
                                 (slice(-3, 19), slice(-1, 13))])
def test_invert_box_restores_the_array_inside_the_box(box):
  array = np.arange(16 * 10 * 2).reshape(16, 10, 2) + 1
  size = tuple(b.stop - b.start for b in box)
  cut = geometry.apply_box(array, box, size, pad_value=-7)
  assert cut.shape == size + (2,) and cut.dtype == array.dtype
  # Padded where the box leaves the array, the array's values elsewhere (checked pixel by pixel).
  for i, j in itertools.product(range(size[0]), range(size[1])):
    y, x = box[0].start + i, box[1].start + j
    inside = 0 <= y < 16 and 0 <= x < 10
    np.testing.assert_array_equal(cut[i, j], array[y, x] if inside else [-7, -7])
  back = geometry.invert_box(cut, box, array.shape)
  assert back.shape == array.shape
  inside = np.zeros(array.shape[:2], bool)
  inside[max(box[0].start, 0):box[0].stop, max(box[1].start, 0):box[1].stop] = True
  np.testing.assert_array_equal(back[inside], array[inside])
  assert np.all(back[~inside] == 0)
  with pytest.raises(geometry.GeometryError, match="'size'"):
    geometry.apply_box(array, box, (size[0] + 1, size[1]))


def test_reverse_axis_directions_mirrors_in_world_space_on_the_same_voxel_centres():
  affine = np.array([[-0.8, 0.05, 0., 4.], [0.02, -0.7, 0.1, 6.], [0., 0., 3.0, 1.], [0, 0, 0, 1]])
  shape = (5, 7, 3)
  fixed = geometry.reverse_axis_directions(affine, shape, [1])
  # Voxel (i, j, k) now lies where (i, n_j - 1 - j, k) lay.
  for i, j, k in itertools.product(range(5), range(7), range(3)):
    np.testing.assert_allclose(fixed @ np.r_[i, j, k, 1], affine @ np.r_[i, 6 - j, k, 1],
                               atol=1e-12)
  assert nib.aff2axcodes(affine) == ("L", "P", "S") and nib.aff2axcodes(fixed) == ("L", "A", "S")
  # Twice is the identity; no axes is a copy; two axes at once equal one after the other.
  np.testing.assert_allclose(geometry.reverse_axis_directions(fixed, shape, (1,)), affine,
                             atol=1e-12)
  same = geometry.reverse_axis_directions(affine, shape, ())
  assert np.array_equal(same, affine) and same is not affine
  np.testing.assert_allclose(
      geometry.reverse_axis_directions(affine, shape, (2, 0)),
      geometry.reverse_axis_directions(geometry.reverse_axis_directions(affine, shape, (0,)),
                                       shape, (2,)), atol=1e-12)


@pytest.mark.parametrize("axes", [[3], [1, 1], "1", [True], [-1], None])
def test_reverse_axis_directions_rejects_bad_axes(axes):
  with pytest.raises(geometry.GeometryError, match="'axes'"):
    geometry.reverse_axis_directions(np.eye(4), (2, 2, 2), axes)


def test_check_axes_sorts_and_names_the_argument():
  assert geometry.check_axes([2, 0]) == (0, 2)
  assert geometry.check_axes(np.array([1])) == (1,)
  with pytest.raises(geometry.GeometryError, match="'source_axis_flips'"):
    geometry.check_axes([0, 0], "source_axis_flips")
  with pytest.raises(geometry.GeometryError, match="'shape'"):
    geometry.reverse_axis_directions(np.eye(4), (2, 0, 2), [0])
