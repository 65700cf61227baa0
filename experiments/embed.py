r"""Sentence embeddings of the pretrained MiniLM, quantized as a recipe variant.

    python -m experiments.embed --config=configs/minilm_ptq.py:VARIANT \
        --input=sentences.txt --output=embeddings.npy

INPUT is a UTF-8 file, one sentence per line (empty lines are kept as empty sentences,
so row i of the output is line i). OUTPUT gets float32 [N, 384] L2-normalized
embeddings. The model is calibrated on the recipe's own calibration split (never on the
input) and converted exactly as `experiments.minilm_ptq` does; a progress bar follows the
embedding batches. The `integer_only` variant builds the `jq.to_integer` program on the
same calibration split and embeds through it in the numpy runtime (bit-exact with the
JAX program; experiments/pretrained/minilm_integer.py).
"""
from __future__ import annotations

import os

from absl import app, flags
import jax
import numpy as np
import tqdm
from ml_collections import config_flags

from experiments.pretrained import minilm, minilm_integer, sentences, tokenizer
from experiments.pretrained.ptq_run import quantized_encoder, recipe_rules

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/minilm_ptq.py:VARIANT",
                                          lock_config=False)
_INPUT = flags.DEFINE_string("input", None, "UTF-8 text file, one sentence per line.")
_OUTPUT = flags.DEFINE_string("output", None, "Where to write the float32 [N, 384] .npy.")


def read_sentences(path: str):
  if not os.path.isfile(path):
    raise app.UsageError(f"--input={path!r} is not a file")
  with open(path, encoding="utf-8") as f:
    lines = f.read().splitlines()
  if not lines:
    raise app.UsageError(f"--input={path!r} holds no sentences")
  return lines


def main(argv):
  del argv
  config = _CONFIG.value
  if config is None or _INPUT.value is None or _OUTPUT.value is None:
    raise app.UsageError("--config, --input and --output are required")
  lines = read_sentences(_INPUT.value)
  try:
    rules = recipe_rules(config, config_flags.get_override_values(flags.FLAGS["config"]))
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if config.get("integer_only", False):  # the jq.to_integer program, then e = y/‖y‖
    model, params, tok = minilm.load(config.model_dir or None)
    program = minilm_integer.build(model, params, tok, sentences.calibration(config.n_calib),
                                   length=config.int_length, batch_size=config.batch_size,
                                   residual_bits=config.int_residual_bits)
    out = minilm_integer.embed(program, tok, lines, batch_size=config.batch_size,
                               runner=minilm_integer.numpy_runner(program))
    np.save(_OUTPUT.value, out)
    print(f"wrote {_OUTPUT.value}: {out.shape[0]} x {out.shape[1]} float32 (integer "
          "program)", flush=True)
    return
  _, _, tok, smodel, svars = quantized_encoder(config, rules)
  fn = jax.jit(smodel.apply)
  out = np.zeros((len(lines), 0), np.float32)
  n_batches = -(-len(lines) // config.batch_size)
  for idx, ids, mask in tqdm.tqdm(tokenizer.batches(tok, lines, config.batch_size),
                                  total=n_batches, desc="embedding", unit="batch"):
    e = np.asarray(fn(svars, ids, mask), np.float32)[:len(idx)]
    if out.shape[1] == 0:
      out = np.zeros((len(lines), e.shape[1]), np.float32)
    out[idx] = e
  np.save(_OUTPUT.value, out)
  print(f"wrote {_OUTPUT.value}: {out.shape[0]} x {out.shape[1]} float32", flush=True)


if __name__ == "__main__":
  app.run(main)
