"""jaxquant: quantization research toolkit for JAX/Flax.

The curated public API; everything else is internal.
"""
from jaxquant.spec import DotSpec, QuantSpec, Rule

__all__ = ["QuantSpec", "DotSpec", "Rule"]
__version__ = "0.1.0"
