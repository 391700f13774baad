"""Loads a script under experiments/ as a module (the scripts are not a package)."""

import importlib.util
import pathlib
import types

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


def load(name: str) -> types.ModuleType:
  """experiments/<name>.py as a module; the scripts define their flags only when they run."""
  spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
