"""jq.DotOptions: each option changes the formulation that runs (a different jaxpr), never
the result beyond the documented tolerance (float32 rounding on the weight-only paths,
bit-identical where the integer sums are exact); bad options are refused by name."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from jaxquant import dot as qdot
from jaxquant import dot_options
from tests.test_dot_general import iter_eqns, rng_x

DIMS = (((1,), (0,)), ((), ()))
K, N = 64, 24


def _s8_dots(jaxpr):
  return [e for e in iter_eqns(jaxpr) if e.primitive.name == "dot_general"
          and e.invars[0].aval.dtype == jnp.int8]


def _conds(jaxpr):
  return [e for e in iter_eqns(jaxpr) if e.primitive.name == "cond"]


def _within_rounding(out, x, q):
  """|out − x·deq(w)| ≤ 4·K·2^-24·Σ|x||w| per output (float64 reference): the tolerance
  `DotOptions` documents for the weight-only paths."""
  w = np.asarray(q.dequantize(jnp.float32), np.float64)
  x = np.asarray(x, np.float64)
  bound = 4 * x.shape[1] * 2.0 ** -24 * (np.abs(x) @ np.abs(w)) + 1e-30
  return np.all(np.abs(np.asarray(out, np.float64) - x @ w) <= bound)


@pytest.mark.parametrize("spec", [jq.QuantSpec(bits=8),
                                  jq.QuantSpec(bits=4, granularity="group", group_size=16,
                                               symmetric=False)], ids=["int8", "int4_g16"])
def test_sliced_max_rows_picks_the_weight_only_path_and_keeps_the_result(spec):
  """At 8 rows the default takes the sliced int8 dot (a cond: the float dot is the
  NaN / Inf branch); sliced_max_rows=0 runs only the float dot of the codes. At 40 rows
  (above the default 32, on a host without AMX) sliced_max_rows=40 takes the slices.
  Every output is the dequantize-then-dot one to float32 rounding."""
  q = jq.quantize_weight(rng_x((K, N), 1), spec, jq.make_layout(2, (0,))).pack()
  no_amx = dict(amx_int8=False)
  for rows, options, sliced in ((8, jq.DotOptions(**no_amx), True),
                                (8, jq.DotOptions(sliced_max_rows=0), False),
                                (40, jq.DotOptions(**no_amx), False),
                                (40, jq.DotOptions(sliced_max_rows=40), True)):
    x = rng_x((rows, K), rows)
    fn = lambda x, q, o=options: jq.dot_general(x, q, DIMS, options=o)
    jaxpr = jax.make_jaxpr(fn)(x, q).jaxpr
    assert bool(_s8_dots(jaxpr)) == sliced and bool(_conds(jaxpr)) == sliced, (rows, options)
    assert _within_rounding(jax.jit(fn)(x, q), x, q), (rows, options)


def test_options_are_static_a_jitted_caller_is_traced_again_for_other_options():
  """The same jitted function called with two options runs two programs (no stale cache
  entry), and the eager compiled call keys its cache on the options too."""
  q = jq.quantize_weight(rng_x((K, N), 2), jq.QuantSpec(bits=8), jq.make_layout(2, (0,)))
  x = rng_x((4, K), 3)
  traced = []
  def fn(x, q, options):
    traced.append(options)
    return jq.dot_general(x, q, DIMS, options=options)
  jitted = jax.jit(fn, static_argnames="options")
  sliced, float_only = jq.DotOptions(sliced_max_rows=64), jq.DotOptions(sliced_max_rows=0)
  out_s, out_f = jitted(x, q, options=sliced), jitted(x, q, options=float_only)
  jitted(x, q, options=jq.DotOptions(sliced_max_rows=0))  # equal options: cached
  assert traced == [sliced, float_only]
  assert _within_rounding(out_s, x, q) and _within_rounding(out_f, x, q)
  compiled = qdot.dot_general_compiled
  compiled.jitted.clear_cache()  # whatever ran before in this worker
  before = compiled.jitted._cache_size()  # pylint: disable=protected-access
  for options in (sliced, float_only):
    eager = compiled(x, q, dimension_numbers=DIMS, options=options)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted(x, q, options=options)))
  assert compiled.jitted._cache_size() == before + 2  # pylint: disable=protected-access


def test_barriers_option_reaches_w8a8_serving_einsum_and_layers():
  """int_dot_barriers=True puts the s8 dot of W8A8 serving between optimization barriers
  through `jq.einsum` and `jq.make_dot_general` (an nn.Dense) alike, with identical
  outputs."""
  w = rng_x((K, N), 4)
  x = rng_x((5, K), 5)
  spec = jq.DotSpec(lhs=jq.QuantSpec(bits=8), rhs=jq.QuantSpec(bits=8))
  q = jq.quantize_weight(w, spec.rhs, jq.make_layout(2, (0,)))
  dense = lambda o: nn.Dense(N, use_bias=False, dot_general=jq.make_dot_general(
      spec, weight=q, options=o))
  params = {"params": {"kernel": w}}
  calls = {
      "einsum": lambda o: (lambda x: jq.einsum("mk,kn->mn", x, q, spec, options=o)),
      "dense": lambda o: (lambda x: dense(o).apply(params, x)),
  }
  for name, make in calls.items():
    outs = []
    for barriers in (False, True):
      fn = make(jq.DotOptions(int_dot_barriers=barriers))
      names = [e.primitive.name for e in iter_eqns(jax.make_jaxpr(fn)(x).jaxpr)]
      assert names.count("optimization_barrier") == (2 if barriers else 0), name
      outs.append(np.asarray(jax.jit(fn)(x)))
    np.testing.assert_array_equal(outs[0], outs[1], err_msg=name)


def test_default_sliced_rows_follow_the_backend_and_amx():
  """None keeps the library's choice: 32 rows without AMX; with AMX on the CPU every row
  count for one group and max(32, 1024 / groups) rows for grouped scales."""
  assert jq.DotOptions(amx_int8=False).max_sliced_rows(1) == 32
  assert jq.DotOptions(amx_int8=False).max_sliced_rows(16) == 32
  if jax.default_backend() == "cpu":
    assert jq.DotOptions(amx_int8=True).max_sliced_rows(1) == float("inf")
    assert jq.DotOptions(amx_int8=True).max_sliced_rows(4) == 256
    assert jq.DotOptions(amx_int8=True).max_sliced_rows(64) == 32
  assert jq.DotOptions(sliced_max_rows=7, amx_int8=True).max_sliced_rows(1) == 7
  assert jq.DotOptions(int_dot_barriers=True).barriers()
  assert jq.DotOptions().barriers() == (jax.default_backend() != "cpu")
  with open("/proc/cpuinfo", encoding="utf-8") as f:
    amx = any(l.startswith("flags") and "amx_int8" in l.split() for l in f)
  assert dot_options.cpu_has_amx_int8() == amx


@pytest.mark.parametrize("field, value", [("sliced_max_rows", -1), ("sliced_max_rows", 2.5),
                                          ("sliced_max_rows", True), ("int_dot_barriers", 1),
                                          ("amx_int8", "yes")])
def test_bad_options_are_refused_naming_the_field(field, value):
  with pytest.raises(ValueError, match=f"DotOptions.{field}="):
    jq.DotOptions(**{field: value})


def test_options_must_be_a_dot_options():
  x, w = rng_x((2, K), 6), rng_x((K, N), 7)
  with pytest.raises(ValueError, match="must be a jaxquant.DotOptions"):
    jq.dot_general(x, w, DIMS, jq.DotSpec(lhs=jq.QuantSpec()),
                   options={"sliced_max_rows": 0})
