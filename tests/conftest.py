"""Test-wide set-up: two virtual CPU devices so the sharded code paths run on a laptop."""

import os

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
