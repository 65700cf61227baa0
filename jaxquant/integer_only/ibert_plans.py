"""Host-side constants of the I-BERT integer kernels (Kim et al., "I-BERT: Integer-only
BERT Quantization", ICML 2021), computed once from the static scales at lowering time.

Every plan is a frozen dataclass of Python ints (and int arrays), plus the float scales
it was derived from for documentation; `as_dict()` gives the plain mapping that the
numpy runtime (jaxquant/deploy/ibert_numpy.py) reads. The kernels themselves
(integer_only/ibert.py) see only the integers. Each constant's rounding rule is stated
where it is computed; the paper's constants use floor (q_b = ⌊b/S⌋, q_c = ⌊c/(a·S²)⌋,
q_ln2 = ⌊ln2/S⌋ in I-POLY, I-EXP and I-ERF), and requantization multipliers use
`fixed_point.requant_shifts` (M0 = round-half-even of m·2^31 as float64 → int).

Scales are float64 Python numbers here (and only here): a real value is code × scale.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Optional

import numpy as np

from jaxquant.integer_only import fixed_point as fp

# Paper constants (I-BERT's integer-only softmax and GELU).
EXP_A, EXP_B, EXP_C = 0.3585, 1.353, 0.344      # exp(p) ≈ a·(p + b)² + c on (−ln2, 0]
ERF_A, ERF_B, ERF_C = -0.2888, -1.769, 1.0      # erf(x) ≈ sgn(x)·[a·(min(|x|, −b) + b)² + c]
LN2 = math.log(2.0)
EXP_MAX_Z = 31          # x ≤ −31·ln2 gives exp codes of 0: every q_L < 2^31 shifted by 31
SOFTMAX_CLAMP = 2 ** 30  # softmax inputs saturate to ±2^30 so x − max(x) fits int32
POLY_LIMIT = 2 ** 30    # largest polynomial value a plan allows (one bit of headroom)


class _Plan:
  """Mixin: `as_dict()` turns the plan into plain Python ints / lists / floats."""

  def as_dict(self) -> Dict[str, Any]:
    """The plan's fields as a plain mapping (ndarrays become int64 ndarrays)."""
    out = {}
    for f in dataclasses.fields(self):
      v = getattr(self, f.name)
      if isinstance(v, _Plan):
        v = v.as_dict()
      elif isinstance(v, np.ndarray):
        v = v.astype(np.int64)
      out[f.name] = v
    return out


def _check_scale(name: str, s) -> float:
  s = float(s)
  if not math.isfinite(s) or s <= 0:
    raise ValueError(f"{name}={s!r} must be a finite scale > 0")
  return s


# ------------------------------------------------------------------ act × act matmul
@dataclasses.dataclass(frozen=True)
class MatmulPlan(_Plan):
  """Requantization of an s8×s8→s32 product to int8 codes at `scale_out`.

  Fields: m0, left, right (the int32 multiplier scale_a·scale_b/scale_out as
  M0·2^(left − right − 31), see fixed_point.requantize), k (the largest contraction
  length the bound |acc| ≤ k·128² was computed for), and the float scales."""
  m0: int
  left: int
  right: int
  k: int
  scale_a: float
  scale_b: float
  scale_out: float


def matmul_plan(scale_a, scale_b, scale_out, k: int) -> MatmulPlan:
  """Plan of `ibert.int_matmul_act` for symmetric int8 operands (zero point 0) and a
  contraction of at most `k` terms; |acc| ≤ k·128² must fit int32 (k ≤ 131071)."""
  sa, sb, so = (_check_scale(n, v) for n, v in
                (("scale_a", scale_a), ("scale_b", scale_b), ("scale_out", scale_out)))
  k = int(k)
  if not 1 <= k <= (2 ** 31 - 1) // 128 ** 2:
    raise ValueError(f"k={k} must be in [1, {(2 ** 31 - 1) // 128 ** 2}] so that k·128² "
                     "fits an int32 accumulator")
  m0, left, right = fp.requant_shifts(np.array(sa * sb / so), k * 128 ** 2)
  return MatmulPlan(int(m0), int(left), int(right), k, sa, sb, so)


# ------------------------------------------------------------------ i-exp and i-softmax
@dataclasses.dataclass(frozen=True)
class ExpPlan(_Plan):
  """Constants of i-exp (I-BERT's I-EXP) at the working scale `work_scale`.

  The input codes q (scale `in_scale`, values ≤ 0) are first brought to the working
  scale S' = in_scale·2^shift_in: shift_in < 0 multiplies by 2^−shift_in (exact; inputs
  below −in_floor are clamped first, they give 0 anyway), shift_in > 0 divides by
  2^shift_in rounding to nearest, ties away from zero (RDBPOT). Then, with
  q_ln2 = ⌊ln2/S'⌋, q_b = ⌊b/S'⌋, q_c = ⌊c/(a·S'²)⌋ (a, b, c = 0.3585, 1.353, 0.344):
    x = max(q', −31·q_ln2);  z = ⌊−x/q_ln2⌋;  p = x + z·q_ln2 ∈ (−q_ln2, 0]
    L = (p + q_b)² + q_c   (I-POLY; scale a·S'²)
    out = L >> min(z + out_shift, 31)   (arithmetic shift: floor)
  so out·out_scale ≈ exp(q·in_scale) with out_scale = a·S'²·2^out_shift. The working
  scale is the finest power-of-two multiple of in_scale whose L(0) = q_b² + q_c stays
  ≤ 2^30 (so ln2 is resolved to ~1/13600 instead of ⌊ln2/S⌋ of a coarse int8 scale)."""
  shift_in: int
  in_floor: int
  q_ln2: int
  q_b: int
  q_c: int
  out_shift: int
  in_scale: float
  work_scale: float
  out_scale: float

  @property
  def exp0(self) -> int:
    """The code of exp(0): L(0) >> out_shift."""
    return (self.q_b ** 2 + self.q_c) >> self.out_shift


def _exp_constants(work: float):
  q_ln2 = math.floor(LN2 / work)
  q_b = math.floor(EXP_B / work)
  q_c = math.floor(EXP_C / (EXP_A * work * work))
  return q_ln2, q_b, q_c


def exp_plan(in_scale, out_shift: int = 0) -> ExpPlan:
  """Plan of `ibert.i_exp` for inputs (≤ 0) at `in_scale`; `out_shift` extra right
  shift bits on the output (i-softmax uses them to keep its row sum inside int32)."""
  s = _check_scale("in_scale", in_scale)
  for shift in range(-30, 31):  # finest working scale first
    work = s * 2.0 ** shift
    q_ln2, q_b, q_c = _exp_constants(work)
    if q_ln2 >= 1 and q_b ** 2 + q_c <= POLY_LIMIT:
      break
  else:
    raise ValueError(f"in_scale={s!r} is outside the range i-exp supports")
  if not 0 <= out_shift <= 30:
    raise ValueError(f"out_shift={out_shift} must be in [0, 30]")
  limit = EXP_MAX_Z * q_ln2  # in working units
  in_floor = -(-limit // 2 ** -shift) if shift < 0 else 0  # ⌈limit / 2^−shift⌉
  return ExpPlan(shift, in_floor, q_ln2, q_b, q_c, int(out_shift), s, work,
                 EXP_A * work * work * 2.0 ** out_shift)


@dataclasses.dataclass(frozen=True)
class SoftmaxPlan(_Plan):
  """Constants of i-softmax (I-BERT's integer-only softmax) over rows of `n` entries.

  exp: the i-exp plan, whose out_shift makes n·exp0 ≤ 2^(30 − out_bits), so the row sum
  Σ and e·2^out_bits + ⌊Σ/2⌋ fit int32. Output codes ⌊(e·2^B + ⌊Σ/2⌋)/Σ⌋ (round half
  up, exact), saturated at 127, with scale 2^−out_bits (B = out_bits ∈ [1, 7])."""
  exp: ExpPlan
  n: int
  out_bits: int

  @property
  def out_scale(self) -> float:
    """Scale of the output codes: 2^−out_bits."""
    return 2.0 ** -self.out_bits


def softmax_plan(in_scale, n: int, out_bits: int = 7) -> SoftmaxPlan:
  """Plan of `ibert.i_softmax` for int32 scores at `in_scale` in rows of length `n`.
  Raises ValueError when n is so long that exp(0) would keep fewer than 8 bits."""
  n, out_bits = int(n), int(out_bits)
  if not 1 <= out_bits <= 7:
    raise ValueError(f"out_bits={out_bits} must be in [1, 7] (int8 output codes)")
  if n < 1:
    raise ValueError(f"n={n} must be >= 1")
  base = exp_plan(in_scale)
  e0 = base.q_b ** 2 + base.q_c
  cap = 2 ** (30 - out_bits)
  shift = 0
  while n * (e0 >> shift) > cap:
    shift += 1
  if (e0 >> shift) < 2 ** 8:
    raise ValueError(f"n={n} is too long for int32 i-softmax with out_bits={out_bits}: "
                     f"exp(0) would keep {(e0 >> shift).bit_length()} bits (< 9)")
  return SoftmaxPlan(exp_plan(in_scale, shift), n, out_bits)


# ------------------------------------------------------------------ i-GELU
@dataclasses.dataclass(frozen=True)
class GeluPlan(_Plan):
  """Constants of i-GELU (I-BERT's I-ERF and I-GELU).

  Inputs q (scale in_scale) are clamped to ±in_clamp (= max_abs_in) and go to the
  working scale
  S = in_scale·2^shift_in as in `ExpPlan` (exact left shift, or RDBPOT). With the erf
  input scale S_e = S/√2, and a, b, c = −0.2888, −1.769, 1 (all constants floor):
    q_clip = ⌊−b/S_e⌋, q_b = ⌊b/S_e⌋, q_c = ⌊c/(a·S_e²)⌋, q_one = ⌊1/(a·S_e²)⌋
    L = (min(|q|, q_clip) + q_b)² + q_c;  erf = sgn(q)·L   (scale a·S_e² < 0)
    acc = −q·(erf + q_one)                                 (scale acc_scale > 0)
  acc_scale = −S·a·S_e²/2 (the paper's S·S_erf/2 with the sign moved into acc).
  Then int8 codes = clamp(requantize(acc, m0, left, right), −128, 127) at out_scale
  (SRDHM ties toward +inf, RDBPOT ties away from zero; |acc| ≤ acc_bound)."""
  shift_in: int
  in_clamp: int
  q_clip: int
  q_b: int
  q_c: int
  q_one: int
  acc_bound: int
  m0: int
  left: int
  right: int
  in_scale: float
  work_scale: float
  acc_scale: float
  out_scale: float


def _gelu_constants(work: float):
  se = work / math.sqrt(2.0)
  q_clip = math.floor(-ERF_B / se)
  q_b = math.floor(ERF_B / se)
  q_c = math.floor(ERF_C / (ERF_A * se * se))
  q_one = math.floor(1.0 / (ERF_A * se * se))
  erf_bound = max(abs(q_c), abs(q_c + q_b ** 2), abs(q_c + (q_clip + q_b) ** 2))
  return q_clip, q_b, q_c, q_one, erf_bound + abs(q_one)


def gelu_plan(in_scale, out_scale, max_abs_in: int = 128) -> GeluPlan:
  """Plan of `ibert.i_gelu` for codes |q| ≤ max_abs_in at `in_scale`, int8 output codes
  at `out_scale`. The working scale is the finest power-of-two multiple of in_scale
  (from in_scale·2^−20 up) whose |acc| bound stays ≤ 2^30."""
  s = _check_scale("in_scale", in_scale)
  so = _check_scale("out_scale", out_scale)
  x = int(max_abs_in)
  if not 1 <= x <= 2 ** 31 - 1:
    raise ValueError(f"max_abs_in={x} must be in [1, 2^31 − 1]")
  for shift in range(-20, 31):
    work = s * 2.0 ** shift
    xw = x << -shift if shift < 0 else -(-x // 2 ** shift)  # |q'| bound (RDBPOT rounds up)
    consts = _gelu_constants(work)
    if consts[0] >= 1 and xw * consts[-1] <= POLY_LIMIT:
      break
  else:
    raise ValueError(f"in_scale={s!r}, max_abs_in={x} are outside the range i-GELU supports")
  q_clip, q_b, q_c, q_one, erf_bound = consts
  se = work / math.sqrt(2.0)
  acc_scale = -work * (ERF_A * se * se) / 2.0
  acc_bound = xw * erf_bound
  m0, left, right = fp.requant_shifts(np.array(acc_scale / so), acc_bound)
  return GeluPlan(shift, x, q_clip, q_b, q_c, q_one, acc_bound, int(m0), int(left),
                  int(right), s, work, acc_scale, so)


# ------------------------------------------------------------------ integer LayerNorm
@dataclasses.dataclass(frozen=True)
class LayerNormPlan(_Plan):
  """Constants of the integer LayerNorm (I-BERT) over the last axis of n entries.

  Input codes q ∈ [qmin, qmax] with zero point zp (scale in_scale). Per row, in int32:
    x = q − zp;  s1 = Σx;  m = round(s1/n) (ties away from zero);  c = x − m;  r = s1 − n·m
    Σc² = V + r²/n with V = Σ(x − mean)² (exact);  r² = a·n + b (0 ≤ b < n), so
    ⌈V⌉ = Σc² − a  and  ⌈4^P·V⌉ = 4^P·⌈V⌉ − ⌊4^P·b/n⌋
    P = min(p_max, ⌊(31 − bitlen(⌈V⌉ + eps_ceil))/2⌋), p_max the largest with 4^p_max·n < 2^31
    W = ⌈4^P·V⌉ + eps_table[P],  eps_table[P] = round(4^P·n·eps/in_scale²) (half up),
        eps_ceil = ⌈n·eps/in_scale²⌉, so W < 2^31 and W ≈ 4^P·n·(var + eps) in codes²
    σ = i_sqrt(W) = ⌊√W⌋ (Algorithm 4; ≈ 2^P·√(n·(var + eps)), ~15 bits unless P = p_max)
    d = n·x − s1 = n·(x − mean);  u = round(d·2^(P + frac_bits)/σ) (ties away from zero;
        0 when σ = 0, where every d is 0), so u ≈ 2^frac_bits·√n·(x − mean)/√(var + eps)
  and per channel j, with k = beta_bits extra fractional bits of the output code:
    out = clamp(RDBPOT(requantize(sign_j·u, m0_j, left_j, right_j) + beta_j, k), −128, 127)
  where the multiplier is |γ_j|·2^(k − frac_bits)/(√n·out_scale), sign_j = sgn(γ_j) and
  beta_j = round(β_j·2^k/out_scale) (half to even), so the output is rounded once to
  whole codes (error ≤ 1/2 + 2^−k codes). No int64 is needed: Σc² ≤ n·(qmax − qmin)²,
  r² ≤ n²/4, |d·2^P| < n·(σ + 1) ≤ n·46341, |u| < n·2^frac_bits·(1 + 1/σ) ≤ 2^30, the
  requantized part ≤ 2^29 and |beta_j| ≤ 2^30 (checked or clipped here)."""
  n: int
  zp: int
  p_max: int
  eps_ceil: int
  eps_table: np.ndarray
  frac_bits: int
  beta_bits: int
  m0: np.ndarray
  left: np.ndarray
  right: np.ndarray
  sign: np.ndarray
  beta: np.ndarray
  in_scale: float
  out_scale: float


def layernorm_plan(in_scale, gamma, beta, out_scale, eps: float = 1e-5, zp: int = 0,
                   qmin: int = -128, qmax: int = 127) -> LayerNormPlan:
  """Plan of `ibert.i_layernorm` for rows of len(gamma) codes; gamma, beta float [n]."""
  s = _check_scale("in_scale", in_scale)
  so = _check_scale("out_scale", out_scale)
  gamma = np.asarray(gamma, np.float64).reshape(-1)
  beta = np.asarray(beta, np.float64).reshape(-1)
  n = gamma.shape[0]
  if beta.shape != gamma.shape:
    raise ValueError(f"beta shape {beta.shape} must match gamma shape {gamma.shape}")
  if not (np.all(np.isfinite(gamma)) and np.all(np.isfinite(beta))):
    raise ValueError("gamma and beta must be finite")
  if not 0.0 <= float(eps) < 1.0:
    raise ValueError(f"eps={eps!r} must be in [0, 1)")
  eps_n = n * float(eps) / (s * s)  # n·eps in codes²
  eps_ceil = math.ceil(eps_n)
  p_max = max(p for p in range(16) if 4 ** p * n < 2 ** 31)
  eps_table = np.array([min(math.floor(4 ** p * eps_n + 0.5), 2 ** 31 - 1)
                        for p in range(16)], np.int64).astype(np.int32)
  if n * (qmax - qmin) ** 2 + eps_ceil > 2 ** 31 - 1 or n > 46340:
    raise ValueError(f"a row of n={n} codes in [{qmin}, {qmax}] (eps·n={eps_n:.4g} codes²) "
                     "does not fit the int32 variance")
  frac_bits = 29 - math.ceil(math.log2(n)) if n > 1 else 29
  # A row that is not constant has Σ(x − mean)² ≥ 1/2, so W ≥ min(4^p_max/2, 2^29).
  sigma_min = max(1, math.isqrt(min(4 ** p_max // 2, 2 ** 29)))
  bound = n * 2 ** frac_bits * (1 + 1 / sigma_min) + 1  # |u| < n·2^frac_bits·(1 + 1/σ)
  mult = np.abs(gamma) * 2.0 ** -frac_bits / (math.sqrt(n) * so)
  m0, left, right = fp.requant_shifts(mult, bound)
  beta_bits = 8  # fractional bits of the output code carried until beta is added
  live = m0 != 0
  norm_max = bound * float(np.max(mult))  # |requantized part| in whole output codes
  while beta_bits > 0 and (np.any(right[live] < beta_bits) or
                           norm_max * 2.0 ** beta_bits > 2 ** 29):
    beta_bits -= 1
  if norm_max * 2.0 ** beta_bits > 2 ** 29:
    raise ValueError(f"gamma/out_scale up to {float(np.max(np.abs(gamma))) / so:.4g} is "
                     "too large for the int32 LayerNorm output")
  right = np.where(live, right - beta_bits, 0).astype(np.int32)
  beta_q = np.clip(np.rint(beta / so * 2.0 ** beta_bits), -2 ** 30, 2 ** 30)
  return LayerNormPlan(n, int(zp), p_max, eps_ceil, eps_table, frac_bits, beta_bits, m0,
                       left, right, np.sign(gamma).astype(np.int32), beta_q.astype(np.int32),
                       s, so)


# ------------------------------------------------------------------ int8 embedding
@dataclasses.dataclass(frozen=True)
class EmbedPlan(_Plan):
  """Requantization of gathered int8 table rows to one output scale: row v (table scale
  s_v, per row or one for all) gets the multiplier s_v/out_scale as (m0_v, left_v,
  right_v); codes = clamp(requantize(table[v], ...), −128, 127)."""
  m0: np.ndarray
  left: np.ndarray
  right: np.ndarray
  out_scale: float


def embed_plan(table_scale, out_scale: Optional[float] = None) -> EmbedPlan:
  """Plan of `ibert.embedding_lookup_int8`: `table_scale` a scalar (per tensor: arrays
  of shape [1]) or [V] (per row); `out_scale` defaults to the largest table scale (so no
  row saturates)."""
  ts = np.asarray(table_scale, np.float64).reshape(-1)
  if ts.size == 0 or not np.all(np.isfinite(ts)) or np.any(ts <= 0):
    raise ValueError("table_scale must hold finite scales > 0")
  so = _check_scale("out_scale", float(np.max(ts)) if out_scale is None else out_scale)
  m0, left, right = fp.requant_shifts(ts / so, 128)
  return EmbedPlan(m0, left, right, so)
