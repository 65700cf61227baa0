"""Test-wide setup: 8 host devices for sharding tests (set before jax is imported), XLA's
backend at optimization level 0 unless JAXQUANT_TEST_FULL_OPT=1, a session-wide XLA
compilation cache, strict rank promotion so silent broadcasting bugs fail loudly, and the
heavy files scheduled first."""
import atexit
import os
import shutil
import tempfile

# Compiling dominates the suite: most tests run a program once or a few times on tiny
# arrays. XLA's backend optimization level 0 (LLVM code generation without its
# optimization passes; the optimized HLO, fusion decisions included, is the same: checked
# on a quantized MLP) cuts the default suite's CPU time by about 30%. The programs compute
# the same values, except that without LLVM's passes a multiply and an add in one fused
# loop are rounded separately instead of as one FMA: a float result can differ by an ulp
# (integer results cannot). A test whose claim is bit-equality between two differently
# compiled programs reads FULL_OPT and says what it checks at each level.
# JAXQUANT_TEST_FULL_OPT=1 runs everything at XLA's default level, as a user's program
# compiles (CI runs the suite both ways). Trainer and other subprocesses inherit the
# flags.
FULL_OPT = os.environ.get("JAXQUANT_TEST_FULL_OPT", "0") == "1"
_flags = os.environ.get("XLA_FLAGS", "").split()
if not any(f.startswith("--xla_force_host_platform_device_count") for f in _flags):
  _flags.append("--xla_force_host_platform_device_count=8")
if not FULL_OPT and not any(f.startswith("--xla_backend_optimization_level") for f in _flags):
  _flags.append("--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = " ".join(_flags)

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  # One persistent XLA compilation cache per test session, in a fresh temp dir removed at
  # exit: the many identical programs (the same tiny training step built again by each
  # end-to-end test, in this process and in the trainer subprocesses, which inherit the
  # variable; xdist workers inherit the controller's dir) compile once. A cache hit is
  # the executable the same compile produced, so results are unchanged. Every compile is
  # stored, not only those over JAX's default 1 s: a trainer subprocess compiles many
  # small programs that the previous one already compiled. Tests that need cold compiles
  # drop the variables.
  _XLA_CACHE = tempfile.mkdtemp(prefix="jaxquant-test-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
if os.environ["JAX_PLATFORMS"] != "cpu":
  # The tests compare float32 results with numpy references to float32 rounding; on a
  # GPU, JAX's default float32 matmul precision is TF32 (~1e-3 relative). XLA:CPU
  # always computes float32 dots in full, so this only matters off the CPU.
  jax.config.update("jax_default_matmul_precision", "highest")


def subprocess_xla_flags(device_count=None) -> str:
  """XLA_FLAGS for a subprocess that needs its own host device count (None: XLA's one):
  this session's backend optimization level, so it compiles as this process does and
  the two runs' results can be compared, plus that count."""
  keep = [f for f in _flags if f.startswith("--xla_backend_optimization_level")]
  if device_count is not None:
    keep.append(f"--xla_force_host_platform_device_count={device_count}")
  return " ".join(keep)


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
