r"""Measured errors of the I-BERT integer kernels against float64 references.

    python -m experiments.ibert_kernel_errors

Prints one markdown table: for each kernel (jaxquant/integer_only/ibert.py) the input
scale, the inputs, and the largest error against numpy float64 (math.erf for GELU), with
the error of the paper's float approximation alone where it has one. Every JAX output is
also checked bit for bit against the numpy twin (jaxquant/deploy/ibert_numpy.py).
"""
import math

import jax
import numpy as np

from jaxquant.deploy import ibert_numpy as twin
from jaxquant.integer_only import ibert
from jaxquant.integer_only import ibert_plans as P

ERF = np.vectorize(math.erf)


def _run(fn, np_fn, *args):
  got = np.asarray(jax.jit(fn)(*args))
  np.testing.assert_array_equal(got, np_fn(*args))
  return got


def main():
  rng = np.random.default_rng(0)
  rows = []
  # i-exp on int8-scale inputs and on int32 Q·Kᵀ-scale inputs.
  p = np.linspace(-math.log(2), 0, 200001)
  poly = np.max(np.abs((0.3585 * (p + 1.353) ** 2 + 0.344) / np.exp(p) - 1))
  for scale, lo in ((0.05, -128), (6e-4, -10000)):
    plan = P.exp_plan(scale)
    q = np.arange(lo, 1, dtype=np.int32)
    got = _run(lambda v: ibert.i_exp(v, plan), lambda v: twin.i_exp(v, plan.as_dict()), q)
    rel = np.max(np.abs(got * plan.out_scale / np.exp(q * scale) - 1))
    rows.append(("i_exp", f"{scale:g}", f"q ∈ [{lo}, 0]", f"max rel {rel:.2e}",
                 f"poly on (−ln2, 0]: {poly:.2e}"))
  # i-softmax of Q·Kᵀ from int8 codes, d = 64, n = 128, 7-bit output codes.
  sq, sk, n, d = 0.05, 0.05, 128, 64
  qa, kb = (np.clip(np.round(rng.normal(0, 25, (16, n, d))), -128, 127).astype(np.int8)
            for _ in range(2))
  scores = np.einsum("bmk,bnk->bmn", qa.astype(np.int32), kb.astype(np.int32))
  scale = sq * sk / math.sqrt(d)
  plan = P.softmax_plan(scale, n, 7)
  got = _run(lambda v: ibert.i_softmax(v, plan), lambda v: twin.i_softmax(v, plan.as_dict()),
             scores)
  x = scores * scale
  ref = np.exp(x - x.max(-1, keepdims=True))
  ref /= ref.sum(-1, keepdims=True)
  err = np.max(np.abs(got * plan.out_scale - ref))
  rows.append(("i_softmax", f"{scale:.3g}", "16×128 rows of Q·Kᵀ (d=64), 7-bit out",
               f"max abs {err:.2e}", f"half an output code: {2 ** -8:.2e}"))
  # i-GELU over every int8 code.
  a, b = -0.2888, -1.769
  for scale in (0.02, 0.05):
    plan = P.gelu_plan(scale, scale)
    q = np.arange(-128, 128).astype(np.int8)
    acc = _run(lambda v: ibert.i_gelu_acc(v, plan),
               lambda v: twin.i_gelu_acc(v, plan.as_dict()), q)
    out = _run(lambda v: ibert.i_gelu(v, plan), lambda v: twin.i_gelu(v, plan.as_dict()), q)
    xs = q * scale
    ref = xs / 2 * (1 + ERF(xs / math.sqrt(2)))
    u = xs / math.sqrt(2)
    approx = xs / 2 * (1 + np.sign(u) * (a * (np.minimum(np.abs(u), -b) + b) ** 2 + 1))
    rows.append(("i_gelu", f"{scale:g}", "all int8 codes",
                 f"max abs int32 {np.max(np.abs(acc * plan.acc_scale - ref)):.2e}, "
                 f"int8 {np.max(np.abs(out * scale - ref)):.2e}",
                 f"paper's float i-GELU: {np.max(np.abs(approx - ref)):.2e}"))
  # Integer LayerNorm, n = 768, int8 inputs.
  n, scale, out_scale = 768, 0.05, 0.04
  gamma, beta = rng.normal(1, 0.2, n), rng.normal(0, 0.2, n)
  plan = P.layernorm_plan(scale, gamma, beta, out_scale)
  q = np.clip(np.round(rng.normal(0, 30, (32, n))), -128, 127).astype(np.int8)
  got = _run(lambda v: ibert.i_layernorm(v, plan),
             lambda v: twin.i_layernorm(v, plan.as_dict()), q)
  xs = q * scale
  ref = (xs - xs.mean(-1, keepdims=True)) / np.sqrt(xs.var(-1, keepdims=True) + 1e-5)
  ref = np.clip(ref * gamma + beta, -128 * out_scale, 127 * out_scale)
  err = np.max(np.abs(got * out_scale - ref)) / out_scale
  rows.append(("i_layernorm", f"{scale:g}", "32 rows × 768, out scale 0.04",
               f"max abs {err:.3f} output codes", "one rounding to codes: ≤ 1/2 + 2^-8"))
  # i-sqrt: exact.
  n_vals = rng.integers(0, 2 ** 31, 100000).astype(np.int32)
  got = _run(ibert.i_sqrt, twin.i_sqrt, n_vals)
  exact = np.array([math.isqrt(int(v)) for v in n_vals])
  rows.append(("i_sqrt", "-", "100000 random int32 n ≥ 0",
               f"{int(np.sum(got != exact))} mismatches vs math.isqrt", ""))
  print("| kernel | input scale | inputs | measured error | reference point |")
  print("|---|---|---|---|---|")
  for r in rows:
    print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
  main()
