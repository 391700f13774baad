"""Atomic writes of the files a run keeps: a reader never sees half a file."""

import json
import os
import pathlib
import tempfile


def write_text_atomic(path: os.PathLike, text: str | bytes) -> None:
  """Writes `text` (or bytes) to a temporary file beside `path`, then renames it: never half a file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
      f.write(text)
    os.chmod(tmp, 0o644)   # mkstemp makes 0600; results are for others to read too
    os.replace(tmp, path)
  except BaseException:
    pathlib.Path(tmp).unlink(missing_ok=True)
    raise


def write_json_atomic(path: os.PathLike, obj) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))
