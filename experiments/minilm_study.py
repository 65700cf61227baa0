r"""Studies of PTQ choices on all-MiniLM-L6-v2, several variants in one process.

    python -m experiments.minilm_study --split=dev --variants=w4_g128_gptq,w4_g128_gptq@float
    python -m experiments.minilm_study --split=eval --sensitivity

Variants are names from `configs/minilm_ptq.py` (VARIANTS and EXTRA), each optionally
suffixed by calibration options: `@float` (`jq.calibrate(forward='float')`),
`@nomask` (padding tokens kept in the statistics).

Splits, so that choices are never tuned on the evaluation sentences:
  dev   calibrate on the first 192 calibration sentences, score on the other 100
        calibration sentences (choices are made here).
  eval  calibrate on the recipe's 256 calibration sentences, score on the 700
        evaluation sentences (the numbers RESULTS.md reports).

`--sensitivity`: W8A8 (per-token dynamic activations) on one layer type at a time
(query, key, value, out, fc1, fc2 of all 6 blocks), and split into its weight-only (W8)
and activation-only (A8) parts: where the W8A8 error comes from.
Scores: mean / min cosine to the float embeddings and top-1 / top-10 agreement.
"""
from __future__ import annotations

import json
import time

from absl import app, flags
import jax

import jaxquant as jq
from experiments.config_file import load_config_module
from experiments.pretrained import metrics, minilm, sentences, tokenizer
from experiments.pretrained.ptq_run import quantize, recipe_rules
from experiments.training import config_build
from experiments.training.schema import quant_rule

_RECIPE = flags.DEFINE_string("recipe", "configs/minilm_ptq.py", "The PTQ recipe file: "
                              "its get_config(VARIANT), VARIANTS, EXTRA, w8 and a8_token.")
_SPLIT = flags.DEFINE_enum("split", "dev", ["dev", "eval"], "Which sentences score.")
_VARIANTS = flags.DEFINE_list("variants", [], "Variant names (see the module docstring).")
_SENSITIVITY = flags.DEFINE_bool("sensitivity", False, "Per-layer-type W8A8 sensitivity.")
_OUT = flags.DEFINE_string("out", "", "Write the results as JSON here.")

LAYER_TYPES = ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/fc1", "mlp/fc2")


_RECIPES: dict = {}


def _recipe():
  """The recipe module named by --recipe (loaded once)."""
  if _RECIPE.value not in _RECIPES:
    _RECIPES[_RECIPE.value] = load_config_module(_RECIPE.value)
  return _RECIPES[_RECIPE.value]


def splits(split: str):
  """(calibration sentences, scored sentences) of a split."""
  if split == "dev":
    pool = sentences.calibration(292)
    return pool[:192], pool[192:]
  return sentences.calibration(256), sentences.evaluation(700)


def variant_rules(name: str):
  """(rules, calibration options) of 'NAME[@float][@nomask]'."""
  base, *opts = name.split("@")
  names = (*_recipe().VARIANTS, *_recipe().EXTRA)
  if base not in names:
    raise ValueError(f"variant {base!r} is not one of {sorted(names)}")
  unknown = set(opts) - {"float", "nomask"}
  if unknown:
    raise ValueError(f"unknown options {sorted(unknown)} in {name!r}; use @float, @nomask")
  return recipe_rules(_recipe().get_config(base)), {
      "calib_forward": "float" if "float" in opts else "quantized",
      "mask_padding": "nomask" not in opts}


def sensitivity_variants():
  """{name: rules}: W8A8, W8 and A8 on one layer type at a time."""
  recipe, out = _recipe(), {}
  for t in LAYER_TYPES:
    pattern = rf"block_\d+/{t}"
    short = t.split("/")[1]
    for kind, weight, act in (("w8a8", recipe.w8(), recipe.a8_token()),
                              ("w8", recipe.w8(), None), ("a8", None, recipe.a8_token())):
      out[f"{kind}:{short}"] = config_build.rules_from_list(
          [quant_rule(pattern, weight=weight, act=act)], f"sensitivity[{kind}:{short}]")
  return out


def main(argv):
  del argv
  model, params, tok = minilm.load()
  calib, scored = splits(_SPLIT.value)
  fwd = jax.jit(model.apply)
  e_float = tokenizer.embed(fwd, {"params": params}, tok, scored, 64)
  runs = {name: variant_rules(name) for name in _VARIANTS.value}
  if _SENSITIVITY.value:
    runs.update({k: (v, {}) for k, v in sensitivity_variants().items()})
  results = {"split": _SPLIT.value, "n_calib": len(calib), "n_scored": len(scored),
             "variants": {}}
  for name, (rules, options) in runs.items():
    t = time.time()
    smodel, svars = quantize(model, params, tok, rules, calib, progress=False, **options)
    e = tokenizer.embed(jax.jit(smodel.apply), svars, tok, scored, 64)
    m = metrics.compare(e_float, e)
    m["stored_bytes"] = jq.size_report(svars).total_quantized_bytes
    m["seconds"] = round(time.time() - t, 1)
    results["variants"][name] = m
    print(f"{name:28s} cos {m['cos_mean']:.5f} min {m['cos_min']:.4f} top1 {m['top1']:.3f} "
          f"top10 {m['top10']:.3f} bytes {m['stored_bytes']:,} ({m['seconds']} s)", flush=True)
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
