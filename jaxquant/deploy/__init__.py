"""Deployment artifacts that run without JAX (see numpy_runtime.py)."""
