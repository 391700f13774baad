"""Lazily read cases (`arrays`, `lazy_cases`): bit-identical to the in-memory path, bounded, cached.

  python -m pytest -q tests/data/test_lazy.py
"""

import json
import pathlib
import shutil

import numpy as np
import pytest

from configs import common
from unpaired_seg.data import arrays
from unpaired_seg.data import dataset as ds
from unpaired_seg.data import lazy_cases
from unpaired_seg.data import loader
from unpaired_seg.data import patches
from unpaired_seg.data import phantom
from unpaired_seg.data import pipeline

ARRAY_FIELDS = ("image", "label", "grid_image", "grid_label", "affine")
PLAIN_FIELDS = ("modality", "case", "subject", "spacing", "box", "record", "image_path", "source",
                "num_slices")


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("lazy") / "phantom"
  phantom.generate(root, num_subjects=4, shape=(24, 24, 12), seed=1)
  return root


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("UNPAIRED_SEG_CACHE", str(tmp_path / "cache"))
  lazy_cases.OPEN.clear()
  return tmp_path / "cache"


def _config(root, **data):
  config = common.get_base_config(tiny=True)
  config.data.dataset = "folder"
  config.data.root = str(root)
  config.data.split = {"train": 0.5, "val": 0.25, "test": 0.25}
  for key, value in data.items():
    config.data[key] = value
  return config


def _snapshot(root: pathlib.Path):
  return sorted((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*"))


def _assert_same_data(memory, lazy, steps=6):
  """Every case's arrays and attributes, the samplers' indices and their batches: bit for bit."""
  for part, by_modality in memory.cases.items():
    for m, cases in by_modality.items():
      assert len(cases) == len(lazy.cases[part][m])
      for a, b in zip(cases, lazy.cases[part][m]):
        assert isinstance(b, lazy_cases.LazyCase)
        for f in ARRAY_FIELDS:
          x, y = getattr(a, f), getattr(b, f)
          assert (x is None) == (y is None), (part, m, a.case, f)
          if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, (part, m, a.case, f)
            np.testing.assert_array_equal(x, y, err_msg=f"{part} {m} {a.case} {f}")
        for f in PLAIN_FIELDS:
          assert getattr(a, f) == getattr(b, f), (part, m, a.case, f)
  for m, s in memory.samplers.items():
    t = lazy.samplers[m]
    np.testing.assert_array_equal(s.all_slices, t.all_slices)
    np.testing.assert_array_equal(s.fg_slices, t.fg_slices)
    assert list(s.class_slices) == list(t.class_slices)
    for k in s.class_slices:
      np.testing.assert_array_equal(s.class_slices[k], t.class_slices[k])
  for step in range(steps):
    for rows in (None, slice(1, 3)):
      for m, s in memory.samplers.items():
        x, y = s.batch(step, rows), lazy.samplers[m].batch(step, rows)
        assert sorted(x) == sorted(y)
        for k in x:
          assert type(x[k]) is type(y[k]) and x[k].dtype == y[k].dtype, (m, k)
          np.testing.assert_array_equal(x[k], y[k], err_msg=f"{m} step {step} {k}")


@pytest.mark.parametrize("data", [
    {},
    {"oversample": "class", "context_slices": 1, "normalization": "mr=dataset_zscore,ct=foreground_zscore"},
    {"target_modality": "ct", "label_fraction": 0.5, "crop": "centre", "image_size": (16, 16)},
], ids=["default", "class_context_fitted", "semi_centre_small"])
def test_lazy_cases_and_batches_equal_the_in_memory_path(phantom_root, tmp_path, data):
  config = _config(phantom_root, **data)
  memory = loader.load_data(config, tmp_path / "memory", lazy=False)
  lazy = loader.load_data(config, tmp_path / "lazy")
  for name in ("splits.json", "normalization.json", "model_info.json"):
    assert (tmp_path / "memory" / name).read_text() == (tmp_path / "lazy" / name).read_text()
  _assert_same_data(memory, lazy)
  for m in memory.modalities:
    assert (pipeline.view_coverage(memory.cases["train"][m], memory.class_names)
            == pipeline.view_coverage(lazy.cases["train"][m], lazy.class_names))
  # A second run reuses the prepared arrays: nothing is written, and loading opens no array (the
  # samplers' indices and the view coverage come from each case's JSON).
  before = _snapshot(loader.default_cache_dir())
  lazy_cases.OPEN.clear()
  again = loader.load_data(config, tmp_path / "lazy")
  assert len(lazy_cases.OPEN) == 0
  assert _snapshot(loader.default_cache_dir()) == before
  _assert_same_data(memory, again, steps=2)
  # The 3D patch sampler reads the same patches from either.
  for oversample in ("foreground", "class"):
    p, q = (patches.PatchSampler(d.cases["train"]["mr"], 3, (8, 8, 4), 0.7, seed=0, stream=0,
                                 oversample=oversample) for d in (memory, lazy))
    for step in range(3):
      for k, v in p.batch(step).items():
        np.testing.assert_array_equal(v, q.batch(step)[k])


def test_the_phantom_carries_arrays_equal_to_its_decoded_files(phantom_root, cache):
  manifest = ds.load_manifest(phantom_root)
  store = arrays.VolumeStore(manifest, cache)
  for m in manifest.modalities:
    for volume, decoded in zip(store.modality(m), ds.load_modality(manifest, m)):
      assert volume.folder == phantom_root / arrays.ARRAYS_DIR
      assert (volume.case, volume.subject) == (decoded.case, decoded.subject)
      for f in ("image", "label", "affine"):
        x, y = getattr(decoded, f), getattr(volume, f)
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)
  assert not store.cache.exists()        # nothing had to be decoded into the cache


def test_a_dataset_without_arrays_is_decoded_into_the_cache_never_into_itself(
    phantom_root, tmp_path, cache, caplog):
  root = tmp_path / "plain"
  shutil.copytree(phantom_root, root, ignore=shutil.ignore_patterns(arrays.ARRAYS_DIR))
  config = _config(root)
  before = _snapshot(root)
  lazy = loader.load_data(config, tmp_path / "lazy")
  assert _snapshot(root) == before
  entry = arrays.cache_entry(cache, root)
  assert sorted(p.name for p in (entry / arrays.ARRAYS_DIR / "ct").glob("*.json"))
  _assert_same_data(loader.load_data(config, tmp_path / "memory", lazy=False), lazy, steps=2)

  # A changed file is decoded again; an all-background label still warns on every load.
  case = ds.list_cases(ds.load_manifest(root), "ct")[0]
  label_path = root / "ct" / ds.LABELS_DIR / f"{case}.nii.gz"
  ds.save_nifti(label_path, np.zeros(lazy.cases["train"]["ct"][0].grid_label.shape, np.uint8),
                np.asarray(ds.load_volume(ds.load_manifest(root), "ct", case).affine))
  for run in ("changed", "again"):
    caplog.clear()
    with caplog.at_level("WARNING"):
      data = loader.load_data(config, tmp_path / run)
    assert f"{label_path}: the label of case '{case}' holds background only" in caplog.text
    volume = arrays.VolumeStore(data.manifest, cache).volume("ct", case)
    assert not volume.label.any()
  # A label that went missing fails as the in-memory path does.
  label_path.unlink()
  with pytest.raises(ds.DatasetError, match="label file of case"):
    loader.load_data(config, tmp_path / "missing")


def test_changed_files_of_a_dataset_with_arrays_are_decoded_into_the_cache(
    phantom_root, tmp_path, cache):
  root = tmp_path / "copy"
  shutil.copytree(phantom_root, root)
  manifest = ds.load_manifest(root)
  case = ds.list_cases(manifest, "mr")[1]
  volume = ds.load_volume(manifest, "mr", case)
  ds.save_nifti(root / "mr" / ds.IMAGES_DIR / f"{case}.nii.gz", volume.image + 7, volume.affine)
  own = _snapshot(root / arrays.ARRAYS_DIR)
  store = arrays.VolumeStore(manifest, cache)
  lazy = {v.case: v for v in store.modality("mr")}
  assert lazy[case].folder == store.cache
  np.testing.assert_array_equal(lazy[case].image, volume.image + 7)
  assert all(v.folder == root / arrays.ARRAYS_DIR for c, v in lazy.items() if c != case)
  assert _snapshot(root / arrays.ARRAYS_DIR) == own


def test_open_arrays_are_bounded_plain_read_only_views(tmp_path):
  volume = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
  paths = []
  for i in range(6):
    paths.append(tmp_path / f"{i}.npy")
    arrays.save_array(paths[-1], (volume + i).transpose(2, 0, 1))
  opened = lazy_cases.OpenArrays(max_bytes=2 * volume.nbytes)
  for i, path in enumerate(paths):
    a = opened.get(path, "v1", slice_major=True)
    assert type(a) is np.ndarray and not a.flags.writeable
    np.testing.assert_array_equal(a, volume + i)
    assert len(opened) <= 2
  assert opened.get(paths[-1], "v1", True) is opened.get(paths[-1], "v1", True)
  arrays.save_array(paths[-1], volume.transpose(2, 0, 1))   # new content, a new token
  np.testing.assert_array_equal(opened.get(paths[-1], "v2", True), volume)
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_missing_array_is_an_error_naming_it(tmp_path):
  with pytest.raises(ds.DatasetError, match=f"{tmp_path / 'gone.npy'}: array not found"):
    arrays.open_array(tmp_path / "gone.npy")


def test_the_cache_forgets_datasets_that_are_gone_and_must_be_writable(phantom_root, tmp_path):
  gone = tmp_path / "gone"
  shutil.copytree(phantom_root, gone)
  cache = tmp_path / "cache"
  arrays.VolumeStore(ds.load_manifest(gone), cache)
  kept = arrays.VolumeStore(ds.load_manifest(phantom_root), cache).entry
  shutil.rmtree(gone)
  arrays.prune_cache(cache)
  assert not arrays.cache_entry(cache, gone).exists() and kept.is_dir()
  assert json.loads((kept / arrays.SOURCE_FILE).read_text()) == {"root": str(phantom_root)}
  blocked = tmp_path / "file"
  blocked.write_text("")
  with pytest.raises(ds.DatasetError, match="UNPAIRED_SEG_CACHE"):
    arrays.VolumeStore(ds.load_manifest(phantom_root), blocked)
