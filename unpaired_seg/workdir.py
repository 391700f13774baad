"""The workdir as a run's home: checks before anything is written, the resume's config check, and a
lock that keeps a second run out while the first is alive.

Pure bookkeeping (no JAX): the trainer, `predict` and the experiment drivers share it.
"""

import json
import os
import pathlib
import socket
from collections.abc import Mapping

import ml_collections

from unpaired_seg import config_schema

LOCK_FILE = "run.lock"


class WorkdirError(OSError):
  """The workdir cannot hold a run (a file, not writable) or holds none to evaluate."""


class NoRunError(WorkdirError, FileNotFoundError):
  """The workdir holds no checkpoint to evaluate."""


def check_workdir(workdir: os.PathLike) -> pathlib.Path:
  """Creates the workdir; a one-line WorkdirError when it is a file or cannot be written."""
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise WorkdirError(f"--workdir={workdir}: is a file, not a folder")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f"--workdir={workdir}: cannot be created ({e.strerror})") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise WorkdirError(f"--workdir={workdir}: is not writable")
  return workdir


def _flat(tree: Mapping, prefix: str = "") -> dict:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def changed_keys(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> list[str]:
  """'key (old -> new)' for each key where `config` differs from the config.json of a workdir that
  holds a checkpoint (train.steps exempt); [] when there is nothing to resume."""
  saved_path = workdir / "config.json"
  latest = workdir / "checkpoints" / "latest"
  if not saved_path.exists() or not (latest.is_dir() and any(
      p.name.isdigit() for p in latest.iterdir())):
    return []
  saved = _flat(config_schema.with_added_keys(json.loads(saved_path.read_text())))
  now = _flat(json.loads(json.dumps(config.to_dict())))   # tuples as JSON holds them: lists
  return [f"{k} ({saved.get(k)!r} -> {now.get(k)!r})" for k in sorted(set(saved) | set(now))
          if k != "train.steps" and saved.get(k) != now.get(k)]


class WorkdirLock:
  """`<workdir>/run.lock` holding the owner's host and pid, made atomically (O_EXCL).

  A second run in the same workdir gets a WorkdirError naming the owner; a lock whose process is
  gone (same host, no such pid) is taken over, so a killed run does not block its own resume.
  """

  def __init__(self, workdir: pathlib.Path):
    self.path = pathlib.Path(workdir) / LOCK_FILE
    self.held = False

  def _owner(self):
    try:
      owner = json.loads(self.path.read_text())
      return owner.get("host"), int(owner.get("pid"))
    except (OSError, ValueError, TypeError):
      return None, None

  def acquire(self) -> "WorkdirLock":
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        host, pid = self._owner()
        if host == me["host"] and pid is not None and pid != me["pid"] and not _alive(pid):
          self.path.unlink(missing_ok=True)   # its process is gone: a stale lock
          continue
        if host == me["host"] and pid == me["pid"]:
          self.held = True
          return self
        raise WorkdirError(f"--workdir={self.path.parent}: in use by process {pid} on {host} "
                           f"({self.path}); wait for it, or remove the lock if that run is dead")
      with os.fdopen(fd, "w") as f:
        json.dump(me, f)
      self.held = True
      return self
    raise WorkdirError(f"{self.path}: could not be taken")

  def release(self) -> None:
    if self.held:
      self.path.unlink(missing_ok=True)
      self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # someone else's live process
    return True
  return True
