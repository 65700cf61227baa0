"""I-BERT's integer kernels in numpy alone (no JAX, no jaxquant): the deployed twin of
jaxquant/integer_only/ibert.py, bit-exact with it.

Written from the equations of Kim et al., "I-BERT: Integer-only BERT Quantization"
(ICML 2021) and the fixed-point rules of Jacob et al. 2018 §2.2, in int64 so that no
intermediate can wrap (the kernels' int32 bounds are the plans' business, checked here
where a value would leave int32). Each function takes integer codes and a plan as a
plain mapping (`plan.as_dict()` of integer_only/ibert_plans.py; field meanings and
rounding rules are in those plans' docstrings). Only integer arithmetic is used.

Rounding rules used below:
  srdhm(a, b)     = ⌊a·b/2^31 + 1/2⌋ (ties toward +∞); a = b = −2^31 → 2^31 − 1
  rdbpot(x, n)    = x/2^n to nearest, ties away from zero
  requant(x, ...) = rdbpot(srdhm(clamp_int32(x·2^left), m0), right)
"""
import numpy as np

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1
EXP_MAX_Z = 31
SOFTMAX_CLAMP = 2 ** 30


def _i64(x):
  return np.asarray(x, dtype=np.int64)


def _fits_int32(name, x):
  if np.any(x < INT32_MIN) or np.any(x > INT32_MAX):
    raise OverflowError(f"{name} leaves the int32 range")
  return x


def srdhm(a, b):
  """⌊a·b/2^31 + 1/2⌋; the one product that does not fit (−2^31)² saturates."""
  a, b = _i64(a), _i64(b)
  out = (a * b + 2 ** 30) // 2 ** 31
  return np.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, out)


def rdbpot(x, n):
  """x / 2^n to nearest, ties away from zero."""
  x = _i64(x)
  den = _i64(2) ** _i64(n)
  mag = (2 * np.abs(x) + den) // (2 * den)
  return np.sign(x) * mag


def requant(x, m0, left, right):
  """rdbpot(srdhm(clamp_int32(x·2^left), m0), right)."""
  scaled = np.clip(_i64(x) * _i64(2) ** _i64(left), INT32_MIN, INT32_MAX)
  return rdbpot(srdhm(scaled, m0), right)


def _to_int8(y):
  return np.clip(y, -128, 127).astype(np.int8)


def _working(x, shift, clamp):
  """Codes at S → codes at S·2^shift (exact ×2^−shift of clamped codes, or rdbpot)."""
  if shift < 0:
    return np.clip(x, -clamp, clamp) * 2 ** (-shift)
  if shift > 0:
    return rdbpot(x, shift)
  return x


def int_matmul_acc(qa, qb, transpose_b=False):
  """int32 Σ_k qa[..., m, k]·qb[..., k, n] (qb indexed [..., n, k] with transpose_b)."""
  a, b = _i64(qa), _i64(qb)
  if transpose_b:
    b = np.swapaxes(b, -1, -2)
  return _fits_int32("int_matmul accumulator", np.matmul(a, b)).astype(np.int32)


def int_matmul_act(qa, qb, plan, transpose_b=False):
  """int8 codes of qa @ qb at the plan's scale_out: requant of the int32 accumulator."""
  acc = int_matmul_acc(qa, qb, transpose_b)
  return _to_int8(requant(acc, plan["m0"], plan["left"], plan["right"]))


def i_exp(q, plan):
  """int32 codes of exp at the plan's out_scale: exp(x) = 2^−z·exp(p), x = p − z·ln2."""
  x = np.minimum(_i64(q), 0)
  x = _working(x, plan["shift_in"], plan["in_floor"])
  ln2 = plan["q_ln2"]
  x = np.maximum(x, -EXP_MAX_Z * ln2)
  z = np.floor_divide(-x, ln2)
  p = x + z * ln2
  poly = _fits_int32("i_exp polynomial", (p + plan["q_b"]) ** 2 + plan["q_c"])
  out = np.floor_divide(poly, _i64(2) ** np.minimum(z + plan["out_shift"], 31))
  return out.astype(np.int32)


def i_softmax(q, plan, mask=None):
  """int8 codes, scale 2^−out_bits, of softmax over the last axis; masked (False)
  entries get 0 and take no part; a fully masked row is all 0."""
  x = np.clip(_i64(q), -SOFTMAX_CLAMP, SOFTMAX_CLAMP)
  keep = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask, bool),
                                                                        x.shape)
  x = np.where(keep, x, -SOFTMAX_CLAMP)
  e = np.where(keep, _i64(i_exp(x - x.max(axis=-1, keepdims=True), plan["exp"])), 0)
  total = _fits_int32("i_softmax sum", e.sum(axis=-1, keepdims=True))
  scaled = e * 2 ** plan["out_bits"]
  # round half up of scaled/total: ⌊(2·scaled + total) / (2·total)⌋
  codes = np.where(total > 0, (2 * scaled + total) // (2 * np.maximum(total, 1)), 0)
  return np.minimum(codes, 127).astype(np.int8)


def i_gelu_acc(q, plan):
  """int32 accumulator of GELU = x/2·(1 + erf(x/√2)), erf by I-BERT's i-erf."""
  x = np.clip(_i64(q), -plan["in_clamp"], plan["in_clamp"])
  x = _working(x, plan["shift_in"], plan["in_clamp"])
  t = np.minimum(np.abs(x), plan["q_clip"]) + plan["q_b"]
  erf = np.sign(x) * (t * t + plan["q_c"])
  return _fits_int32("i_gelu accumulator", -x * (erf + plan["q_one"])).astype(np.int32)


def i_gelu(q, plan):
  """int8 codes of GELU at the plan's out_scale."""
  return _to_int8(requant(i_gelu_acc(q, plan), plan["m0"], plan["left"], plan["right"]))


def _bit_length(n):
  """Number of significant bits of each n ≥ 0 (0 for 0), by comparisons."""
  n = _i64(n)
  return sum((n >= 2 ** k).astype(np.int64) for k in range(63))


def i_sqrt(n):
  """⌊√n⌋ (int32) by the integer Newton iteration (I-BERT Algorithm 4), elementwise,
  for 0 ≤ n < 2^31."""
  n = _i64(n)
  if np.any(n < 0) or np.any(n > INT32_MAX):
    raise ValueError("i_sqrt takes 0 <= n < 2^31")
  x = _i64(2) ** ((_bit_length(n) + 1) // 2)
  active = n > 0
  while np.any(active):
    y = (x + n // np.where(active, x, 1)) // 2
    active = active & (y < x)
    x = np.where(active, y, x)
  return np.where(n == 0, 0, x).astype(np.int32)


def i_layernorm(q, plan):
  """int8 codes of LayerNorm·γ + β over the last axis (I-BERT's integer LayerNorm)."""
  n = plan["n"]
  x = _i64(q) - plan["zp"]
  s1 = x.sum(axis=-1, keepdims=True)
  n_var = n * (x * x).sum(axis=-1, keepdims=True) - s1 * s1  # n·Σ(x − mean)², exact
  var_ceil = -((-n_var) // n)                                # ⌈Σ(x − mean)²⌉
  p = np.zeros_like(var_ceil)
  for k in range(1, plan["p_max"] + 1):  # the largest p ≤ p_max with 4^p·(⌈V⌉ + ε) < 2^31
    p = np.where((var_ceil + plan["eps_ceil"]) * 4 ** k < 2 ** 31, k, p)
  scaled = -((-(n_var * 4 ** p)) // n)                       # ⌈4^p·Σ(x − mean)²⌉
  w = _fits_int32("i_layernorm variance", scaled + _i64(plan["eps_table"])[p])
  sigma = i_sqrt(w)
  d = (n * x - s1) * 2 ** p
  num = np.abs(d) * 2 ** plan["frac_bits"]
  den = np.maximum(sigma, 1)
  u = np.sign(d) * ((2 * num + den) // (2 * den))
  u = _fits_int32("i_layernorm normalized value", u)
  y = requant(u * _i64(plan["sign"]), plan["m0"], plan["left"], plan["right"])
  return _to_int8(rdbpot(y + _i64(plan["beta"]), plan["beta_bits"]))


def embedding_lookup_int8(table, ids, plan):
  """int8 codes of the rows `ids` (clipped to the table) at the plan's out_scale."""
  table = np.asarray(table)
  ids = np.clip(_i64(ids), 0, table.shape[0] - 1)
  rows = _i64(table)[ids]
  m0, left, right = (_i64(plan[k]) for k in ("m0", "left", "right"))
  sel = ids if m0.shape[0] == table.shape[0] else np.zeros_like(ids)
  return _to_int8(requant(rows, m0[sel][..., None], left[sel][..., None],
                          right[sel][..., None]))
