r"""Weight-only serving formulations, compared in one process (what `jq.convert` and
`jq.dot_general` choose, and why, on this CPU).

    python -m experiments.decode_layouts [--batches=1,2,4,8,33,128,512] [--rounds=60]

The benchmark MLP 1024→2048→2048→1024 (ReLU) with stored weights, against its float
forward, each path called with its weights rotating through 6 copies (so they are read
from memory, as in decode, not from cache), the call order shuffled every round (the
second-timed of two identical paths otherwise looks 0.1-0.16 faster). Ratios are median
times over the float forward's:
  kn          codes stored [K, N] (the Dense kernel's own layout)
  nk          codes stored [N, K] (what `jq.convert` stores for weight-only per-channel
              and per-tensor Dense kernels: `layout.decode_layout`)
  nk_float    nk, forced onto the float dot of the codes (the path above 32 rows
              without AMX int8 units)
  nk_sliced   nk, forced onto the sliced int8 dot (the path at every row count with
              AMX int8 units)
for int8 and int4 per-channel weights; int4 in groups of 128 keeps [K, N], so its rows
are kn, kn_float and kn_sliced.
Also printed: the largest difference between the kn and nk outputs (0: the same codes
and the same sums).
"""
from __future__ import annotations

import random
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant import layout
from experiments.benchmark import host_cpu
from experiments.benchmark_rows import DECODE_WEIGHTS, SIZES

FLAGS = flags.FLAGS
flags.DEFINE_list("batches", ["1", "2", "4", "8", "33", "128", "512"], "Rows per call.")
flags.DEFINE_integer("rounds", 60, "Timed rounds (median reported).")
flags.DEFINE_list("weights", ["w8", "w4", "w4g128"], "Weight formats (see "
                  "experiments.benchmark_rows.DECODE_WEIGHTS).")

COPIES = 6


def _mlp(dot, weights, biases, x):
  for i, (w, b) in enumerate(zip(weights, biases)):
    x = dot(x, w) + b[None, :]
    if i < len(weights) - 1:
      x = jax.nn.relu(x)
  return x


def _copies(tree):
  """COPIES distinct device copies of a pytree of arrays."""
  return [jax.tree.map(lambda a: jnp.array(a, copy=True), tree) for _ in range(COPIES)]


def _compiled(weights, x, biases, dims, sliced_rows=None):
  """The jitted serving MLP, compiled now with the sliced path's row limit forced to
  `sliced_rows` (None: the library's own choice, `jq.DotOptions.sliced_max_rows`)."""
  options = jq.DotOptions(sliced_max_rows=sliced_rows)
  dot = lambda a, q: jq.dot_general(a, q, dims, options=options)
  fn = jax.jit(lambda ws, x: _mlp(dot, ws, biases, x))
  return fn.lower(weights, x).compile()


def _timed(arms, x, rounds):
  """{name: median seconds}, each arm (fn, weight copies) called once per round, in a
  shuffled order, on its next weight copy."""
  for fn, copies in arms.values():
    jax.block_until_ready(fn(copies[0], x))
  times = {k: [] for k in arms}
  order = list(arms)
  for r in range(rounds):
    random.shuffle(order)
    for k in order:
      fn, copies = arms[k]
      t0 = time.perf_counter()
      jax.block_until_ready(fn(copies[r % COPIES], x))
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def run(batches, rounds, weight_names):
  keys = jax.random.split(jax.random.key(0), len(SIZES) - 1)
  floats = [jax.random.normal(k, (a, b)) * a ** -0.5
            for k, a, b in zip(keys, SIZES[:-1], SIZES[1:])]
  biases = [jnp.zeros((b,)) for b in SIZES[1:]]
  kn_dims, nk_dims = (((1,), (0,)), ((), ())), (((1,), (1,)), ((), ()))
  results = {}
  for name in weight_names:
    spec = DECODE_WEIGHTS[name]
    kn = [jq.quantize_weight(w, spec, jq.make_layout(2, (0,))).pack() for w in floats]
    # What jq.convert stores: [N, K] for per-channel scales, grouped ones kept [K, N].
    nk = None if spec.granularity == "group" else [layout.decode_layout(q) for q in kn]
    for b in batches:
      x = jax.random.normal(jax.random.key(b), (b, SIZES[0]))
      float_fn = jax.jit(lambda ws, x: _mlp(jnp.matmul, ws, biases, x))
      arms = {"float": (float_fn, _copies(floats)),
              "kn": (_compiled(kn, x, biases, kn_dims), _copies(kn))}
      stored, layout_name, dims = (kn, "kn", kn_dims) if nk is None else (nk, "nk", nk_dims)
      if nk is not None:
        arms["nk"] = (_compiled(nk, x, biases, nk_dims), _copies(nk))
      for path, rows in (("float", 0), ("sliced", b)):
        arms[f"{layout_name}_{path}"] = (_compiled(stored, x, biases, dims, sliced_rows=rows),
                                         _copies(stored))
      med = _timed(arms, x, rounds)
      row = {k: med[k] / med["float"] for k in arms if k != "float"}
      row["float_ms"] = med["float"] * 1e3
      if nk is not None:
        row["max_abs_kn_minus_nk"] = float(jnp.max(jnp.abs(
            arms["kn"][0](kn, x) - arms["nk"][0](nk, x))))
      results[f"{name}_b{b}"] = row
      print(f"{name}_b{b}: " + "  ".join(
          f"{k} {v:.3f}" if k != "max_abs_kn_minus_nk" else f"|kn-nk| {v:.1e}"
          for k, v in row.items()), flush=True)
  return results


def main(argv):
  del argv
  print(f"backend={jax.default_backend()} cpu={host_cpu()} jax={jax.__version__} "
        f"(ratio = path / float forward, median of {FLAGS.rounds})")
  run([int(b) for b in FLAGS.batches], FLAGS.rounds, FLAGS.weights)


if __name__ == "__main__":
  app.run(main)
