r"""Speed of jaxquant's int8 paths as ratios to float, measured in one process.

    python -m experiments.benchmark [--batch=512] [--repeats=15] [--json]

MLP 1024→2048→2048→1024 (ReLU) at batch 512 on the current backend. Each row is the
median time of a path divided by the median time of its float counterpart, timed
interleaved in the same process (ratio < 1 means faster than float):
  raw_s8_dot          lax s8×s8→s32 dot vs f32 dot, [512,2048]·[2048,2048] (the XLA limit)
  serving_w8a8        forward with int8 serving weights and dynamic per-row int8
                      activations vs the float forward
  qat_int8_forward    SGD train step, int8 forward dots, float backward dots (STE) vs the
                      float train step
  qat_int8_full       SGD train step, int8 forward and both int8 backward dots
                      (stochastic-rounded int8 gradients) vs the float train step
  integer_only_{mlp,cnn}_vs_float / _vs_w8a8
                      jq.to_integer program (int8 codes in, int32 logits out, every op
                      integer) vs the float Flax forward, and vs the dynamic W8A8 serving
                      model (jq.convert); MLP: the MLP above as experiments.models.MLP;
                      cnn: the MNIST-1D CNN (Greydanus 2020, 25 channels) on [batch, 40]
"""
from __future__ import annotations

import json
import statistics
import time

from absl import app, flags
import jax
import jax.numpy as jnp

import jaxquant as jq
from experiments.models import CNN1D, MLP

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 512, "Batch size (rows of the activations).")
flags.DEFINE_integer("repeats", 15, "Timed repetitions per path (median reported).")
flags.DEFINE_bool("json", False, "Print the results as JSON instead of a table.")

SIZES = (1024, 2048, 2048, 1024)


def _init(key):
  keys = jax.random.split(key, len(SIZES) - 1)
  return [jax.random.normal(k, (a, b), jnp.float32) * (2.0 / a) ** 0.5
          for k, a, b in zip(keys, SIZES[:-1], SIZES[1:])]


def _mlp(params, x, dot):
  for i, w in enumerate(params):
    x = dot(x, w)
    if i < len(params) - 1:
      x = jax.nn.relu(x)
  return x


def _float_dot(x, w):
  return x @ w


def _make_step(dot):
  def loss(params, x, y, key):
    return jnp.mean((_mlp(params, x, lambda a, w: dot(a, w, key)) - y) ** 2)

  @jax.jit
  def step(params, x, y, key):
    l, g = jax.value_and_grad(loss)(params, x, y, key)
    return [p - 1e-3 * gp for p, gp in zip(params, g)], l
  return step


def _time(fns_and_args, repeats):
  """Interleaved timing: one call of each function per round, median per function."""
  for fn, args in fns_and_args:  # compile + warm up
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
  times = [[] for _ in fns_and_args]
  for _ in range(repeats):
    for i, (fn, args) in enumerate(fns_and_args):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[i].append(time.perf_counter() - t0)
  return [statistics.median(t) for t in times]


def run(batch: int = 512, repeats: int = 15) -> dict:
  """Runs every comparison; returns {name: {'ratio', 'ms', 'baseline_ms'}}."""
  key = jax.random.key(0)
  params = _init(key)
  x = jax.random.normal(jax.random.key(1), (batch, SIZES[0]), jnp.float32)
  y = jax.random.normal(jax.random.key(2), (batch, SIZES[-1]), jnp.float32)
  results = {}

  # Raw XLA limit: s8×s8→s32 vs f32, same shapes.
  a8 = jax.random.randint(key, (batch, 2048), -127, 128, jnp.int8)
  b8 = jax.random.randint(key, (2048, 2048), -127, 128, jnp.int8)
  af, bf = a8.astype(jnp.float32), b8.astype(jnp.float32)
  dims = (((1,), (0,)), ((), ()))
  s8 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.int32))
  f32 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, dims))
  t_f, t_q = _time([(f32, (af, bf)), (s8, (a8, b8))], repeats)
  results["raw_s8_dot"] = (t_q, t_f)

  # Serving forward: weights quantized once (int8 per output channel), activations per row.
  w8 = jq.QuantSpec(bits=8)
  serving = [jq.quantize(w, w8, reduce_axes=(0,)) for w in params]
  act_spec = jq.DotSpec(lhs=jq.QuantSpec(bits=8), rhs=w8)
  sdot = lambda a, qw: jq.dot_general(a, qw, dims, act_spec)
  fwd_float = jax.jit(lambda p, x: _mlp(p, x, _float_dot))
  fwd_int = jax.jit(lambda p, x: _mlp(p, x, sdot))
  t_f, t_q = _time([(fwd_float, (params, x)), (fwd_int, (serving, x))], repeats)
  results["serving_w8a8"] = (t_q, t_f)

  # Train steps.
  float_step = _make_step(lambda a, w, k: a @ w)
  qat = jq.DotSpec(lhs=jq.QuantSpec(bits=8), rhs=w8)
  full = jq.DotSpec(lhs=jq.QuantSpec(bits=8), rhs=w8,
                    grad=jq.QuantSpec(bits=8, rounding="stochastic"))
  qat_step = _make_step(lambda a, w, k: jq.dot_general(a, w, dims, qat))
  full_step = _make_step(lambda a, w, k: jq.dot_general(a, w, dims, full, key=k))
  args = (params, x, y, key)
  t_f, t_q, t_full = _time([(float_step, args), (qat_step, args), (full_step, args)], repeats)
  results["qat_int8_forward"] = (t_q, t_f)
  results["qat_int8_full"] = (t_full, t_f)
  results.update(_integer_only_rows(batch, repeats))
  return {k: {"ratio": q / f, "ms": q * 1e3, "baseline_ms": f * 1e3} for k, (q, f) in results.items()}


def _integer_only_rows(batch: int, repeats: int) -> dict:
  """Integer-only programs vs float and vs dynamic W8A8 serving, same Flax models."""
  rows = {}
  w8a8 = [jq.Rule(".*", weight=jq.QuantSpec(bits=8), act=jq.QuantSpec(bits=8, granularity="tensor"))]
  cases = {"mlp": (MLP(num_classes=SIZES[-1], features=SIZES[1:-1]), (batch, SIZES[0])),
           "cnn": (CNN1D(num_classes=10), (batch, 40))}
  for name, (model, shape) in cases.items():
    x = jax.random.normal(jax.random.key(3), shape, jnp.float32)
    float_vars = model.init(jax.random.key(4), x)
    qmodel = jq.quantize_model(model, w8a8)
    qvars = qmodel.init(jax.random.key(4), x)
    serving_model, serving_vars = jq.convert(qmodel, qvars)  # dynamic activation ranges
    program = jq.to_integer(qmodel, qvars, [x])  # static ranges measured on x
    x_q = program.quantize_input(x)
    fwd_float = jax.jit(model.apply)
    fwd_w8a8 = jax.jit(serving_model.apply)
    t_f, t_s, t_i = _time([(fwd_float, (float_vars, x)), (fwd_w8a8, (serving_vars, x)),
                           (program.run, (x_q,))], repeats)
    rows[f"integer_only_{name}_vs_float"] = (t_i, t_f)
    rows[f"integer_only_{name}_vs_w8a8"] = (t_i, t_s)
  return rows


def main(argv):
  del argv
  res = run(FLAGS.batch, FLAGS.repeats)
  meta = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
          "jax": jax.__version__, "batch": FLAGS.batch, "repeats": FLAGS.repeats}
  if FLAGS.json:
    print(json.dumps({"meta": meta, "results": res}, indent=2))
    return
  print(f"backend={meta['backend']} device={meta['device']} jax={meta['jax']} "
        f"batch={FLAGS.batch} (median of {FLAGS.repeats}, ratio = path / float)")
  print(f"{'path':<28}{'ratio':>8}{'ms':>10}{'base ms':>10}")
  for k, v in res.items():
    print(f"{k:<28}{v['ratio']:>8.3f}{v['ms']:>10.2f}{v['baseline_ms']:>10.2f}")


if __name__ == "__main__":
  app.run(main)
