"""PTQ of a pretrained encoder from a recipe: the pieces `experiments.ptq` (one run)
and `experiments.embed` (embeddings of a file) share."""
from __future__ import annotations

import importlib.util

import jaxquant as jq
from experiments.pretrained import minilm, sentences, tokenizer


def recipe_rules(config_path: str, config):
  """The recipe module's `rules(config)` (config files are modules with get_config)."""
  path = config_path.split(":")[0]
  spec = importlib.util.spec_from_file_location("ptq_recipe", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.rules(config)


def quantized_encoder(config, rules, *, progress=True):
  """(model, params, tokenizer, serving model, serving variables) for one variant."""
  model, params, tok = minilm.load(config.model_dir or None)
  if not rules:
    return model, params, tok, model, {"params": params}
  qmodel = jq.quantize_model(model, rules)
  calib = sentences.calibration(config.n_calib)
  batches = [(ids, mask) for _, ids, mask in tokenizer.batches(tok, calib, config.batch_size)]
  if progress:
    print(f"calibrating on {len(calib)} sentences ({len(batches)} batches)...", flush=True)
  # Padding tokens are masked out of every statistic (ranges, XᵀX, Σ|x|, max|x|).
  variables = jq.calibrate(qmodel, {"params": params}, batches,
                           masks=[mask for _, mask in batches])
  smodel, svars = jq.convert(qmodel, variables, *batches[0])
  return model, params, tok, smodel, svars
