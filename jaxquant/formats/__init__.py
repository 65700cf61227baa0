"""The format registry: one object per numeric format, the only place formats are named.

`get(name)` gives the `Format` (see `jaxquant.formats.base`) that spec validation
(`jaxquant.spec`), calibration and the codec (`jaxquant.numerics`), the quantizer's clip
mask (`jaxquant.fake_quant`), the observers, the layers, `jq.convert`'s stored form and
the size report ask about a format. Adding a format is one entry in `_ENTRIES` (an
instance of an existing class, or a new `Format` subclass) plus its tests.

Formats: 'int' (2..8-bit or 16-bit integers), 'binary', 'ternary', 'fp8_e4m3',
'fp8_e5m2', and the block formats 'mxfp8', 'mxfp4' (OCP Microscaling v1.0) and 'nvfp4'.
"""
from __future__ import annotations

from typing import Dict, Tuple

import jax.numpy as jnp

from jaxquant.formats.base import Format
from jaxquant.formats.integer import Binary, Int, Ternary
from jaxquant.formats.minifloat import MX, NVFP4, Fp8

_ENTRIES = (
    Int(),
    Binary(),
    Ternary(),
    Fp8("fp8_e4m3", jnp.float8_e4m3fn),
    Fp8("fp8_e5m2", jnp.float8_e5m2),
    MX("mxfp8", jnp.float8_e4m3fn),
    MX("mxfp4", jnp.float4_e2m1fn),
    NVFP4(),
)
_REGISTRY: Dict[str, Format] = {f.name: f for f in _ENTRIES}


def names() -> Tuple[str, ...]:
  """Every registered format name, in registry order."""
  return tuple(_REGISTRY)


def get(name: str) -> Format:
  """The `Format` registered as `name` (KeyError naming the choices otherwise)."""
  try:
    return _REGISTRY[name]
  except (KeyError, TypeError):
    raise KeyError(f"format={name!r} is not registered; choose one of {list(_REGISTRY)}"
                   ) from None


def having(capability: str) -> Tuple[str, ...]:
  """The names of the formats with a capability (a `Format` class attribute that is
  truthy, e.g. 'zero_point', 'stochastic', 'block_size')."""
  return tuple(n for n, f in _REGISTRY.items() if getattr(f, capability))


def either(names_: Tuple[str, ...]) -> str:
  """"format='a' or 'b'"-style text of format names, for error messages."""
  quoted = [repr(n) for n in names_]
  return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def sub_byte_bits() -> Dict[str, int]:
  """{name: bits per value} of the formats with a fixed width below a byte (binary 1,
  ternary 2, the 4-bit block formats 4): the bits a format name implies by itself."""
  out = {}
  for name, f in _REGISTRY.items():
    if f.uniform_int:
      continue  # width set by the spec's `bits`
    bits = f.storage_bits(None)
    if bits < 8:
      out[name] = bits
  return out


__all__ = ["Format", "names", "get", "having", "either", "sub_byte_bits"]
