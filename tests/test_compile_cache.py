"""The persistent compilation cache: on in the chosen folder, off on request, never fatal."""

import jax
import pytest

from unpaired_seg import compile_cache
from unpaired_seg.data import loader


@pytest.fixture
def restore_jax_cache_settings():
  keys = ("jax_enable_compilation_cache", "jax_compilation_cache_dir",
          "jax_persistent_cache_min_compile_time_secs")
  saved = {k: getattr(jax.config, k) for k in keys}
  yield
  for k, v in saved.items():
    jax.config.update(k, v)


def test_a_folder_turns_the_cache_on_there(tmp_path, restore_jax_cache_settings):
  path = compile_cache.configure(str(tmp_path / "cache"))
  assert path == (tmp_path / "cache").absolute() and path.is_dir()
  assert jax.config.jax_compilation_cache_dir == str(path)
  assert jax.config.jax_enable_compilation_cache
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0


def test_off_turns_it_off(restore_jax_cache_settings):
  assert compile_cache.configure("off") is None
  assert not jax.config.jax_enable_compilation_cache


def test_auto_keeps_a_folder_jax_was_given(tmp_path, restore_jax_cache_settings):
  jax.config.update("jax_compilation_cache_dir", str(tmp_path / "given"))
  path = compile_cache.configure("auto", default=tmp_path / "other")
  assert path == (tmp_path / "given").absolute()


def test_auto_defaults_to_the_user_cache_folder(tmp_path, monkeypatch, restore_jax_cache_settings):
  monkeypatch.setenv("UNPAIRED_SEG_CACHE", str(tmp_path / "user"))
  jax.config.update("jax_compilation_cache_dir", None)
  # The folder the trainer passes (train.setup_workdir).
  default = loader.default_cache_dir() / "jax_compilation_cache"
  path = compile_cache.configure("auto", default=default)
  assert path == tmp_path / "user" / "jax_compilation_cache"


def test_an_unusable_folder_turns_the_cache_off_without_failing(tmp_path,
                                                                restore_jax_cache_settings):
  blocker = tmp_path / "file"
  blocker.write_text("not a folder")
  assert compile_cache.configure(str(blocker / "cache")) is None
  assert not jax.config.jax_enable_compilation_cache
