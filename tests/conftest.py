"""Test-wide setup: 8 host devices for sharding tests (set before jax is imported),
strict rank promotion so silent broadcasting bugs fail loudly."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
if os.environ["JAX_PLATFORMS"] != "cpu":
  # The tests compare float32 results with numpy references to float32 rounding; on a
  # GPU, JAX's default float32 matmul precision is TF32 (~1e-3 relative). XLA:CPU
  # always computes float32 dots in full, so this only matters off the CPU.
  jax.config.update("jax_default_matmul_precision", "highest")
