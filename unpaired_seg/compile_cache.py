"""JAX's persistent compilation cache, on by default in the user's cache folder.

A second run of the same config (or a resumed one) loads its compiled steps from disk instead of
compiling them again. `train.compilation_cache` (or the benchmark's `--compilation_cache`) chooses:

  'auto'  a folder JAX was already given (JAX_COMPILATION_CACHE_DIR), else the caller's
          default (the trainer's: $UNPAIRED_SEG_CACHE/jax_compilation_cache, by default under
          ~/.cache/unpaired_seg)
  'off'   no persistent cache
  <path>  that folder

  python -m unpaired_seg.main --config=configs/joint.py:tiny --config.train.compilation_cache=off
"""

import os
import pathlib

import jax
from absl import logging

OFF = ("off", "none", "false", "0")


def configure(setting: str | None = "auto",
              default: os.PathLike | None = None) -> pathlib.Path | None:
  """Turns the cache on in the chosen folder (see the module docstring) or off; returns the folder.

  Every compiled program is kept, however quick its compilation: the trainer's evaluation and
  initialisation programs compile in well under JAX's default threshold of one second but add up.
  An unwritable folder turns the cache off with a warning rather than stopping the run.
  """
  setting = "auto" if setting is None else str(setting).strip()
  if setting.lower() in OFF or setting == "":
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  if setting == "auto":
    path = jax.config.jax_compilation_cache_dir or default
    if path is None:
      raise ValueError("compile_cache.configure('auto') needs a default folder")
  else:
    path = setting
  path = pathlib.Path(path).expanduser().absolute()
  try:
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK):
      raise PermissionError(f"{path} is not writable")
  except OSError as e:
    logging.warning("compilation cache off (config key 'train.compilation_cache'): %s", e)
    jax.config.update("jax_enable_compilation_cache", False)
    return None
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
