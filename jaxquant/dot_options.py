"""How a quantized contraction runs: the tuning choices of `jq.dot_general` / `jq.einsum`.

A `DotOptions` never changes what a contraction computes, only which formulation runs:
every setting gives the default's result, bit for bit where the integer sums are exact
(the barriers), and to float32 rounding on the weight-only serving paths (the sliced
int8 dot and the float dot of the codes both equal the dequantize-then-dot result within
4·K·2^-24·Σ|x||w| per output, see `jaxquant.serving_dot`). Its fields left at None keep
the library's own choice for the backend and CPU the program is traced on.

Options are an explicit, static argument (`options=` of `jq.dot_general`,
`jq.make_dot_general` and `jq.einsum`): the dataclass is frozen and hashable, so a jitted
function traced with other options is compiled again, never silently reused.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax

# Rows up to which the sliced int8 dot serves weight-only contractions by default (the
# decode regime, where the weight's bytes decide the time). Above it the float dot of
# the codes runs: there the weight conversion is spread over many rows, and three times
# the rows of an int8 GEMM cost 3·r of a float one (r, the s8/f32 GEMM time ratio, is
# 0.6-0.9 on AVX-512 VNNI CPUs without AMX). With AMX int8 tile units r is 0.13-0.17, so
# 3·r < 1 and the slices win at every row count for per-channel scales.
DEFAULT_SLICED_MAX_ROWS = 32


@functools.lru_cache(maxsize=None)
def cpu_has_amx_int8() -> bool:
  """Whether this Linux host's CPU reports AMX int8 tile units ('amx_int8' in
  /proc/cpuinfo's flags), which XLA:CPU's int8 GEMMs use. False where it cannot tell."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      return any(line.startswith("flags") and "amx_int8" in line.split() for line in f)
  except OSError:
    return False


@dataclasses.dataclass(frozen=True, kw_only=True)
class DotOptions:
  """Tuning choices of a quantized contraction (what runs, never what it computes).

  Attributes:
    int_dot_barriers: put the s8×s8→s32 dots of mode='int' (QAT forward and W8A8
      serving) between `lax.optimization_barrier`s. None (default): on every backend but
      the CPU. On XLA:GPU the quantize before an s8 dot and the int32→float convert
      after it are otherwise pulled into a Triton GEMM fusion, which the autotuner may
      swap for cuBLAS, leaving the convert as an extra pass over the int32 result
      (measured on an H200, jax 0.11.2, W8A8 serving of a bf16 [8192]² product: 1.57 ms
      without barriers, 1.05 ms with both; the bf16 dot 1.41 ms). XLA:CPU has no such
      fusion and runs without them. Results are bit-identical either way.
    sliced_max_rows: weight-only serving (float activations, a stored integer weight):
      the most rows of activations that take the sliced int8 dot (the activations split
      into three int8 slices, one s8 dot against the stored codes; `jaxquant.serving_dot`)
      instead of the float dot of the codes. 0 forces the float dot, a large number the
      sliced dot (rows holding NaN / Inf always take the float dot). None (default):
      32, or on a CPU backend with AMX int8 units (see `amx_int8`) every row count for
      per-channel / per-tensor scales and max(32, 1024 / groups) rows for grouped ones
      (their epilogue makes one float pass per group over [3·rows, N]). Measured on a
      2-core Xeon with AMX, weight-only serving of the benchmark MLP as ratios to the
      float forward, float dot of the codes / slices: int8 per channel at 33 rows
      0.92 / 0.27, at 512 rows 1.06 / 0.58; int4 in groups of 128 (16 groups) at 64 rows
      2.64 / 0.70, at 512 rows 1.19 / 2.15 (`python -m experiments.decode_layouts`).
    amx_int8: whether the default `sliced_max_rows` assumes AMX int8 units. None
      (default): what this host's /proc/cpuinfo says (`cpu_has_amx_int8`). Only read
      when `sliced_max_rows` is None.
  """
  int_dot_barriers: Optional[bool] = None
  sliced_max_rows: Optional[int] = None
  amx_int8: Optional[bool] = None

  def __post_init__(self):
    for name in ("int_dot_barriers", "amx_int8"):
      value = getattr(self, name)
      if value is not None and not isinstance(value, bool):
        raise ValueError(f"DotOptions.{name}={value!r} must be True, False or None "
                         "(None: the library's choice for this backend)")
    rows = self.sliced_max_rows
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 0):
      raise ValueError(f"DotOptions.sliced_max_rows={rows!r} must be an int >= 0 (0: never "
                       "the sliced dot) or None (the library's choice)")

  def barriers(self) -> bool:
    """Whether the int8 dots sit between optimization barriers (see `int_dot_barriers`)."""
    if self.int_dot_barriers is not None:
      return self.int_dot_barriers
    return jax.default_backend() != "cpu"

  def max_sliced_rows(self, groups: int = 1) -> float:
    """The most rows that take the sliced int8 dot for a weight with `groups` groups of
    K (see `sliced_max_rows`); inf for every row count."""
    if self.sliced_max_rows is not None:
      return self.sliced_max_rows
    amx = cpu_has_amx_int8() if self.amx_int8 is None else self.amx_int8
    if amx and jax.default_backend() == "cpu":
      return float("inf") if groups == 1 else max(DEFAULT_SLICED_MAX_ROWS, 1024 // groups)
    return DEFAULT_SLICED_MAX_ROWS


def resolve(options: Optional[DotOptions]) -> DotOptions:
  """`options`, or the defaults for None; anything else is refused by name."""
  if options is None:
    return DotOptions()
  if not isinstance(options, DotOptions):
    raise ValueError(f"options={options!r} must be a jaxquant.DotOptions (or None for the "
                     "defaults)")
  return options
