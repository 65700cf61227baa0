"""One call of a quantized `nn.Embed`: the table gathered per row, `attend` as a dot.

The table [V, D] is a weight whose contracted axis is D (as in `attend`, query · tableᵀ),
so a per-channel scale is one per vocabulary row and groups run along D.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import jax.numpy as jnp

from jaxquant import dot as qdot
from jaxquant import fake_quant as fake_quant_lib
from jaxquant import layout
from jaxquant import state
from jaxquant.linen_layer import LayerCall, state_variable
from jaxquant.qtensor import QTensor, plane
from jaxquant.spec import Rule

if TYPE_CHECKING:
  from jaxquant.transform import QuantConfig


EMBED_LAYOUT = layout.make_layout(2, (1,))  # table [V, D]: D contracted, one scale per row


class EmbedCall(LayerCall):
  """One call of a matched `nn.Embed`: its table [V, D] is a weight whose contracted
  axis is D (as in `attend`, query · tableᵀ), so per-channel scales are per vocabulary
  row and groups run along D. `__call__` gathers rows of the (fake-)quantized table, or
  of a stored `QTensor` (only the gathered rows are unpacked and dequantized);
  `attend` is a contraction through `jq.dot_general` (the rule's act spec quantizes the
  query: the real s8 dot with per-row = per-output-channel weight scales). A lookup has
  no activation to quantize: the rule's act spec is ignored by `__call__`, so a rule
  with an LSQ / PACT act spec may match an Embed that never calls `attend` (one that
  does is refused: a learned query scale is not supported)."""

  METHODS = {"setup": "setup", "__call__": "gather", "attend": "attend"}

  def __init__(self, module, path: str, rule: Rule, config: QuantConfig):
    super().__init__(module, path, rule, config)
    if rule.ptq is not None:
      raise ValueError(f"layer {path!r} is an nn.Embed: ptq={rule.ptq.method!r} is not "
                       "supported for embedding tables (round-to-nearest per row only)")

  def setup(self, next_fun, *args, **kwargs):
    """The table, then (nn.Embed is a `setup` module: variables are made only here) the
    quantization state: the recorded layout, a learned weight scale, and the observers'
    states of attend's query. A stored QTensor table is used as it is (Flax's `param`
    would check its packed bytes' shape against the float table's)."""
    m = self.module
    stored = m.get_variable("params", "embedding") if m.has_variable("params", "embedding") \
        else None
    if isinstance(stored, QTensor):
      m.embedding = stored
    else:
      next_fun(*args, **kwargs)
    if self._tracking():
      self.rhs_state(m.embedding, EMBED_LAYOUT)
      probe = jnp.zeros((1, 1, m.features), jnp.float32)  # observers' states: shapes only
      for name, factory in self.config.observers:
        observer = factory(self.rule)
        if observer is not None:
          for k, v in observer.init(probe).items():
            state_variable(m, state.QUANT_STATS, state.observer_key(name, k), lambda v=v: v)
    return None

  def _table_state(self):
    table = self.module.embedding
    return table, self.rhs_state(table, EMBED_LAYOUT)

  def gather(self, next_fun, ids):
    """Rows `ids` of the quantized table (Embed.__call__)."""
    m, w = self.module, self.rule.weight
    if not jnp.issubdtype(jnp.asarray(ids).dtype, jnp.integer):
      raise ValueError(f"layer {self.path!r}: Embed input must be an integer array")
    if w is None or self.config.float_forward:  # act-only rule: it quantizes attend's query
      return next_fun(ids)
    table, rhs_state = self._table_state()
    if isinstance(table, QTensor):
      return gather_rows(table, ids, m.dtype or jnp.float32)
    (table,) = m.promote_dtype(table, dtype=m.dtype, inexact=False)
    return jnp.take(fake_quant_table(table, w, key=self.key(), learned=rhs_state.learned),
                    ids, axis=0)

  def attend(self, next_fun, query):
    """query · tableᵀ through `jq.dot_general` (Embed.attend)."""
    del next_fun
    m = self.module
    if self.rule.act is not None and self.rule.act.learned:
      raise ValueError(f"layer {self.path!r} is an nn.Embed whose attend is called: "
                       f"act.ste={self.rule.act.ste!r} (a learned scale for the query) is "
                       "not supported there; give this layer a rule of its own before the "
                       f"others, e.g. jq.Rule({self.path!r}, weight=..., act=jq.QuantSpec("
                       "bits=8, granularity='tensor'))")
    table = m.embedding
    if isinstance(table, QTensor):
      (query,) = m.promote_dtype(query, dtype=m.dtype)
    else:
      query, table = m.promote_dtype(query, table, dtype=m.dtype)
    dims = (((query.ndim - 1,), (1,)), ((), ()))
    return qdot.dot_general_compiled(query, table, dimension_numbers=dims, spec=self.spec,
                                     key=self.key(), **self.states(query, table, dims))


def fake_quant_table(table, spec, *, key=None, learned=None):
  """The table [V, D] quantized per row (groups along D) and dequantized, with the
  spec's gradient rule: the codes and scales `jq.quantize_weight(table, spec,
  EMBED_LAYOUT)` stores, so a gather of it equals `gather_rows` of the stored table."""
  w_BKN = layout.canonical(table, EMBED_LAYOUT)
  learned_BGN = layout.canonical_scale(learned, EMBED_LAYOUT)
  deq = fake_quant_lib.fake_quant(w_BKN, spec, reduce_axes=(1,), key=key, learned=learned_BGN)
  return jnp.transpose(deq[0], (1, 0))


def gather_rows(q: QTensor, ids, dtype=jnp.float32):
  """Dequantized rows `ids` of a stored table QTensor [V, D]: only those rows' codes
  are unpacked and dequantized, with their own scales. A packed table whose V is a
  multiple of the codes per byte p holds row v in bit plane v // (V/p), at byte row
  v % (V/p) (`jq.pack`'s bit planes), so a gather reads ids.size rows of D bytes."""
  v, d = q.shape
  ids = jnp.asarray(ids)
  if q.packed and q.int8_codes and v % (8 // q.spec.storage_bits) == 0:
    bits = q.spec.storage_bits
    per_plane = v // (8 // bits)
    rows = jnp.take(q.values.reshape(per_plane, d), ids % per_plane, axis=0)
    codes = plane(rows, (ids // per_plane)[..., None], bits)
  else:
    q = q.unpacked()
    codes = jnp.take(q.values, ids, axis=0)

  def rows_of(t):
    if t is None:
      return None
    if t.shape[0] == 1:  # one scale for the whole table
      return t.reshape((1,) * ids.ndim + t.shape[1:])
    return jnp.take(t, ids, axis=0)
  return QTensor(codes, rows_of(q.scale), rows_of(q.zero_point)).dequantize(dtype)
