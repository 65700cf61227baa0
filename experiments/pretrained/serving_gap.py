r"""How far the serving model (after `jq.convert`) is from the QAT forward on MiniLM.

    python -m experiments.pretrained.serving_gap [--variant=w8a8] [--n_eval=700]

Both compute the same int8 codes and int32 sums in every layer, but XLA may fuse the
float epilogue (scales, bias) differently, ≤ 1 ulp apart, and in a deep network with
dynamic int8 activations one ulp can flip a downstream activation code. This prints how
many evaluation embeddings are bit-identical between the two, their cosine, and each
one's distance from the float model.
"""
from __future__ import annotations

from absl import app, flags
import jax
import numpy as np

import jaxquant as jq
from experiments.config_file import load_config_module
from experiments.pretrained import metrics, minilm, sentences, tokenizer
from experiments.pretrained.ptq_run import recipe_rules

_VARIANT = flags.DEFINE_enum("variant", "w8a8", ["w8a8", "w8", "w4_g128_rtn"],
                             "A configs/minilm_ptq.py variant that needs no calibration.")
_RECIPE = flags.DEFINE_string("recipe", "configs/minilm_ptq.py", "The PTQ recipe file.")
_N_EVAL = flags.DEFINE_integer("n_eval", 700, "Evaluation sentences.")


def gap(variant: str, n_eval: int, recipe: str = "configs/minilm_ptq.py") -> dict:
  """{identical, n, cos_mean, cos_min, qat_vs_float, serving_vs_float}."""
  model, params, tok = minilm.load(None)
  qmodel = jq.quantize_model(model, recipe_rules(load_config_module(recipe).get_config(variant)))
  evaluation = sentences.evaluation(n_eval)
  smodel, svars = jq.convert(qmodel, {"params": params}, *tok(evaluation[:8]))
  embed = lambda m, v: tokenizer.embed(jax.jit(m.apply), v, tok, evaluation, 64)
  e_float = embed(model, {"params": params})
  e_qat = embed(qmodel, {"params": params})
  e_serving = embed(smodel, svars)
  cos = metrics.cosine_to_float(e_qat, e_serving)
  return {"identical": int(np.sum(np.all(e_qat == e_serving, axis=1))), "n": n_eval,
          "cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
          "qat_vs_float": metrics.compare(e_float, e_qat),
          "serving_vs_float": metrics.compare(e_float, e_serving)}


def main(argv):
  del argv
  r = gap(_VARIANT.value, _N_EVAL.value, _RECIPE.value)
  print(f"{_VARIANT.value}: {r['identical']} of {r['n']} embeddings bit-identical; "
        f"QAT vs serving cosine mean {r['cos_mean']:.6f}, min {r['cos_min']:.6f}")
  for name in ("qat_vs_float", "serving_vs_float"):
    print(name, {k: round(float(v), 5) for k, v in r[name].items()})


if __name__ == "__main__":
  app.run(main)
