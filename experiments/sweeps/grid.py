"""The sweep DSL: axes of config overrides composed into a list of points.

A point is a plain dict of dotted config keys to values, `{"quant.bits": 4, "seed": 0}`;
a sweep is a list of points. The one key that is not a config key, `config_arg`, picks
the ARG the point's config is built with (`--config=FILE:ARG`). Every helper takes and returns lists of points, so a
`get_sweep` may use them or just return a hand-written list.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import re
from typing import Any, Iterable, Sequence

Point = dict[str, Any]

# A dotted config path, as `--config.KEY=VALUE` accepts it.
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
# Characters a value may keep in a directory name; anything else makes the name lossy.
_SAFE_VALUE_RE = re.compile(r"[^A-Za-z0-9._+-]")
_MAX_NAME_CHARS = 150  # well under the usual 255-byte file name limit
BASE_NAME = "base"  # the name of the point with no overrides
# Not a config key: the point's get_config ARG (`--config=FILE:ARG`), for recipes whose
# variants differ in structure (which operands a rule quantizes) rather than in a value.
ARG_KEY = "config_arg"
# A value naming another point of the same sweep (see `ref`).
REF_PREFIX = "@"


def axis(key: str, values: Iterable[Any]) -> list[Point]:
  """One swept key: `axis("seed", range(3))` -> `[{"seed": 0}, {"seed": 1}, {"seed": 2}]`."""
  _check_key(key)
  if isinstance(values, (str, dict)):
    raise ValueError(f"axis({key!r}) needs a list of values, got {values!r}")
  points = [{key: _check_value(key, v)} for v in values]
  if not points:
    raise ValueError(f"axis({key!r}) has no values")
  return points


def product(*sweeps: Sequence[Point]) -> list[Point]:
  """Cartesian product; the first sweep varies slowest. Keys must not overlap."""
  result: list[Point] = [{}]
  for sweep in sweeps:
    result = [_merge(a, b, "product") for a, b in itertools.product(result, _points(sweep))]
  return result


def zip_(*sweeps: Sequence[Point]) -> list[Point]:
  """Pairs the i-th points of equally long sweeps, e.g. a bits axis with matching lrs."""
  lists = [_points(s) for s in sweeps]
  lengths = {len(p) for p in lists}
  if len(lengths) > 1:
    raise ValueError(f"zip_ needs sweeps of equal length, got lengths {[len(p) for p in lists]}")
  result = []
  for row in zip(*lists):
    merged: Point = {}
    for p in row:
      merged = _merge(merged, p, "zip_")
    result.append(merged)
  return result


def chain(*sweeps: Sequence[Point]) -> list[Point]:
  """Concatenation: the points of each sweep in turn (e.g. a float baseline + a grid)."""
  return [p for s in sweeps for p in _points(s)]


def ref(point: Point) -> str:
  """A value that names another point's run directory, for staged runs.

  `{"init.from_workdir": ref(stage1), ...}` runs the point with
  `--config.init.from_workdir=SWEEPDIR/<stage1's name>`, and the local launcher starts it
  only after `stage1` has finished (a chain 8 -> 4 -> 2 bits is three points, each
  referring to the one before). The referenced point must come earlier in the sweep.
  """
  if not isinstance(point, dict):
    raise ValueError(f"ref() takes a point (a dict of overrides), got {point!r}")
  return REF_PREFIX + point_name(point)


def references(point: Point) -> list[str]:
  """The names of the points `point` refers to with `ref`, in key order."""
  return [v[len(REF_PREFIX):] for v in point.values() if is_ref(v)]


def is_ref(value: Any) -> bool:
  """True for a value made by `ref`."""
  return isinstance(value, str) and value.startswith(REF_PREFIX)


def normalize(declaration: Any) -> list[Point]:
  """Validates what `get_sweep` returned and returns it as a fresh list of dicts.

  Raises ValueError for a non-list, a non-dict point, a bad key or value, two points
  that would share a run directory, or a `ref` to a point that is not earlier in the
  sweep.
  """
  if isinstance(declaration, dict) or not isinstance(declaration, (list, tuple)):
    raise ValueError(f"a sweep is a list of override dicts, got {type(declaration).__name__}")
  points = []
  for i, p in enumerate(declaration):
    if not isinstance(p, dict):
      raise ValueError(f"sweep point {i} is a {type(p).__name__}, not a dict of overrides")
    for k, v in p.items():
      _check_key(k)
      _check_value(k, v)
    points.append(dict(p))
  if not points:
    raise ValueError("the sweep has no points")
  seen: dict[str, Point] = {}
  for p in points:
    name = point_name(p)
    if name in seen:
      raise ValueError(f"sweep points {seen[name]} and {p} map to the same run "
                       f"directory {name!r}; drop the duplicate")
    for target in references(p):
      if target not in seen:
        raise ValueError(f"sweep point {p} refers to {target!r}, which is not an earlier "
                         "point of this sweep (list the referenced stage first)")
    seen[name] = p
  return points


def swept_keys(points: Sequence[Point]) -> list[str]:
  """Keys that appear in any point, in order of first appearance."""
  return list(dict.fromkeys(k for p in points for k in p))


def format_value(value: Any) -> str:
  """A value as `--config.KEY=VALUE` text that absl/ml_collections parses back.

  Tuples and lists become Python literals without spaces, `(1,2)`, `('a','b')`, `(4,)`.
  """
  if isinstance(value, (tuple, list)):
    inner = ",".join(repr(v) for v in value)
    return f"({inner},)" if len(value) == 1 else f"({inner})"
  if isinstance(value, float):
    return repr(value)
  return str(value)


def point_name(point: Point) -> str:
  """A readable, stable directory name: `quant.bits=4,seed=1` (keys sorted).

  When a value holds characters unsafe in a path (or the name grows too long) they are
  replaced by `_` and a short hash of the exact overrides is appended, so distinct
  points never collide and a point's name depends on nothing but its own overrides.
  """
  if not point:
    return BASE_NAME
  parts, lossy = [], False
  for key in sorted(point):
    text = format_value(point[key])
    if is_ref(point[key]):  # a short stable stand-in for the referenced point's name
      text = "from-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    safe = _SAFE_VALUE_RE.sub("_", text)
    lossy |= safe != text
    parts.append(f"{key}={safe}")
  name = ",".join(parts)
  if lossy or len(name) > _MAX_NAME_CHARS:
    canonical = json.dumps(point, sort_keys=True)
    digest = hashlib.sha1(canonical.encode()).hexdigest()[:8]
    name = f"{name[:_MAX_NAME_CHARS]}~{digest}"
  return name


def _points(sweep: Sequence[Point]) -> list[Point]:
  if isinstance(sweep, dict) or not isinstance(sweep, (list, tuple)):
    raise ValueError(f"expected a list of points (e.g. from axis()), got {sweep!r}")
  return list(sweep)


def _merge(a: Point, b: Point, op: str) -> Point:
  overlap = a.keys() & b.keys()
  if overlap:
    raise ValueError(f"{op}: key(s) {sorted(overlap)} set by more than one sweep")
  return {**a, **b}


def _check_key(key: Any) -> None:
  if not isinstance(key, str) or not _KEY_RE.match(key):
    raise ValueError(f"sweep key {key!r} is not a dotted config key like 'quant.bits'")


def _check_value(key: str, value: Any) -> Any:
  if key == ARG_KEY and not (isinstance(value, str) and value and ":" not in value):
    raise ValueError(f"sweep value {value!r} for {ARG_KEY!r} must be a non-empty str "
                     "without ':' (it becomes --config=FILE:ARG)")
  # Only what `--config.KEY=VALUE` can carry and JSON can record.
  scalar = (bool, int, float, str, type(None))
  ok = isinstance(value, scalar) or (
      isinstance(value, (tuple, list)) and all(isinstance(v, scalar) for v in value))
  if not ok:
    raise ValueError(f"sweep value {value!r} for {key!r}: use a bool, int, float, str, None "
                     "or a tuple of those")
  return value
