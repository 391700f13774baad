"""Test-wide set-up: two virtual CPU devices so the sharded code paths run on a laptop."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per pytest run: tests that build the same step again (a new
# jitted closure of the same program) load it instead of compiling it a second time.
import tempfile  # noqa: E402
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="unpaired_seg_jax_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def abdomen_root():
  """The real abdominal CT/MR data beside the checkout; tests that need it skip without it."""
  root = SHARED_DATA / "abdomen_ctmr"
  if not (root / "mr").is_dir() or not (root / "ct").is_dir():
    pytest.skip(f"real abdominal data not found at {root}")
  return root
