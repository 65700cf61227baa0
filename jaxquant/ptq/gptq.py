"""GPTQ: quantize a weight one input row at a time, compensating error with the Hessian.

Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (Algorithm 1). For a dense layer y = x W with
W [K, N] (Flax layout: row k is input feature k), and calibration inputs X [n, K], the
layer's error ||X W − X Ŵ||² = tr((W − Ŵ)ᵀ H (W − Ŵ)) / 2 with H = 2 XᵀX is minimized
greedily, row by row, by the Optimal Brain Surgeon update (the paper's eqs. 2-3): after
quantizing row k to q_k, the rows not yet quantized absorb its error,

    e_k = (w_k − q_k) / [U]_kk,     w_j ← w_j − [U]_kj · e_k   for j after k,

where U is the upper Cholesky factor of H⁻¹ (H⁻¹ = Uᵀ U; the paper's Step 3: row k of U
holds the OBS update of every later row with the earlier rows already eliminated).

Details, as in the paper and its reference implementation unless noted:
  damping   H + λ I, λ = percdamp · mean(diag H) (percdamp 0.01). A Hessian whose Cholesky
            still fails (not positive definite, e.g. n < K samples and percdamp = 0, or an
            indefinite estimate) gets λ ← max(10 λ, 0.01 · mean diag H) and a warning,
            until it factors: never NaN weights.
  dead      inputs with diag H = 0 (never active on the calibration data) have their W row
            zeroed and H_kk set to 1; zeroed before the grid is chosen, so they do not
            widen it.
  grid      the project's quantizer (`jaxquant.numerics` with the `QuantSpec`): 'tensor'
            and 'channel' grids are calibrated once from the (dead-zeroed) W; 'group' grids
            (groups of `group_size` consecutive input rows, as the serving path groups them)
            are calibrated when the group's first row is reached, from the current
            error-compensated rows of that group.
  act_order rows are processed by decreasing diag H (stable order), then the permutation
            is undone. With groups, a group's grid is calibrated the first time any of its
            rows is reached (so groups stay contiguous and serving needs no group index;
            the reference implementation instead groups rows in processing order and
            stores a per-row group index, or with static_groups fixes all grids from the
            original W).
The paper's lazy batch updates (§4, Step 2) reorder the same arithmetic for GPU memory
bandwidth; here each step updates all later rows at once (identical in exact arithmetic).

The result's codes are exactly the spec's grid: `encode(dequantize(q), q.scale)` gives
the same codes back. Everything but the damping retry is one compiled program per
(shape, spec, act_order), with λ a traced argument: a retry runs the same program again;
only the checks (finite H, whether the factorization succeeded) are read back eagerly.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import formats, numerics
from jaxquant.qtensor import QTensor
from jaxquant.spec import QuantSpec

MAX_DAMP_TRIES = 12


class GPTQResult(NamedTuple):
  """GPTQ's output for one [K, N] weight.

  Attributes:
    qtensor: int8 codes [K, N] with the spec's scale (and zero point) in the layout of
      `jq.quantize(w, spec, reduce_axes=(0,))`: (1, 1) tensor, (1, N) channel,
      (K / group_size, N) group.
    weight: the dequantized weight [K, N] float32 (what a fake-quant forward uses).
    loss: Σ_k ||e_k||² / 2, the layer error GPTQ's greedy steps account for (in units of
      the given H: for H = 2 XᵀX it estimates ||X W − X Ŵ||²).
    damp: the λ finally added to diag H.
  """
  qtensor: QTensor
  weight: jax.Array
  loss: jax.Array
  damp: float


def check_spec(spec: QuantSpec, k: int, where: str = "gptq") -> None:
  """The specs GPTQ-style row-wise quantization supports on a [K, N] weight."""
  if not isinstance(spec, QuantSpec):
    raise ValueError(f"{where}: spec={spec!r} must be a jaxquant.QuantSpec")
  if not formats.get(spec.format).uniform_int or not spec.is_integer:
    raise ValueError(f"{where}: spec.format={spec.format!r} is not supported; GPTQ rounds "
                     "onto an int8 integer grid: choose format='int' of 2..8 bits")
  if spec.rounding != "nearest":
    raise ValueError(f"{where}: spec.rounding={spec.rounding!r} is not supported; GPTQ "
                     "compensates deterministic rounding errors: choose 'nearest'")
  if spec.learned:
    raise ValueError(f"{where}: spec.ste={spec.ste!r} learns its scale in training; GPTQ "
                     "calibrates it: choose ste='identity' or 'clipped'")
  if spec.granularity == "group" and k % spec.group_size:
    raise ValueError(f"{where}: group_size={spec.group_size} must divide the {k} input rows")


def _factor(h_KxK, damp):
  """(U, ok): the upper Cholesky factor of (H + λ I)⁻¹ and whether both factorizations
  succeeded (finite, positive diagonal). Traced: λ is an argument, so a retry with more
  damping runs the same compiled program."""
  eye = jnp.eye(h_KxK.shape[0], dtype=jnp.float32)
  low = jnp.linalg.cholesky(h_KxK + damp * eye)
  hinv = jax.scipy.linalg.cho_solve((low, True), eye)
  u = jnp.linalg.cholesky((hinv + hinv.T) / 2).T  # symmetrize away solve rounding
  ok = jnp.all(jnp.isfinite(low)) & jnp.all(jnp.isfinite(u)) & jnp.all(jnp.diag(u) > 0)
  return u, ok


_factor_jit = jax.jit(_factor)


@jax.jit
def _finite_mean_diag(h_KxK):
  return jnp.all(jnp.isfinite(h_KxK)), jnp.mean(jnp.diag(h_KxK))


def _check_percdamp(percdamp) -> None:
  if not 0.0 <= percdamp:
    raise ValueError(f"percdamp={percdamp!r} must be >= 0")


def _with_damping(finite, mean_diag, percdamp, attempt, stacklevel):
  """Calls `attempt(λ)` → (result, ok) with λ = percdamp · mean diag H, raising λ (with a
  warning) until ok; returns (result, λ)."""
  if not bool(finite):
    raise ValueError("the Hessian has NaN or Inf entries; check the calibration inputs")
  mean_diag = float(mean_diag)
  damp = percdamp * mean_diag
  for _ in range(MAX_DAMP_TRIES):
    out, ok = attempt(damp)
    if bool(ok):
      return out, damp
    new = max(10.0 * damp, 0.01 * abs(mean_diag), 1e-8)
    warnings.warn(f"gptq: the Hessian + {damp:.3g}·I is not positive definite (Cholesky "
                  f"failed); retrying with damping {new:.3g}", stacklevel=stacklevel + 1)
    damp = new
  raise ValueError(f"gptq: the Hessian did not factor even with damping {damp:.3g}; it is "
                   "far from positive semidefinite (is it XᵀX of the layer's inputs?)")


def inverse_hessian_factor(h_KxK, percdamp: float = 0.01):
  """(U, λ): the upper Cholesky factor of (H + λ I)⁻¹, raising λ until H + λ I factors."""
  _check_percdamp(percdamp)
  h = jnp.asarray(h_KxK, jnp.float32)
  finite, mean_diag = _finite_mean_diag(h)
  return _with_damping(finite, mean_diag, percdamp,
                       lambda damp: _factor_jit(h, jnp.float32(damp)), stacklevel=3)


def _grid_spec(spec: QuantSpec) -> QuantSpec:
  """One (1, N) grid per call: a group's rows calibrate like a channel slab."""
  if spec.granularity == "group":
    return dataclasses.replace(spec, granularity="channel", group_size=None)
  return spec


@functools.partial(jax.jit, static_argnames=("spec",))
def _rows(w_KxN, u_KxK, order_K, scale_GxN, zp_GxN, spec: QuantSpec):
  """The row loop in processing order; returns codes [K, N] (processing order) and grids."""
  k, n = w_KxN.shape
  grouped = spec.granularity == "group"
  gs = spec.group_size if grouped else k
  gspec = _grid_spec(spec)
  pos_of_row = jnp.argsort(order_K)          # where original row r sits in processing order
  group_of_pos = order_K // gs                # the group of the row processed at step t
  # A group's first step: the smallest processing position among its rows.
  first_pos = jnp.full((k // gs,), k, jnp.int32).at[group_of_pos].min(jnp.arange(k))
  zp_or_0 = jnp.zeros_like(scale_GxN, jnp.int32) if zp_GxN is None else zp_GxN
  later = jnp.arange(k)

  def step(t, carry):
    w, codes, scale, zp, loss = carry
    g = group_of_pos[t] if grouped else 0
    if grouped:
      def fit_group(args):
        scale, zp = args
        rows = w[jax.lax.dynamic_slice(pos_of_row, (g * gs,), (gs,))]
        s, z = numerics.fit_grid(rows, gspec, (0,))
        zp_new = zp if z is None else zp.at[g].set(z[0])
        return scale.at[g].set(s[0]), zp_new
      scale, zp = jax.lax.cond(first_pos[g] == t, fit_group, lambda a: a, (scale, zp))
    s_1xN, z_1xN = scale[g][None, :], (None if zp_GxN is None else zp[g][None, :])
    w_1xN = w[t][None, :]
    c_1xN = numerics.encode(w_1xN, s_1xN, z_1xN, spec, None)
    q_1xN = numerics.decode(c_1xN, s_1xN, z_1xN)
    e_N = (w_1xN - q_1xN)[0] / u_KxK[t, t]
    u_row_K = jnp.where(later > t, u_KxK[t], 0.0)
    w = w - u_row_K[:, None] * e_N[None, :]
    codes = codes.at[t].set(c_1xN[0])
    return w, codes, scale, zp, loss + 0.5 * jnp.sum(e_N * e_N)

  init = (w_KxN, jnp.zeros((k, n), jnp.float32), scale_GxN, zp_or_0, jnp.zeros((), jnp.float32))
  _, codes, scale, zp, loss = jax.lax.fori_loop(0, k, step, init)
  return codes, scale, (None if zp_GxN is None else zp), loss


def gptq(w_KxN, h_KxK, spec: QuantSpec, *, percdamp: float = 0.01,
         act_order: bool = False) -> GPTQResult:
  """Quantizes `w_KxN` with GPTQ given the Hessian `h_KxK` = 2 XᵀX (any positive multiple
  of XᵀX gives the same result) of the layer's calibration inputs.

  Args:
    w_KxN: the weight, rows = input features (a Dense kernel; flatten DenseGeneral
      kernels to their [contracting, output] matrix first).
    h_KxK: the Hessian of the layer error (e.g. `ptq.stats.hessian`).
    spec: the serving quantizer: format='int', rounding='nearest', granularity 'tensor',
      'channel' (one scale per output column) or 'group' (along the K rows).
    percdamp: damping λ = percdamp · mean(diag H).
    act_order: process rows by decreasing diag H.
  """
  w = jnp.asarray(w_KxN, jnp.float32)
  h = jnp.asarray(h_KxK, jnp.float32)
  if w.ndim != 2 or h.shape != (w.shape[0], w.shape[0]):
    raise ValueError(f"gptq: w must be [K, N] and h [K, K]; got w {w.shape}, h {h.shape}")
  check_spec(spec, w.shape[0])
  _check_percdamp(percdamp)
  act_order = bool(act_order)
  finite, mean_diag = _damping_base(h, act_order)
  (codes, scale, zp, weight, loss), damp = _with_damping(
      finite, mean_diag, percdamp,
      lambda damp: _split_ok(_core(w, h, jnp.float32(damp), spec, act_order)), stacklevel=2)
  return GPTQResult(QTensor(codes, scale, zp), weight, loss, float(damp))


def _split_ok(out):
  return out[:-1], out[-1]


def _prepare(w_KxN, h_KxK, act_order: bool):
  """Dead inputs zeroed (W rows) and given H_kk = 1; the processing order; H permuted."""
  k = h_KxK.shape[0]
  dead = jnp.diag(h_KxK) == 0
  h = h_KxK + jnp.diag(jnp.where(dead, 1.0, 0.0))
  w = None if w_KxN is None else jnp.where(dead[:, None], 0.0, w_KxN)
  order = (jnp.argsort(-jnp.diag(h), stable=True) if act_order
           else jnp.arange(k)).astype(jnp.int32)
  return w, order, h[order][:, order]


@functools.partial(jax.jit, static_argnames=("act_order",))
def _damping_base(h_KxK, act_order: bool):
  """Whether the (dead-fixed, permuted) H is finite, and the mean of its diagonal."""
  return _finite_mean_diag(_prepare(None, h_KxK, act_order)[2])


@functools.partial(jax.jit, static_argnames=("spec", "act_order"))
def _core(w_KxN, h_KxK, damp, spec: QuantSpec, act_order: bool):
  """GPTQ with damping λ = `damp`: (codes int8, scale, zero point, weight, loss, ok),
  ok = whether H + λ I factored (the other outputs are meaningless otherwise)."""
  k, n = w_KxN.shape
  w, order, h_p = _prepare(w_KxN, h_KxK, act_order)
  u, ok = _factor(h_p, damp)
  if spec.granularity == "group":
    groups = k // spec.group_size
    scale = jnp.ones((groups, n), jnp.float32)
    zp = None if spec.symmetric else jnp.zeros((groups, n), jnp.int32)
  else:
    scale, zp = numerics.fit_grid(w, spec, (0,))
    scale = jnp.broadcast_to(scale, (1, n))  # 'tensor': one value, repeated per column
    zp = None if zp is None else jnp.broadcast_to(zp, (1, n))
  codes_p, scale, zp, loss = _rows(w[order], u, order, scale, zp, spec)
  codes = codes_p[jnp.argsort(order)]
  if spec.granularity == "tensor":
    scale = scale[:, :1]
    zp = None if zp is None else zp[:, :1]
  full_s = numerics.expand_to(scale, (k, n))
  full_z = None if zp is None else numerics.expand_to(zp, (k, n))
  weight = numerics.decode(codes, full_s, full_z)
  return codes.astype(jnp.int8), scale, zp, weight, loss, ok


def as_matrix(kernel, n_contracting: int):
  """A kernel whose first `n_contracting` axes contract with the input, as [K, N]
  (e.g. DenseGeneral 'out' [H, Dh, D] → [H·Dh, D]; 'query' [D, H, Dh] → [D, H·Dh])."""
  kernel = jnp.asarray(kernel)
  k = int(np.prod(kernel.shape[:n_contracting]))
  return kernel.reshape(k, -1)
