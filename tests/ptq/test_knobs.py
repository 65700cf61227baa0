"""Every PTQ knob reaches its algorithm through the rule path: for GPTQ's percdamp and
act_order, AWQ's grid and SmoothQuant's alpha, the codes, scales and input scale that
`jq.Rule(..., ptq=jq.PTQ(knob=v))` + calibrate + convert store at a non-default v equal
a direct call of the algorithm at v, and differ from its result at the default (so a
rule path that ignored the knob would fail)."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant.ptq import awq as awq_lib
from jaxquant.ptq import gptq as gptq_lib
from jaxquant.ptq import smoothquant as sq_lib
from jaxquant.ptq import stats as ptq_stats
from tests.ptq.test_rules import PARAMS, W4, X, _serve

W8 = jq.QuantSpec(bits=8)
A8 = jq.QuantSpec(bits=8, granularity="tensor")
DEFAULT = jq.PTQ()


def _stats(variables, layer="fc0"):
  st = variables["quant_stats"][layer]
  return ptq_stats.Stats(st["ptq_xtx"], st["ptq_abs_sum"], st["ptq_abs_max"], st["ptq_count"])


def _direct(ptq, stats, w):
  """(codes, dequantized weight, input scale or None) of a direct call at `ptq`."""
  if ptq.method == "gptq":
    q = gptq_lib.gptq(w, ptq_stats.hessian(stats), W4, percdamp=ptq.percdamp,
                      act_order=ptq.act_order).qtensor
    return q.values, jq.dequantize(q), None
  if ptq.method == "awq":
    res = awq_lib.awq_search(w, stats.xtx, ptq_stats.mean_abs(stats), W4, grid=ptq.grid)
    return res.qtensor.values, jq.dequantize(res.qtensor), res.scale
  s = sq_lib.smoothquant_scales(stats.abs_max, w, ptq.alpha)
  q, _ = awq_lib.scaled_quantize(w, s, W8)
  return q.values, jq.dequantize(q), s


CASES = {  # knob at a non-default value
    "gptq_percdamp": (jq.PTQ(method="gptq", percdamp=0.5), None),
    "gptq_act_order": (jq.PTQ(method="gptq", act_order=False), None),
    "awq_grid": (jq.PTQ(method="awq", grid=3), None),
    "smoothquant_alpha": (jq.PTQ(method="smoothquant", alpha=0.9), A8),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_knob_reaches_the_algorithm(name):
  ptq, act = CASES[name]
  weight = W8 if ptq.method == "smoothquant" else W4
  _, served, calibrated = _serve([jq.Rule("fc0", weight=weight, act=act, ptq=ptq)])
  stats, w = _stats(calibrated), jnp.asarray(PARAMS["fc0"]["kernel"])
  codes, deq, s = _direct(ptq, stats, w)
  stored = served["params"]["fc0"]["kernel"]
  stored_codes = np.asarray(stored.unpacked().values)
  stored_deq = np.asarray(jq.dequantize(stored))
  if stored.shape != tuple(w.shape):  # weight-only per-channel: stored as [N, K]
    stored_codes, stored_deq = stored_codes.T, stored_deq.T
  np.testing.assert_array_equal(stored_codes, np.asarray(codes))
  np.testing.assert_allclose(stored_deq, np.asarray(deq), rtol=1e-6, atol=1e-7)
  if s is not None:
    np.testing.assert_allclose(served["quant_stats"]["fc0"]["input_scale"], s, rtol=1e-6)
  # The knob matters here: the default value gives other codes or another input scale.
  knob = {"gptq_percdamp": "percdamp", "gptq_act_order": "act_order", "awq_grid": "grid",
          "smoothquant_alpha": "alpha"}[name]
  default = dataclasses.replace(ptq, **{knob: getattr(DEFAULT, knob)})
  codes0, _, s0 = _direct(default, stats, w)
  differs = not np.array_equal(np.asarray(codes0), np.asarray(codes)) or (
      s is not None and not np.allclose(np.asarray(s0), np.asarray(s)))
  assert differs, f"{knob} at {getattr(ptq, knob)} gives the default's result on this layer"
