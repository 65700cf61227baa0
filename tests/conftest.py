"""Test-wide setup: 8 host devices for sharding tests (set before jax is imported),
strict rank promotion so silent broadcasting bugs fail loudly."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
