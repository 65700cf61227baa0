"""The quantization state contract (`jaxquant.state`): every key beside 'params' is named
there and nowhere else in the library, and the transform, calibration, convert and the
integer-only view agree on it."""
import ast
import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import state
from jaxquant.integer_only import qat_view

KEYS = {state.QUANT, state.QUANT_STATS, state.KERNEL_AXES, state.INPUT_SCALE,
        *state.STATIC_RANGE}
PREFIXES = {state.observer_key(n, "") for n in (state.EMA, state.CALIBRATION, state.PTQ_STATS)}
PREFIXES |= {state.learned_key(o, "") for o in (state.WEIGHT, state.ACT)}
PREFIXES |= {p + f for p in list(PREFIXES) for f in ("lo", "hi", "count", "xtx", "lsq", "pact")}


def _key_literals(path):
  """(line, value) of string constants in a file that spell a state key or a key prefix."""
  hits = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
      if node.value in KEYS or node.value in PREFIXES:
        hits.append((node.lineno, node.value))
  return hits


def test_no_state_key_outside_the_contract():
  root = pathlib.Path(jq.__file__).parent
  hits = [(p.name, h) for p in root.rglob("*.py") if p.name != "state.py"
          for h in _key_literals(p)]
  assert hits == []
  assert _key_literals(root / "state.py")  # the check finds them


@pytest.mark.parametrize("ndim,contracting,batch", [(2, (0,), ()), (3, (2, 0), ()),
                                                    (4, (1,), (3, 0)), (3, (), (1,))])
def test_kernel_axes_round_trip(ndim, contracting, batch):
  w_layout = jq.make_layout(ndim, contracting, batch)
  assert state.layout_from_axes(state.kernel_axes(w_layout)) == w_layout


class Two(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(4, name="fc1")(nn.relu(nn.Dense(8, name="fc0")(x)))


def test_transform_calibrate_convert_and_integer_view_share_the_keys():
  rules = [jq.Rule("fc0", weight=jq.QuantSpec(bits=4, ste="lsq"),
                   act=jq.QuantSpec(bits=8, granularity="tensor", ste="pact")),
           jq.Rule("fc1", weight=jq.QuantSpec(bits=8),
                   act=jq.QuantSpec(bits=8, granularity="tensor"))]
  x = jnp.asarray(np.random.default_rng(0).standard_normal((5, 6)), jnp.float32)
  qmodel = jq.quantize_model(Two(), rules)
  # jit (eager dispatch compiles every op on its own) and a fast-compiling PRNG.
  v = jax.jit(qmodel.init)(jax.random.key(0, impl="unsafe_rbg"), x)
  quant, stats = v[state.QUANT], v[state.QUANT_STATS]
  assert set(quant["fc0"]) == {state.learned_key(state.WEIGHT, "lsq"),
                               state.learned_key(state.ACT, "pact")}
  ema = {state.observer_key(state.EMA, f) for f in ("lo", "hi", "count")}
  assert set(stats["fc1"]) == {state.KERNEL_AXES} | ema
  assert state.layout_from_axes(stats["fc0"][state.KERNEL_AXES]) == jq.make_layout(2, (0,))
  _, upd = jax.jit(functools.partial(qmodel.apply, mutable=[state.QUANT_STATS]))(v, x)
  assert int(upd[state.QUANT_STATS]["fc1"][state.observer_key(state.EMA, "count")]) == 1
  assert state.static_range(stats["fc1"]) is None
  # The EMA as a static range (integer-only view) and jq.calibrate's static range.
  as_static = qat_view.ema_as_static({**v, state.QUANT_STATS: upd[state.QUANT_STATS]})
  lo, hi = state.static_range(as_static[state.QUANT_STATS]["fc1"])
  ema_state = state.observer_state(state.EMA, upd[state.QUANT_STATS]["fc1"])
  assert (float(lo), float(hi)) == (float(ema_state["lo"]), float(ema_state["hi"]))
  cal = jq.calibrate(qmodel, v, [x])
  node = cal[state.QUANT_STATS]["fc1"]
  assert state.static_range(node) is not None and int(node[state.ACT_COUNT]) == 1
  assert not state.observer_state(state.CALIBRATION, node)  # turned into the static range
  assert qat_view.act_range(rules[1].act, cal, "fc1")[0] == "range"
  assert qat_view.act_range(rules[0].act, cal, "fc0")[0] == "learned"
  _, svars = jq.convert(qmodel, cal)
  assert state.learned_key(state.WEIGHT, "lsq") not in svars[state.QUANT]["fc0"]  # folded
  assert isinstance(svars["params"]["fc0"]["kernel"], jq.QTensor)


def test_observer_state_helpers():
  node = {"ema_lo": 1, "ema_hi": 2, "calib_hi": 3, "act_hi": 4, "act_lo": 0}
  assert state.observer_state(state.EMA, node) == {"lo": 1, "hi": 2}
  assert state.prefixed(state.EMA, {"lo": 1}) == {"ema_lo": 1}
  assert state.is_observer_key("calib_hi", (state.CALIBRATION,))
  assert not state.is_observer_key("act_hi", (state.CALIBRATION, state.EMA))
  assert state.static_range(node) == (0, 4) and state.is_layer_stats(node)
