"""Emission of the integer graph from the IR (step 4 of `to_integer`, see lower.py).

Each op's own graph op comes from its `Op.emit` (ops/); this module places the
requantizations around them. Each requantization point ('affine' node) becomes a core op whose int32
result is acc = sign·raw (the affine map's sign per channel), then a `requant` op
with the per-channel multiplier M = s_acc·|mult| / s_out as (M0, left, right), the
affine offset (layer bias, BatchNorm shift, β) in units of 2^-left of the accumulator
(the layer bias at scale s_in·s_w·2^-left: finer than int32-at-s_in·s_w, so a coarse
4-bit accumulator scale does not round the bias), and the clamp
[qmin, qmax] ∩ quantize([lo, hi]) (ReLU: the zero point). A tensor asked
for on several grids is requantized once per grid from the same accumulator. The
output is requantized to int32 at one scale s_out slightly above the largest
accumulator scale (so every multiplier is < 1 and nothing saturates).

Wide residual paths (`to_integer(..., residual_bits=16)`): the normalizations and the
adds on the residual paths into them (`residual_readers`) read their inputs as int16
codes, on the int16 asymmetric grid of each input's measured range (`wide`); every other
consumer of the same tensors (a contraction, a pooling) still reads its own int8 grid,
requantized from the same accumulator. A transformer's residual sums hold a few outlier
channels (hundreds of times the median magnitude), which an int8 grid of their range
rounds the other channels away on; 256 times finer steps keep them. The i-GELU, which
picks its own symmetric input grid, then reads int16 codes too (ops/gelu.py).
"""
from __future__ import annotations

from typing import Any, Dict, List, NamedTuple, Optional, Set, Tuple

import numpy as np

from jaxquant.integer_only import fixed_point as fp
from jaxquant.integer_only import ops
from jaxquant.integer_only import qat_view
from jaxquant.integer_only.ir import IR, IntegerOnlyError, Layer, Node  # noqa: F401 (Layer)
from jaxquant.numerics import int_range
from jaxquant.spec import QuantSpec

CALIBRATED_ACT = QuantSpec(bits=8, symmetric=False, granularity="tensor")
WIDE_ACT = QuantSpec(bits=16, symmetric=False, granularity="tensor")
RESIDUAL_BITS = (8, 16)
OUTPUT_HEADROOM = 1.0 + 2.0 ** -10


class Grid(NamedTuple):
  """real = scale·(code − zp), codes in [qmin, qmax], stored as `dtype`."""
  scale: float
  zp: int
  qmin: int
  qmax: int
  dtype: str = "int8"


OUTPUT = Grid(0.0, 0, fp.INT32_MIN, fp.INT32_MAX, "int32")  # scale chosen at emission


def grid_from_spec(spec: QuantSpec, scale: float, zp: int, dtype: str = "int8") -> Grid:
  """The `Grid` of an int spec with this scale and zero point, its codes stored as
  `dtype`."""
  qmin, qmax = int_range(spec)
  return Grid(float(scale), int(zp), int(qmin), int(qmax), dtype)


def grid_bits(grid: Grid) -> int:
  """The width of the dtype a grid's codes are stored as (8, 16 or 32)."""
  return np.iinfo(np.dtype(grid.dtype)).bits


def residual_readers(ir: IR, root) -> Set[int]:
  """The ids of every normalization node and of every add node on a residual path into
  one: an add whose output (through its folded affine map and any reshapes) is the
  input of a normalization or of another such add. `root(i)` skips reshapes."""
  readers: Set[int] = set()
  stack = [n.id for n in ir.nodes if n.kind == "norm"]
  while stack:
    c = stack.pop()
    if c in readers:
      continue
    readers.add(c)
    for i in ir.nodes[c].inputs:
      node = ir.nodes[root(i)]
      if node.kind == "affine" and ir.nodes[node.inputs[0]].kind == "add":
        stack.append(node.inputs[0])
  return readers


class Emitter:
  """Writes the integer graph's ops and arrays, node by node, on demand from the output:
  `emit(i, grid)` names the tensor of IR node `i` on `grid`, emitting what it needs."""

  def __init__(self, ir: IR, layers: Dict[int, Layer], demand: Dict[int, Grid],
               ranges: Dict[int, Tuple[float, float]], calibrated: bool,
               residual_bits: int = 8):
    if residual_bits not in RESIDUAL_BITS:
      raise ValueError(f"residual_bits={residual_bits!r} must be one of {RESIDUAL_BITS}")
    self.ir, self.layers, self.demand, self.ranges = ir, layers, demand, ranges
    self.calibrated = calibrated
    self.residual_bits = residual_bits
    self.wide_readers = residual_readers(ir, self.root) if residual_bits == 16 else set()
    self.ops: List[Dict[str, Any]] = []
    self.arrays: Dict[str, np.ndarray] = {}
    self.memo: Dict[Tuple[int, Grid], str] = {}
    self.acc_memo: Dict[int, Tuple[str, np.ndarray, float, np.ndarray]] = {}
    self.output_scale: Optional[float] = None
    self.demands_of: Dict[int, List[Grid]] = {}
    for cid, grid in demand.items():
      self.demands_of.setdefault(self.root(ir.nodes[cid].inputs[0]), []).append(grid)

  def root(self, i: int) -> int:
    """The node a chain of reshapes / transposes starts from."""
    while self.ir.nodes[i].kind in ops.STRUCTURAL:
      i = self.ir.nodes[i].inputs[0]
    return i

  def natural(self, i: int) -> Grid:
    """The grid tensor `i` is stored on: the first grid a consumer asks for, else the
    int8 asymmetric grid of its measured range."""
    r = self.root(i)
    if self.demands_of.get(r):
      return self.demands_of[r][0]
    node = self.ir.nodes[r]
    if r not in self.ranges:
      what = "the model input" if node.kind == "input" else f"the output of layer {node.layer!r}"
      raise IntegerOnlyError(
          f"no activation range for {what}: QAT gives it no grid, so to_integer needs "
          "calibration_batches (a few batches of inputs) to measure it")
    lo, hi = self.ranges[r]
    scale, zp = qat_view.grid_of(CALIBRATED_ACT, ("range", (lo, hi)))
    return grid_from_spec(CALIBRATED_ACT, scale, zp)

  def wide(self, i: int) -> Grid:
    """The int16 asymmetric grid of tensor `i`'s measured range (without a measured
    range: the real range of its natural grid)."""
    r = self.root(i)
    if r in self.ranges:
      lo, hi = self.ranges[r]
    else:
      g = self.natural(i)
      lo, hi = g.scale * (g.qmin - g.zp), g.scale * (g.qmax - g.zp)
    return grid_from_spec(WIDE_ACT, *qat_view.grid_of(WIDE_ACT, ("range", (lo, hi))), "int16")

  def operand(self, node: Node, i: int) -> Grid:
    """The grid `node` reads its input `i` on: `wide(i)` for a residual-path reader
    (`residual_readers`, when residual_bits=16), else `natural(i)`."""
    return self.wide(i) if node.id in self.wide_readers else self.natural(i)

  def check_ranges(self) -> None:
    """Names the first tensor (in forward order) that needs a measured range and has
    none, before any emission."""
    for node in self.ir.nodes:
      if node.kind == "input":
        needs = [node.id]
      elif node.kind == "affine":
        needs = []
      else:
        needs = ops.get(node.kind).needs_range(self, node)
      for i in needs:
        self.natural(i)

  def name(self) -> str:
    """The name the next op's output gets."""
    return f"t{len(self.ops)}"

  def add_op(self, op: Dict[str, Any], **arrays) -> str:
    """Appends `op`, its non-None `arrays` stored under '<out>.<field>'; its output name."""
    out = self.name()
    op["out"] = out
    for field, value in arrays.items():
      if value is not None:
        key = f"{out}.{field}"
        self.arrays[key] = np.asarray(value)
        op[field] = key
    self.ops.append(op)
    return out

  # -- tensors on grids ---------------------------------------------------------------
  def emit(self, i: int, grid: Grid) -> str:
    """The name of tensor `i` on `grid`, emitting the ops that make it (once per grid)."""
    key = (i, grid)
    if key not in self.memo:
      node = self.ir.nodes[i]
      if node.kind in ops.STRUCTURAL:  # the input's codes, moved (or maxed) on its grid
        t = self.emit(node.inputs[0], grid)
        self.memo[key] = self.add_op(ops.get(node.kind).emit(self, node, t))
      elif node.kind == "input" and grid == self.natural(i):
        self.memo[key] = "input"
      else:
        self.memo[key] = self.requant(i, grid)
    return self.memo[key]

  def requant(self, i: int, grid: Grid) -> str:
    """A `requant` op taking tensor `i`'s accumulator to `grid`, with its clamp."""
    node = self.ir.nodes[i]
    if node.kind == "input":
      acc, scale, bound, bias = self.identity_acc(i)
      lo, hi = -np.inf, np.inf
    else:
      acc, scale, bound, bias = self.acc(i)
      lo, hi = node.attrs["lo"], node.attrs["hi"]
    if grid == OUTPUT:
      self.output_scale = float(np.max(scale)) * OUTPUT_HEADROOM
      grid = OUTPUT._replace(scale=self.output_scale)
    try:
      m0, left, right = fp.requant_shifts(scale / grid.scale, bound + np.abs(bias))
    except ValueError as err:
      raise IntegerOnlyError(f"layer {node.layer!r}: requantization {err}") from None
    offset = np.rint(bias * 2.0 ** left.astype(np.float64)).astype(np.int64)
    q_lo, q_hi = grid.qmin, grid.qmax
    if np.isfinite(lo):
      q_lo = int(np.clip(grid.zp + np.rint(lo / grid.scale), grid.qmin, grid.qmax))
    if np.isfinite(hi):
      q_hi = int(np.clip(grid.zp + np.rint(hi / grid.scale), grid.qmin, grid.qmax))
    op = {"op": "requant", "in": [acc], "layer": node.layer, "zp": grid.zp, "lo": q_lo,
          "hi": max(q_lo, q_hi), "dtype": grid.dtype}
    return self.add_op(op, m0=m0, left=left, right=right,
                       offset=offset.astype(np.int32) if np.any(offset) else None)

  def identity_acc(self, i: int):
    """The accumulator of the model input (x − zp at its own grid), for a requant."""
    grid = self.natural(i)
    t = self.emit(i, grid)
    rank = len(self.ir.nodes[i].shape)
    out = self.add_op({"op": "identity", "in": [t], "layer": "", "zp": grid.zp})
    return out, np.full((1,) * rank, grid.scale), float(grid.qmax - grid.qmin), np.zeros(())

  # -- accumulators ---------------------------------------------------------------------
  def acc(self, i: int):
    """(int32 tensor, its scale, a bound on |acc|, the affine offset in units of acc) of
    an affine node: its core op with the sign of the affine map as the epilogue; the
    offset is added by each requant at its finer resolution."""
    if i in self.acc_memo:
      return self.acc_memo[i]
    affine = self.ir.nodes[i]
    core = self.ir.nodes[affine.inputs[0]]
    op, s_core, bound = ops.get(core.kind).emit(self, core)
    rank = len(core.shape)
    fit = lambda v: np.asarray(v, np.float64).reshape((1,) * rank if np.ndim(v) == 0 else np.shape(v))
    mult, add, s_core = fit(affine.attrs["mult"]), fit(affine.attrs["add"]), fit(s_core)
    shape = np.broadcast_shapes(mult.shape, add.shape, s_core.shape)
    mult, add, s_core = (np.broadcast_to(v, shape) for v in (mult, add, s_core))
    scale = s_core * np.abs(mult)
    sign = np.sign(mult).astype(np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
      bias = np.where(scale > 0, add / np.where(scale > 0, scale, 1.0), np.inf)
    # No usable slope (a zero multiplier, or an offset beyond 2^29 accumulator units): the
    # element is the constant `add`, carried by the offset at a scale of its own.
    degenerate = ~(np.abs(bias) <= 2.0 ** 29)
    if np.any(degenerate):
      usable = scale[~degenerate]
      filler = float(usable.max()) if usable.size else 1.0
      const_scale = np.where(add != 0, np.abs(add) / 2.0 ** 20, filler)
      scale = np.where(degenerate, const_scale, scale)
      sign = np.where(degenerate, 0, sign)
      bias = np.where(degenerate, add / const_scale, bias)
    if bound + float(np.max(np.abs(bias), initial=0.0)) >= 2.0 ** 30:
      raise IntegerOnlyError(f"layer {core.layer!r}: the int32 accumulator could overflow "
                             f"(|raw| ≤ {bound:.3g}); fewer inputs per output or a smaller "
                             "bias would fit")
    out = self.add_op(op, sign=sign.astype(np.int32) if np.any(sign != 1) else None)
    self.acc_memo[i] = (out, scale, bound, bias)
    return self.acc_memo[i]
