r"""One post-training quantization run of the pretrained MiniLM encoder, as a trainer.

    python -m experiments.minilm_ptq --config=configs/minilm_ptq.py:w4_g128_gptq --workdir=DIR

Loads the model, `jq.calibrate`s it on the recipe's calibration sentences (the rules'
PTQ algorithms collect their statistics there), `jq.convert`s it, embeds the evaluation
sentences with the float and the converted model, and writes DIR/summary.json in the
trainer's format (`config`, `metrics`, `param_bytes`, `wall_time_s`), so
`experiments.sweep --trainer=experiments.minilm_ptq` and `experiments.report` work unchanged.
"""
from __future__ import annotations

import os
import time

from absl import app, flags
import jax
from ml_collections import config_flags

import jaxquant as jq
from experiments.pretrained import metrics, sentences, tokenizer
from experiments.pretrained.ptq_run import quantized_encoder, recipe_rules
from experiments.training.config_build import config_to_dict
from experiments.training.results import write_summary

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/minilm_ptq.py:VARIANT",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (created if missing).")


def main(argv):
  del argv
  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None or workdir is None:
    raise app.UsageError("--config and --workdir are required")
  start = time.time()
  try:  # a bad rule or override is refused before the workdir is made
    rules = recipe_rules(config, config_flags.get_override_values(flags.FLAGS["config"]))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  os.makedirs(workdir, exist_ok=True)
  model, params, tok, smodel, svars = quantized_encoder(config, rules)
  evaluation = sentences.evaluation(config.n_eval)
  f_float = jax.jit(model.apply)
  f_quant = jax.jit(smodel.apply)
  e_float = tokenizer.embed(f_float, {"params": params}, tok, evaluation, config.batch_size)
  e_quant = tokenizer.embed(f_quant, svars, tok, evaluation, config.batch_size)
  result = metrics.compare(e_float, e_quant)
  ids, mask = tok(evaluation[:config.batch_size])
  ratio = metrics.time_ratio(lambda: f_quant(svars, ids, mask).block_until_ready(),
                             lambda: f_float({"params": params}, ids, mask).block_until_ready())
  report = jq.size_report(svars)
  summary = {
      "config": config_to_dict(config),
      "metrics": {**{k: float(v) for k, v in result.items()}, "time_vs_float": ratio},
      "param_bytes": {"float": report.total_float_bytes,
                      "quantized": report.total_quantized_bytes},
      "wall_time_s": round(time.time() - start, 3),
      "quantized": bool(rules),
  }
  write_summary(workdir, summary)
  print({k: round(v, 5) for k, v in summary["metrics"].items()}, flush=True)


if __name__ == "__main__":
  app.run(main)
