r"""Weight-only PTQ of all-MiniLM-L6-v2: float vs RTN vs GPTQ vs AWQ, on stdlib sentences.

    python -m experiments.ptq_minilm_probe [--bits=4] [--group_size=128] [--symmetric]
        [--methods=rtn,gptq,gptq_act_order,awq,awq_gptq] [--sequential] [--out=probe.json]

Quantizes the 36 Dense/DenseGeneral kernels of the 6 blocks (attention q, k, v, out;
MLP fc1, fc2; the embeddings stay float) by each method, applied directly to the float
params (no transform glue: each kernel is replaced by its fake-quantized version), and
compares sentence embeddings with float on the 700 evaluation sentences
(`experiments.pretrained.sentences`): mean / min cosine, top-1 / top-10 nearest-neighbour
agreement. Calibration: 128 disjoint sentences. `--sequential` collects each block's
statistics with the blocks before it already quantized (as GPTQ's paper does); otherwise
all statistics come from one float pass. RTN is also run through `jq.quantize_model` +
`jq.convert` for stored bytes (`jq.size_report`) and serving forward time / float.
About 2-4 minutes on a 2-core CPU.
"""
from __future__ import annotations

import json
import time

from absl import app, flags
import jax
import numpy as np

import jaxquant as jq
from experiments.pretrained import calib, metrics, minilm, sentences
from experiments.pretrained import tokenizer as tk

FLAGS = flags.FLAGS
flags.DEFINE_integer("bits", 4, "Weight bits.")
flags.DEFINE_integer("group_size", 128, "Group size along the input rows (0: per channel).")
flags.DEFINE_bool("symmetric", True, "Symmetric grid (±(2^(b-1)-1)); else asymmetric.")
flags.DEFINE_list("methods", list(calib.METHODS), "Methods to run.")
flags.DEFINE_bool("sequential", False, "Block-by-block statistics on the quantized prefix.")
flags.DEFINE_integer("n_eval", 700, "Evaluation sentences.")
flags.DEFINE_integer("n_calib", 128, "Calibration sentences.")
flags.DEFINE_float("percdamp", 0.01, "GPTQ damping (fraction of mean diag H).")
flags.DEFINE_bool("serving", True, "Also measure bytes and speed of the RTN serving model.")
flags.DEFINE_string("out", "", "Write the results as JSON here.")

PATTERN = r"block_\d+/(attn/(query|key|value|out)|mlp/(fc1|fc2))"


def _spec():
  if FLAGS.group_size:
    return jq.QuantSpec(bits=FLAGS.bits, symmetric=FLAGS.symmetric, granularity="group",
                        group_size=FLAGS.group_size)
  return jq.QuantSpec(bits=FLAGS.bits, symmetric=FLAGS.symmetric)


def _run_method(method, spec, apply_eager, params, layers, calib_batches, num_layers):
  if method == "rtn":
    return calib.quantize_params(layers, params, {}, spec, "rtn")
  if not FLAGS.sequential:
    st = calib.layer_stats(apply_eager, {"params": params}, calib_batches, PATTERN)
    return calib.quantize_params(layers, {"params": params}["params"], st, spec, method,
                                 percdamp=FLAGS.percdamp)
  q_params, infos = params, {}
  for b in range(num_layers):
    block = {p: n for p, n in layers.items() if p.startswith(f"block_{b}/")}
    st = calib.layer_stats(apply_eager, {"params": q_params}, calib_batches, f"block_{b}/.*")
    q_params, info = calib.quantize_params(block, q_params, st, spec, method,
                                           percdamp=FLAGS.percdamp)
    infos.update(info)
  return q_params, infos


def main(argv):
  del argv
  t0 = time.time()
  model, params, tok = minilm.load()
  eval_s, calib_s = sentences.evaluation(FLAGS.n_eval), sentences.calibration(FLAGS.n_calib)
  fwd = jax.jit(model.apply)
  calib_batches = [(ids, mask) for _, ids, mask in tk.batches(tok, calib_s, 64)]
  layers = calib.dense_layers(model.apply, {"params": params}, *calib_batches[0], PATTERN)
  spec = _spec()
  f_emb = tk.embed(fwd, {"params": params}, tok, eval_s)
  results = {"spec": repr(spec), "sequential": FLAGS.sequential, "n_eval": len(eval_s),
             "n_calib": len(calib_s), "layers": len(layers),
             "python": sentences.describe()[0], "methods": {}}
  print(f"{len(layers)} layers, spec {spec}, {len(eval_s)} eval / {len(calib_s)} calib "
        f"sentences ({calib.token_count(m for _, m in calib_batches)} calib tokens)")
  for method in FLAGS.methods:
    t = time.time()
    q_params, infos = _run_method(method, spec, model.apply, params, layers, calib_batches,
                                  model.config.num_layers)
    m = metrics.compare(f_emb, tk.embed(fwd, {"params": q_params}, tok, eval_s))
    errs = [i["err"] for i in infos.values() if "err" in i]
    m["sum_layer_err"] = float(sum(errs)) if errs else None
    alphas = [i["alpha"] for i in infos.values() if "alpha" in i]
    if alphas:
      m["awq_alpha_mean"] = float(np.mean(alphas))
    m["seconds"] = time.time() - t
    results["methods"][method] = m
    print(f"{method:16s} cos mean {m['cos_mean']:.5f} min {m['cos_min']:.5f}  "
          f"top1 {m['top1']:.3f} top10 {m['top10']:.3f}  ({m['seconds']:.0f} s)", flush=True)
  if FLAGS.serving:
    results["serving"] = _serving(model, params, tok, eval_s, spec, f_emb)
  results["seconds"] = time.time() - t0
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(results, f, indent=1)


def _serving(model, params, tok, eval_s, spec, f_emb):
  """RTN through the library: bytes, agreement with the params path, forward time ratio."""
  qmodel = jq.quantize_model(model, [jq.Rule(PATTERN, weight=spec)])
  ids, mask = tok(eval_s[:64])
  variables = qmodel.init(jax.random.key(0), ids, mask)
  variables = {"params": params, **{k: v for k, v in variables.items() if k != "params"}}
  serve_model, serve_vars = jq.convert(qmodel, variables, ids, mask)
  report = jq.size_report(serve_vars)
  serve = jax.jit(serve_model.apply)
  s_emb = tk.embed(serve, serve_vars, tok, eval_s)
  fwd = jax.jit(model.apply)
  ratio = metrics.time_ratio(lambda: jax.block_until_ready(serve(serve_vars, ids, mask)),
                             lambda: jax.block_until_ready(fwd({"params": params}, ids, mask)))
  blocks = [t for t in report.tensors if t.path.startswith("block_")]
  out = {"rtn_serving": metrics.compare(f_emb, s_emb),
         "total_float_bytes": report.total_float_bytes,
         "total_stored_bytes": report.total_quantized_bytes,
         "blocks_float_bytes": sum(t.float_bytes for t in blocks),
         "blocks_stored_bytes": sum(t.quantized_bytes for t in blocks),
         "forward_time_ratio": ratio}
  print(f"RTN serving (jq.convert): cos mean {out['rtn_serving']['cos_mean']:.5f}  "
        f"bytes all {out['total_stored_bytes']:,}/{out['total_float_bytes']:,}  blocks "
        f"{out['blocks_stored_bytes']:,}/{out['blocks_float_bytes']:,}  "
        f"forward time / float {ratio:.2f} (batch of 64)")
  return out


if __name__ == "__main__":
  app.run(main)
