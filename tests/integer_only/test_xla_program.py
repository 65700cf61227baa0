"""How the JAX integer program compiles (jaxquant/integer_only/kernels.py, ops/matmul.py):
the activation products run as int8 dots with exact zero-point terms, and the fusion
fences keep the optimized HLO linear in depth, with values unchanged."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxquant as jq
from experiments.pretrained import minilm, minilm_integer
from jaxquant.integer_only import kernels
from jaxquant.integer_only.ops import matmul
from tests.experiments.pretrained.test_minilm_integer import TINY, tiny_ids
from tests.integer_only.int_helpers import numpy_runtime

# (a shape, b shape, contract_lhs, contract_rhs, batch_lhs, batch_rhs): attention's
# Q·Kᵀ and probs·V layouts, a batch axis between contracted ones, one batch axis.
LAYOUTS = [((2, 3, 5, 4), (2, 3, 6, 4), (3,), (3,), (0, 1), (0, 1)),
           ((2, 3, 5, 6), (2, 3, 6, 4), (3,), (2,), (0, 1), (0, 1)),
           ((2, 5, 3, 4), (2, 4, 3, 6), (3,), (1,), (0, 2), (0, 2)),
           ((2, 4, 7), (2, 4, 6), (1,), (1,), (0,), (0,))]


def _dot_operand_dtypes(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args)
  return [tuple(str(v.aval.dtype) for v in e.invars) for e in jaxpr.eqns
          if e.primitive.name == "dot_general"]


@pytest.mark.parametrize("layout", LAYOUTS, ids=["qk", "pv", "mid_batch", "rank3"])
def test_matmul_is_an_int8_dot_and_exact(layout):
  sa, sb, lc, rc, lb, rb = layout
  rng = np.random.default_rng(0)
  for za, zb in ((0, 0), (-10, -4), (21, -128), (-128, -128), (0, 127), (127, 0)):
    a = rng.integers(-128, 128, sa).astype(np.int8)
    b = rng.integers(-128, 128, sb).astype(np.int8)
    a.flat[0], b.flat[0] = -128, -128  # the extreme codes
    op = {"zp_a": za, "zp_b": zb, "contract_lhs": list(lc), "contract_rhs": list(rc),
          "batch_lhs": list(lb), "batch_rhs": list(rb)}
    run = lambda x, y, op=op: matmul.kernel(op, None, x, y)
    got = np.asarray(jax.jit(run)(jnp.asarray(a), jnp.asarray(b)))
    # numpy reference: the int64 contraction of the centered codes, output axes in
    # lax.dot_general order (batch, a's free, b's free).
    fa = [d for d in range(a.ndim) if d not in lc + lb]
    fb = [d for d in range(b.ndim) if d not in rc + rb]
    xa = np.transpose(a.astype(np.int64) - za, list(lb) + fa + list(lc))
    xb = np.transpose(b.astype(np.int64) - zb, list(rb) + list(rc) + fb)
    nb, k = len(lb), int(np.prod([a.shape[d] for d in lc]))
    xa = xa.reshape(xa.shape[:nb + len(fa)] + (k,))
    xb = xb.reshape(xb.shape[:nb] + (k,) + xb.shape[nb + len(rc):])
    bat = list(range(nb))
    fla, flb = [10 + i for i in range(len(fa))], [20 + i for i in range(len(fb))]
    ref = np.einsum(xa, bat + fla + [30], xb, bat + [30] + flb, bat + fla + flb)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, ref)
    assert _dot_operand_dtypes(run, jnp.asarray(a), jnp.asarray(b)) == [("int8", "int8")]


def test_matmul_of_wider_codes_takes_the_int32_dot():
  a = np.arange(-6, 6, dtype=np.int16).reshape(1, 3, 4) * 1000
  b = np.arange(8, dtype=np.int8).reshape(1, 4, 2)
  op = {"zp_a": 5, "zp_b": -3, "contract_lhs": [2], "contract_rhs": [1], "batch_lhs": [0],
        "batch_rhs": [0]}
  got = np.asarray(matmul.kernel(op, None, jnp.asarray(a), jnp.asarray(b)))
  np.testing.assert_array_equal(got, (a.astype(np.int64) - 5) @ (b.astype(np.int64) + 3))


def _tiny_program(layers):
  config = dataclasses.replace(TINY, num_layers=layers)
  rng = np.random.default_rng(0)
  calib = [tiny_ids(rng, 8) for _ in range(2)]
  params = jax.jit(minilm.MiniLM(config).init)(
      jax.random.key(0), calib[0], (calib[0] != 0).astype(np.int32))["params"]
  return jq.to_integer(minilm_integer.IdsMiniLM(config), {"params": params}, calib,
                       residual_bits=16), rng


def _hlo_lines(program, ids):
  return len(program._jit.lower(program._arrays, program._one, ids).compile()
             .as_text().splitlines())


def test_fences_keep_the_program_linear_in_depth(tmp_path):
  """Without the fences each layer's fusions recompute the residual stream from the
  embedding on: the optimized HLO of 2 tiny MiniLM layers was 2.5 times that of 1 layer
  (30188 vs 12098 lines), 4.6 times at 3 layers. With them a layer adds at most what the
  whole 1-layer program holds."""
  one, _ = _tiny_program(1)
  two, rng = _tiny_program(2)
  ids = tiny_ids(rng, 4)
  fenced = kernels.fenced_tensors(two.graph)
  readers = {}
  for op in two.graph.ops:
    for name in op["in"]:
      readers.setdefault(name, set()).add(op["op"])
  requants = [op["out"] for op in two.graph.ops if op["op"] == "requant"]
  assert {t for t in requants if readers.get(t, set()) & {"add", "norm"}} <= fenced
  assert not {t for t in requants if readers.get(t, set()) <= {"dot", "matmul"}} & fenced
  assert _hlo_lines(two, ids) <= 2 * _hlo_lines(one, ids)
  y = np.asarray(two.run(ids))
  two.save(str(tmp_path))
  rt = numpy_runtime()
  np.testing.assert_array_equal(y, rt.run(rt.load(str(tmp_path)), ids))
