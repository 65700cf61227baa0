"""Test-wide setup: 8 host devices for sharding tests (set before jax is imported), a
session-wide XLA compilation cache, strict rank promotion so silent broadcasting bugs
fail loudly, and the heavy files scheduled first."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  # One persistent XLA compilation cache per test session, in a fresh temp dir removed at
  # exit: the many identical programs (the same tiny training step built again by each
  # end-to-end test, in this process and in the trainer subprocesses, which inherit the
  # variable; xdist workers inherit the controller's dir) compile once. A cache hit is
  # the executable the same compile produced, so results are unchanged; only compiles
  # over JAX's default 1 s are stored. Tests that need cold compiles drop the variable.
  _XLA_CACHE = tempfile.mkdtemp(prefix="jaxquant-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
if os.environ["JAX_PLATFORMS"] != "cpu":
  # The tests compare float32 results with numpy references to float32 rounding; on a
  # GPU, JAX's default float32 matmul precision is TF32 (~1e-3 relative). XLA:CPU
  # always computes float32 dots in full, so this only matters off the CPU.
  jax.config.update("jax_default_matmul_precision", "highest")


def pytest_collection_modifyitems(config, items):
  """Moves the files marked `heavy` (module-level `pytestmark`) to the front, keeping the
  order within each group. Under xdist's `--dist=loadfile` (setup.cfg, with
  `--no-loadscope-reorder`) a worker takes the next whole file when it is free, so the
  long files start first and the short ones fill in at the end: the workers finish
  together instead of one running a long file alone. Deterministic (every worker must
  collect the same order)."""
  del config
  heavy = {item.path for item in items if item.get_closest_marker("heavy")}
  items[:] = sorted(items, key=lambda item: item.path not in heavy)
