"""Report axes and human labels: what a sweep point is, as a person would write it.

A run's *quant label* is read from the resolved config in its summary.json (the
`quant` section, rules with their FieldReferences already resolved):

  quant.bits == 32                       'float'  (the trainer builds no rules)
  last rule: weight int b, act int a     'WbAa'            e.g. 'W4A4'
             weight only                 'Wb weight-only'  e.g. 'W8 weight-only'
             act only                    'Aa activation-only'
             binary / ternary weights    'binary W1A8', 'ternary W2A8'
             fp8 weights                 'W fp8_e4m3 A8'
             a grad spec                 ', G8 grads (stochastic)' appended

The *last* rule is the one described: recipes list the exceptions (first and last
layer at 8 bits) first and end with the catch-all that most layers fall to
(configs/base.py standard_rules). A config without rules but with `quant.bits` (a
hand-made summary) is labelled from the bits alone.

Derived axes: 'bits' (the catch-all's weight bits: binary 1, ternary 2, int b, its
activation bits when the weights stay float, 32 for float) and 'label' (the quant label).
Any other axis is a dotted config key, taken from a point's overrides or else from its
resolved config; a unique suffix of a swept key starting after a '.' or '_' also names
it ('lr' for 'optimizer.lr', 'noise_std' for 'eval.input_noise_std').
"""
from __future__ import annotations

import functools
import json
from typing import Any, Optional, Sequence


FLOAT_BITS = 32
DERIVED = ("bits", "label")
SEED_KEY = "seed"
ARG_KEY = "config_arg"  # a point's get_config ARG (experiments.sweeps.grid.ARG_KEY)
_MISSING = object()


@functools.cache
def _format_bits() -> dict:
  """Bits a format name implies by itself (binary 1, ternary 2, 4-bit block formats 4),
  from the format registry. Imported on first use: jaxquant imports jax, which a report
  process (python -m experiments.report) otherwise never needs."""
  from jaxquant import formats  # pylint: disable=import-outside-toplevel
  return formats.sub_byte_bits()


def lookup(tree: Any, dotted_key: str) -> Any:
  """`tree[a][b]` for 'a.b', or the module's _MISSING sentinel when absent."""
  for part in dotted_key.split("."):
    if not isinstance(tree, dict) or part not in tree:
      return _MISSING
    tree = tree[part]
  return tree


def is_missing(value: Any) -> bool:
  """Whether `lookup` found nothing."""
  return value is _MISSING


def _catch_all(config: Any) -> Optional[dict]:
  rules = lookup(config, "quant.rules")
  if isinstance(rules, list) and rules and isinstance(rules[-1], dict):
    return rules[-1]
  return None


def _is_float(config: Any) -> bool:
  bits = lookup(config, "quant.bits")
  return bits is None or bits == FLOAT_BITS


def _weight_bits(spec: dict) -> Optional[int]:
  fmt = spec.get("format", "int")
  if fmt in _format_bits():
    return _format_bits()[fmt]
  if fmt == "int":
    return spec.get("bits", 8)
  return 8  # fp8


def config_bits(config: Any, bits_key: str = "quant.bits") -> Optional[float]:
  """The derived 'bits' of a resolved config; None when it says nothing about bits."""
  if not isinstance(config, dict):
    return None
  if is_missing(lookup(config, bits_key)) and _catch_all(config) is None:
    return None
  if _is_float(config) and bits_key == "quant.bits":
    return float(FLOAT_BITS)
  rule = _catch_all(config)
  if rule is not None:
    if isinstance(rule.get("weight"), dict):
      return float(_weight_bits(rule["weight"]))
    if isinstance(rule.get("act"), dict):
      return float(rule["act"].get("bits", 8))
  value = lookup(config, bits_key)
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  return float(FLOAT_BITS)  # None: a float run


def quant_label(config: Any) -> Optional[str]:
  """'float', 'W4A4', 'W8 weight-only', 'A4 activation-only', 'binary W1A8', ...;
  None when the config has no `quant` section."""
  if not isinstance(config, dict) or is_missing(lookup(config, "quant")):
    return None
  if _is_float(config):
    return "float"
  rule = _catch_all(config)
  if rule is None:
    return f"{lookup(config, 'quant.bits')} bits"
  weight, act, grad = (rule.get(k) if isinstance(rule.get(k), dict) else None
                       for k in ("weight", "act", "grad"))
  a_bits = _format_bits().get(act.get("format"), act.get("bits", 8)) if act else None
  a_text = f"A{a_bits}" if act else ""
  if weight is None:
    text = f"{a_text} activation-only" if act else "float (no quantized operand)"
  else:
    fmt = weight.get("format", "int")
    if fmt in _format_bits():
      text = f"{fmt} W{_format_bits()[fmt]}{a_text}"
    elif fmt == "int":
      text = f"W{weight.get('bits', 8)}{a_text}"
    else:
      text = f"W {fmt}" + (f" {a_text}" if a_text else "")
    if act is None:
      text += " weight-only"
  if grad is not None:
    text += f", G{grad.get('bits', 8)} grads ({grad.get('rounding', 'nearest')})"
  return text


def row_config(row: Any) -> Any:
  """The resolved config of a row's first finished point (None without one)."""
  for p in row.ok:
    return p.summary.get("config")
  return None


def resolve_key(key: str, rows: Sequence[Any]) -> str:
  """`key` as a derived axis, a swept key, a unique suffix of one, or a config key.

  Raises ValueError naming the swept keys when it is none of those.
  """
  if key in DERIVED:
    return key
  swept = list(dict.fromkeys(k for row in rows for k in row.values))
  if key in swept:
    return key
  matches = [k for k in swept if k.endswith(key) and k[-len(key) - 1] in "._"]
  if len(matches) == 1:
    return matches[0]
  if len(matches) > 1:
    raise ValueError(f"report axis {key!r} is ambiguous: it ends {matches}; give the "
                     "whole key")
  if any(not is_missing(lookup(row_config(row), key)) for row in rows):
    return key
  raise ValueError(f"report axis {key!r} is neither 'bits', 'label', a swept key "
                   f"({swept}) nor a key of the runs' configs")


def row_value(row: Any, key: str, bits_key: str = "quant.bits") -> Any:
  """A row's value on axis `key` (resolved by resolve_key); None when unknown."""
  config = row_config(row)
  if key == "bits":
    return config_bits(config, bits_key)
  if key == "label":
    return quant_label(config)
  if key in row.values:
    return row.values[key]
  value = lookup(config, key)
  return None if is_missing(value) else value


def _determined_by(keys_of: Sequence[tuple[str, Any]]) -> bool:
  """Whether each first element comes with a single second element."""
  seen: dict[str, set] = {}
  for a, b in keys_of:
    seen.setdefault(a, set()).add(json.dumps(b, sort_keys=True, default=str))
  return all(len(v) == 1 for v in seen.values())


def fmt_value(key: str, value: Any) -> str:
  """`lr=0.003` (last key component), or the bare value of a config_arg."""
  text = "—" if value is None else (
      "(" + ",".join(map(str, value)) + ")" if isinstance(value, (list, tuple)) else str(value))
  return text if key == ARG_KEY else f"{key.rsplit('.', 1)[-1]}={text}"


def row_labels(rows: Sequence[Any], exclude: Sequence[str] = ()) -> list[str]:
  """One human label per row: its quant label, then the swept keys that vary across
  rows and that the quant label does not already imply (quant.bits, quant.format, ...),
  minus `exclude` (the plot's axes) and the keys a row does not set. Rows without a
  finished run fall back to their override values."""
  quant = [quant_label(row_config(row)) for row in rows]
  keys = [k for k in dict.fromkeys(k for row in rows for k in row.values)
          if k not in exclude and k != SEED_KEY]
  varying = [k for k in keys
             if len({json.dumps(row.values.get(k), default=str) for row in rows}) > 1]
  extra = [k for k in varying
           if not _determined_by([(q, row.values.get(k)) for q, row in zip(quant, rows)])
           or any(q is None for q in quant)]
  labels = []
  for q, row in zip(quant, rows):
    parts = ([q] if q and "label" not in exclude else []) + [
        fmt_value(k, row.values.get(k)) for k in extra if row.values.get(k) is not None]
    labels.append(", ".join(parts) or "—")
  return labels


def series_name(rows: Sequence[Any], row: Any, series: Sequence[str],
                bits_key: str = "quant.bits") -> str:
  """The line a row belongs to: its values on the `series` axes."""
  del rows
  return ", ".join(
      str(row_value(row, k, bits_key)) if k in DERIVED
      else fmt_value(k, row_value(row, k, bits_key)) for k in series)


def default_series(rows: Sequence[Any], x: str) -> list[str]:
  """Swept keys that vary, except the seed, `x` and the quant.* keys (the points'
  annotations name those)."""
  keys = dict.fromkeys(k for row in rows for k in row.values)
  return [k for k in keys if k not in (SEED_KEY, x) and not k.startswith("quant.")
          and len({json.dumps(row.values.get(k), default=str) for row in rows}) > 1]
