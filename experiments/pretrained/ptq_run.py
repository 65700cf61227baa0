"""PTQ of a pretrained encoder from a recipe: the pieces `experiments.minilm_ptq` (one run),
`experiments.embed` (embeddings of a file) and `experiments.minilm_study` share.

A recipe (configs/minilm_ptq.py) carries its rules in the config schema's dialect as
`config.quant.rules`; `recipe_rules` builds them with the trainer's rule builder.
"""
from __future__ import annotations

from typing import Any, Mapping

import jaxquant as jq
from experiments.pretrained import minilm, sentences, tokenizer
from experiments.training import config_build


def recipe_rules(config, overrides: Mapping[str, Any] = ()) -> list[jq.Rule]:
  """The `jq.Rule`s of `config.quant.rules` (ConfigError naming the key when one is bad).

  `overrides` are the command line's `--config.KEY` overrides: `variant` only records
  the config argument, so overriding it (which would leave the rules unchanged) is a
  ValueError that says to pass the variant as `--config=FILE:VARIANT`.
  """
  return config_build.variant_rules(config, "configs/minilm_ptq.py", overrides)


def quantize(model, params, tok, rules, calib_sentences, *, batch_size=64, mask_padding=True,
             calib_forward="quantized", progress=True):
  """(serving model, serving variables) of `model` under `rules`, calibrated on
  `calib_sentences` (padding tokens masked out of the statistics unless
  `mask_padding` is False; `calib_forward` is `jq.calibrate`'s `forward`)."""
  if not rules:
    return model, {"params": params}
  qmodel = jq.quantize_model(model, rules)
  batches = [(ids, mask) for _, ids, mask in tokenizer.batches(tok, calib_sentences, batch_size)]
  if progress:
    print(f"calibrating on {len(calib_sentences)} sentences ({len(batches)} batches)...",
          flush=True)
  masks = [mask for _, mask in batches] if mask_padding else None
  variables = jq.calibrate(qmodel, {"params": params}, batches, masks=masks,
                           forward=calib_forward)
  return jq.convert(qmodel, variables, *batches[0])


def quantized_encoder(config, rules, *, progress=True):
  """(model, params, tokenizer, serving model, serving variables) for one variant."""
  model, params, tok = minilm.load(config.model_dir or None)
  smodel, svars = quantize(model, params, tok, rules, sentences.calibration(config.n_calib),
                           batch_size=config.batch_size,
                           mask_padding=config.get("mask_padding", True),
                           calib_forward=config.get("calib_forward", "quantized"),
                           progress=progress)
  return model, params, tok, smodel, svars
