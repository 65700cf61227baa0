"""Loading a config file (`configs/X.py`) as a module, the way `--config=FILE` does.

Kept free of jax and flax imports, so the sweep launcher (and a SLURM task that only
starts a trainer) stays quick to import.
"""
from __future__ import annotations

import importlib.util
import os
import types


def load_config_module(path: str) -> types.ModuleType:
  """Imports the config file at `path` as a fresh module.

  Raises ValueError when the file does not exist or cannot be loaded as Python.
  """
  if not os.path.isfile(path):
    raise ValueError(f"config file {path!r} not found")
  name = "_jaxquant_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  if spec is None or spec.loader is None:
    raise ValueError(f"cannot load {path!r} as a Python config file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
