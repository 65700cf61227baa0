"""The one weight layout: every contraction sees its weight as rhs[B, K, N].

A weight (Dense / DenseGeneral / Einsum kernel, conv kernel) is described by which of its
axes are contracted (K, in dimension-number order) and which are batch axes shared with
the input (B); every other axis is an output feature (N). `canonical` views the weight as
[B, K, N] by one transpose and reshape. Scales live in that view as [B|1, G, N|1] (G
groups of K, 1 for per-channel and per-tensor) and are folded back into the weight's own
rank, each axis of length 1, its full length, or its number of groups: a group of
`group_size` spans the innermost contracting axes first.

`quantize_canonical` quantizes a weight in that view; `jaxquant.quantize.quantize_weight`
wraps it for a weight in its own rank.

The contraction side of the same view (`canonicalize` and the helpers after it): any
`dot_general` is a batched matmul lhs[B, M, K] · rhs[B, K, N], a reshape, and no
transpose at all for the usual Dense layout [..., K] · [K, N]. The QAT contraction
(`jaxquant.qat_dot`) and the serving paths (`jaxquant.serving_dot`) both read their
operands, learned scales and stored weights through these.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant import eager
from jaxquant.fake_quant import OperandState, quantize_parts
from jaxquant import numerics
from jaxquant.qtensor import QTensor, plane
from jaxquant.spec import QuantSpec


def prod(dims):
  """The product of axis sizes: a Python int for static sizes, a symbolic dimension
  expression when a size is symbolic (jax.export shape polymorphism: `int()` of one
  raises, so it is only taken of static sizes)."""
  p = math.prod(dims)
  return int(p) if isinstance(p, (int, np.integer)) else p


class WeightLayout(NamedTuple):
  """Axes of a weight: contracted (K, in order), batch (B, in order), free (N, ascending)."""
  contracting: Tuple[int, ...]
  batch: Tuple[int, ...]
  ndim: int

  @property
  def free(self) -> Tuple[int, ...]:
    used = set(self.contracting) | set(self.batch)
    return tuple(a for a in range(self.ndim) if a not in used)

  @property
  def perm(self) -> Tuple[int, ...]:
    """Transpose that takes the weight to [B..., K..., N...]."""
    return self.batch + self.contracting + self.free

  def check(self, shape) -> None:
    axes = self.contracting + self.batch
    if len(set(axes)) != len(axes) or any(not 0 <= a < self.ndim for a in axes):
      raise ValueError(f"weight layout contracting={self.contracting} batch={self.batch} is "
                       f"not a set of distinct axes of a rank-{self.ndim} weight")
    if len(shape) != self.ndim:
      raise ValueError(f"weight of shape {tuple(shape)} does not have rank {self.ndim}")


def make_layout(ndim: int, contracting: Sequence[int], batch: Sequence[int] = ()) -> WeightLayout:
  """The layout of a rank-`ndim` weight (negative axes allowed)."""
  return WeightLayout(tuple(int(a) % ndim for a in contracting),
                      tuple(int(a) % ndim for a in batch), int(ndim))


def canonical_shape(shape, layout: WeightLayout) -> Tuple[int, int, int]:
  return (prod(shape[a] for a in layout.batch), prod(shape[a] for a in layout.contracting),
          prod(shape[a] for a in layout.free))


def canonical(w, layout: WeightLayout):
  """The weight as [B, K, N]."""
  layout.check(w.shape)
  shape_BKN = canonical_shape(w.shape, layout)
  if layout.perm != tuple(range(w.ndim)):
    w = jnp.transpose(w, layout.perm)
  return w.reshape(shape_BKN)


def canonical_lhs(x, dimension_numbers):
  """The other operand (activations) as [B, M, K]: batch, free, then contracted axes."""
  (lc, _), (lb, _) = dimension_numbers
  lc, lb = tuple(int(a) % x.ndim for a in lc), tuple(int(a) % x.ndim for a in lb)
  lf = tuple(a for a in range(x.ndim) if a not in lc and a not in lb)
  perm = lb + lf + lc
  shape = (prod(x.shape[a] for a in lb), prod(x.shape[a] for a in lf),
           prod(x.shape[a] for a in lc))
  if perm != tuple(range(x.ndim)):
    x = jnp.transpose(x, perm)
  return x.reshape(shape)


def canonical_scale(s, layout: WeightLayout):
  """A scale-shaped array in the weight's rank (or a scalar) → [B|1, G, N|1]."""
  if s is None:
    return None
  s = jnp.asarray(s)
  if s.ndim == 0:
    return s.reshape(1, 1, 1)
  if s.ndim != layout.ndim:
    raise ValueError(f"a scale of shape {s.shape} must have the weight's rank {layout.ndim}")
  t = jnp.transpose(s, layout.perm)
  nb, nk = len(layout.batch), len(layout.contracting)
  return t.reshape(prod(t.shape[:nb]), prod(t.shape[nb:nb + nk]), prod(t.shape[nb + nk:]))


def _group_split(sizes, group_size):
  """Groups per contracting axis (in order) for groups spanning the innermost axes first."""
  per_axis, left = [], group_size
  for size in reversed(sizes):
    if left % size == 0:
      per_axis.append(1)
      left //= size
    elif size % left == 0:
      per_axis.append(size // left)
      left = 1
    else:
      raise ValueError(f"group_size={group_size} splits the contracting axes (sizes "
                       f"{tuple(sizes)}) across axis boundaries; choose a group size that "
                       "divides the innermost one or is a multiple of it")
  return tuple(reversed(per_axis))


def fold_scale(s_BGN, shape, layout: WeightLayout, spec: QuantSpec):
  """Inverse of `canonical_scale`: [B|1, G, N|1] → the weight's rank."""
  if s_BGN is None:
    return None
  permuted = [shape[a] for a in layout.perm]
  nb, nk = len(layout.batch), len(layout.contracting)
  b_sizes = permuted[:nb] if s_BGN.shape[0] > 1 else [1] * nb
  n_sizes = permuted[nb + nk:] if s_BGN.shape[2] > 1 else [1] * (layout.ndim - nb - nk)
  k_sizes = permuted[nb:nb + nk]
  if s_BGN.shape[1] == 1:
    g_sizes = [1] * nk
  else:
    g_sizes = list(_group_split(k_sizes, spec.group_size))
  t = s_BGN.reshape(tuple(b_sizes) + tuple(g_sizes) + tuple(n_sizes))
  return jnp.transpose(t, tuple(int(a) for a in np.argsort(layout.perm)))


def quantize_canonical(w_BKN, spec: QuantSpec, key=None, learned_BGN=None):
  """(codes, scale, zero point) of a [B, K, N] weight: one scale per (B, N) column, per
  (B, group of K, N), or per tensor. The single place where a weight is quantized."""
  return quantize_parts(w_BKN, spec, (1,), key, learned_BGN)


def init_learned(w, spec: QuantSpec, layout: WeightLayout):
  """Initial LSQ step / PACT α of a weight, in the weight's rank (scale-shaped)."""
  s = numerics.init_learned(canonical(w, layout), spec, (1,))
  return fold_scale(s, w.shape, layout, spec)


# `init_learned`, one compiled call outside a trace (see `jaxquant.eager`); `spec` and
# `layout` by keyword.
init_learned_compiled = eager.compiled_when_eager(init_learned, ("spec", "layout"))


def decode_layout(q: QTensor) -> QTensor:
  """A 2-D [K, N] weight (contracting axis 0) with one scale per column or per tensor,
  as its transpose [N, K] recorded as contracting axis 1 (the same codes and scales),
  packed again if it was; any other weight as it is.

  The layout weight-only serving reads fastest at small batch: on a 2-core Xeon (AMX),
  a chain of three s8 dots at 8 rows with the weights read cold ran 0.22x the float
  forward with [N, K] weights and 0.41x with [K, N]. Grouped scales keep [K, N]: each
  group of K is then a block of rows, read straight from one packed bit plane.
  A contraction that contracts axis 0 of a [K, N] weight uses such a weight as its
  transpose (see `stored_dimension_numbers`)."""
  if (len(q.shape) != 2 or tuple(q.contracting or ()) != (0,) or q.batch
      or q.scale.shape[0] != 1 or q.values.dtype not in (jnp.int8, jnp.uint8)):
    return q
  u = q.unpacked()
  t = QTensor(u.values.T, u.scale.T, None if u.zero_point is None else u.zero_point.T,
              spec=q.spec, logical_shape=tuple(u.shape[::-1]), contracting=(1,), batch=())
  return t.pack() if q.packed else t


def canonical_qtensor(q: QTensor, layout: WeightLayout) -> QTensor:
  """A stored weight QTensor (unpacked) as [B, K, N] codes with [B|1, G, N|1] scales."""
  q = q.unpacked()
  scale, zero_point = canonical_scales(q, layout)
  return QTensor(canonical(q.values, layout), scale, zero_point)


def canonical_scales(q: QTensor, layout: WeightLayout):
  """A stored weight QTensor's (scale, zero point) as [B|1, G, N|1] (the zero point may
  be None), after checking that `layout` is the one it was quantized for. `q` holds
  float32 scales: an unpacked QTensor, or packed integer codes."""
  if q.contracting is not None and (q.contracting, q.batch) != (layout.contracting, layout.batch):
    raise ValueError(f"a weight quantized for contracting axes {q.contracting} (batch "
                     f"{q.batch}) is used with contracting {layout.contracting} (batch "
                     f"{layout.batch}); its scales would be misread")
  return canonical_scale(q.scale, layout), canonical_scale(q.zero_point, layout)


# ------------------------------------------------------- contractions as [B, M, K]·[B, K, N]


class CanonicalContraction(NamedTuple):
  """A `dot_general` viewed as lhs[B, M, K] · rhs[B, K, N]: each operand's transpose to
  [batch, free, contracted] / [batch, contracted, free], the two views' shapes, and the
  output's shape (lax's order: batch, lhs free, rhs free)."""
  lhs_perm: tuple
  rhs_perm: tuple
  bmk: tuple
  bkn: tuple
  out_shape: tuple


def canonicalize(lhs_shape, rhs_shape, dimension_numbers) -> CanonicalContraction:
  """The [B, M, K] · [B, K, N] view of a contraction, after checking that its dimension
  numbers pair axes of equal sizes."""
  (lc, rc), (lb, rb) = dimension_numbers
  lc, rc, lb, rb = (tuple(int(d) for d in t) for t in (lc, rc, lb, rb))
  if len(lc) != len(rc) or len(lb) != len(rb):
    raise ValueError(f"dimension_numbers={dimension_numbers} pair unequal numbers of dims")
  for a, b in zip(lc + lb, rc + rb):
    if lhs_shape[a] != rhs_shape[b]:
      raise ValueError(f"dimension_numbers={dimension_numbers}: lhs dim {a} ({lhs_shape[a]}) "
                       f"!= rhs dim {b} ({rhs_shape[b]})")
  lf = tuple(i for i in range(len(lhs_shape)) if i not in lc and i not in lb)
  rf = tuple(i for i in range(len(rhs_shape)) if i not in rc and i not in rb)
  size = lambda shape, dims: prod(shape[d] for d in dims)  # symbolic batch: no int()
  b, m, k, n = size(lhs_shape, lb), size(lhs_shape, lf), size(lhs_shape, lc), size(rhs_shape, rf)
  out_shape = tuple(lhs_shape[d] for d in lb + lf) + tuple(rhs_shape[d] for d in rf)
  return CanonicalContraction(lb + lf + lc, rb + rc + rf, (b, m, k), (b, k, n), out_shape)


def to_canonical(x, perm, shape3):
  """An operand transposed by `perm` (skipped when it is the identity) and reshaped to
  its 3-D view `shape3`."""
  if perm != tuple(range(x.ndim)):
    x = jnp.transpose(x, perm)
  return x.reshape(shape3)


def learned_to_canonical(learned, perm, ndim, n_lead, n_mid):
  """A learned scale (operand rank, scale-shaped, or a scalar) reshaped like its
  operand: transposed by `perm`, then its first `n_lead` axes, the next `n_mid` and the
  rest each flattened into one."""
  if learned is None:
    return None
  learned = jnp.asarray(learned)
  if learned.ndim == 0:
    return learned.reshape(1, 1, 1)
  if learned.ndim != ndim:
    raise ValueError(f"learned scale of shape {learned.shape} must have the operand's rank {ndim}")
  t = jnp.transpose(learned, perm)
  s = t.shape
  return t.reshape(prod(s[:n_lead]), prod(s[n_lead:n_lead + n_mid]), prod(s[n_lead + n_mid:]))


def rhs_layout(dimension_numbers, rhs_ndim) -> WeightLayout:
  """The weight layout a contraction's dimension numbers give its rhs."""
  (_, rc), (_, rb) = dimension_numbers
  return make_layout(rhs_ndim, rc, rb)


def lhs_state_to_canonical(state: OperandState, c: CanonicalContraction, ndim,
                           dimension_numbers) -> Tuple[Optional[jax.Array], Optional[tuple]]:
  """The lhs's (learned scale, static range) in its [B, M, K] view."""
  (lc, _), (lb, _) = dimension_numbers
  n_lf = ndim - len(lb) - len(lc)
  view = lambda a: learned_to_canonical(a, c.lhs_perm, ndim, len(lb), n_lf)
  lr = None if state.range is None else tuple(view(r) for r in state.range)
  return view(state.learned), lr


def stored_dimension_numbers(dimension_numbers, q: QTensor):
  """The contraction's dimension numbers, with the rhs contracting axis of a 2-D weight
  stored transposed taken from the weight: a weight recorded as contracting its axis 1
  (stored [N, K], as `jq.convert` stores weight-only Dense kernels, see `decode_layout`)
  where the call contracts axis 0 of a [K, N] weight (a Dense layer's) is used as that
  transpose."""
  (lc, rc), (lb, rb) = dimension_numbers
  if (len(q.shape) == 2 and tuple(q.contracting or ()) == (1,) and not q.batch
      and tuple(rc) == (0,) and not tuple(rb)):
    return (lc, (1,)), (lb, rb)
  return dimension_numbers


def group_codes(q_stored: QTensor, layout: WeightLayout, groups: int):
  """(the int8 codes of each of the `groups` groups of K, kn) of a stored weight, as
  the sliced weight-only dot reads them. A 2-D [N, K] weight is used as stored (kn
  False: groups are column blocks); others as canonical [K, N] (row blocks). A packed
  2-D [K, N] weight whose groups each lie inside one bit plane (plane i holds rows
  [i·K/p, (i+1)·K/p), see `qtensor.pack`) gives each group straight from its bytes, so
  the unpacked weight is written once, as the groups, instead of unpacked whole and
  then copied group by group (as XLA:CPU did when the groups were slices of it)."""
  if layout.ndim == 2 and layout.contracting == (1,):  # [N, K] as stored
    codes = q_stored.unpacked().values
    gs = codes.shape[1] // groups
    return [codes[:, g * gs:(g + 1) * gs] for g in range(groups)], False
  K, N = canonical_shape(q_stored.shape, layout)[1:]
  gs = K // groups
  if q_stored.packed and groups > 1 and layout.ndim == 2 and layout.contracting == (0,):
    p = 8 // q_stored.spec.storage_bits
    rows = K // p  # rows per plane
    if K % p == 0 and rows % gs == 0:
      planes = q_stored.values.reshape(rows, N)
      return [plane(planes[(g * gs) % rows:(g * gs) % rows + gs], (g * gs) // rows,
                    q_stored.spec.storage_bits) for g in range(groups)], True
  codes = canonical_qtensor(q_stored, layout).values[0]
  return [codes[g * gs:(g + 1) * gs] for g in range(groups)], True
