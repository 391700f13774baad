"""On-device augmentation: identity at zero strength, labels stay labels, image and label move together."""

import jax
import jax.numpy as jnp
import numpy as np

from unpaired_seg.data import augment


def _batch():
  image = np.zeros((2, 16, 16, 1), np.float32)
  label = np.zeros((2, 16, 16), np.int32)
  image[:, 4:10, 3:8, 0] = 1.0
  label[:, 4:10, 3:8] = 3
  label[:, 11:14, 10:13] = 1
  image[:, 11:14, 10:13, 0] = 0.5
  return jnp.asarray(image), jnp.asarray(label)


def test_zero_strength_is_identity():
  image, label = _batch()
  out_i, out_l = augment.augment_batch(jax.random.key(0), image, label, rotate_deg=0.0,
                                       scale=(1.0, 1.0), flip=False)
  np.testing.assert_allclose(out_i, image, atol=1e-5)
  np.testing.assert_array_equal(out_l, label)


def _warp_nearest(label, coords):
  return np.asarray(jax.scipy.ndimage.map_coordinates(
      jnp.asarray(label, jnp.float32), [coords[..., 0], coords[..., 1]], order=0, mode="nearest"))


def test_quarter_turns_and_mirror_match_numpy():
  _, label = _batch()
  label = np.asarray(label[0])
  quarter = _warp_nearest(label, augment.affine_coords(16, 16, jnp.pi / 2, 1.0, 1.0))
  assert any(np.array_equal(quarter, np.rot90(label, k)) for k in (1, -1))
  half = _warp_nearest(label, augment.affine_coords(16, 16, jnp.pi, 1.0, 1.0))
  np.testing.assert_array_equal(half, np.rot90(label, 2))
  mirrored = _warp_nearest(label, augment.affine_coords(16, 16, 0.0, 1.0, -1.0))
  np.testing.assert_array_equal(mirrored, label[:, ::-1])


def test_zoom_by_two_doubles_the_area():
  label = np.zeros((32, 32), np.int32)
  label[12:20, 12:20] = 1                                          # 64 pixels about the centre
  zoomed = _warp_nearest(label, augment.affine_coords(32, 32, 0.0, 2.0, 1.0))
  assert abs(int(zoomed.sum()) - 256) <= 36


def test_labels_remain_labels_and_follow_the_image():
  image, label = _batch()
  out_i, out_l = augment.augment_batch(jax.random.key(3), image, label, rotate_deg=20.0,
                                       scale=(0.8, 1.2), flip=True)
  assert out_l.dtype == label.dtype and out_i.shape == image.shape
  assert set(np.unique(np.asarray(out_l))) <= {0, 1, 3}
  # Where the label is 3 the image is (close to) 1, where the label is 1 it is (close to) 0.5.
  inside = np.asarray(out_i[..., 0])[np.asarray(out_l) == 3]
  assert inside.size > 0 and np.median(inside) > 0.9
  # Different samples get different transforms.
  assert not np.array_equal(np.asarray(out_l[0]), np.asarray(out_l[1]))


def test_flip_mirrors_columns():
  # With no rotation or scaling the only randomness is the flip; over several keys both occur.
  image, label = _batch()
  seen = set()
  for seed in range(8):
    _, out_l = augment.augment_batch(jax.random.key(seed), image, label, rotate_deg=0.0,
                                     scale=(1.0, 1.0), flip=True)
    for b in range(2):
      got = np.asarray(out_l[b])
      if np.array_equal(got, np.asarray(label[b])):
        seen.add("same")
      elif np.array_equal(got, np.asarray(label[b])[:, ::-1]):
        seen.add("mirrored")
      else:
        seen.add("other")
  assert seen == {"same", "mirrored"}


def test_partners_move_with_their_own_slices_transform():
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.normal(size=(3, 16, 16, 1)), jnp.float32)
  label = jnp.asarray(rng.integers(0, 3, (3, 16, 16)), jnp.int32)
  # Candidate 0 of each slice is the slice itself, candidate 1 another image.
  other = jnp.asarray(rng.normal(size=(3, 16, 16, 1)), jnp.float32)
  partners = jnp.stack([image, other], axis=1)                       # [B, k=2, H, W, C]
  settings = dict(rotate_deg=30.0, scale=(0.8, 1.2), flip=True)
  key = jax.random.key(5)
  moved, _ = augment.augment_batch(key, image, label, **settings)
  moved_partners = augment.augment_partners(key, partners, **settings)
  assert moved_partners.shape == partners.shape
  np.testing.assert_allclose(moved_partners[:, 0], moved, atol=1e-6)
  other_moved, _ = augment.augment_batch(key, other, label, **settings)
  np.testing.assert_allclose(moved_partners[:, 1], other_moved, atol=1e-6)
  assert not np.allclose(moved, image, atol=1e-3)                     # something did move
