"""The pieces `experiments.lm_eval` and `experiments.generate` share: load the GGUF model,
read the text, quantize a recipe's variant (calibrated on its calibration split)."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

import jaxquant as jq
from experiments.pretrained import gguf_llama, rotation, shakespeare
from experiments.pretrained.perplexity import windows
from experiments.training import config_build


def recipe_rules(config, overrides: Mapping[str, Any] = ()) -> List[jq.Rule]:
  """The `jq.Rule`s of `config.quant.rules` (a ConfigError naming the key when one is
  bad). `overrides` are the command line's `--config.KEY` overrides: `variant` only
  records the config argument, so overriding it is refused."""
  return config_build.variant_rules(config, "configs/smollm2.py", overrides)


def load_model(config):
  """(model, float params, LlamaGGUF) of `config.gguf_path` ('' = the SmolLM2 package),
  the model's KV cache quantized to `config.kv_bits` (0 = float), keys per channel in
  groups of `config.kv_key_group` tokens when that is > 0 (else per token; the unfinished
  group read as codes when `config.kv_key_requant`);
  QuaRot-rotated (`experiments.pretrained.rotation`: online Hadamards on, an untied head)
  when `config.rotate` is true."""
  model, params, gg = gguf_llama.load(config.gguf_path or None)
  if config.get("rotate", False):
    model, params = rotation.rotate(model, params, seed=int(config.get("rotation_seed", 0)))
  model = model.clone(kv_bits=int(config.kv_bits),
                      kv_key_group=int(config.get("kv_key_group", 0)),
                      kv_key_requant=bool(config.get("kv_key_requant", False)))
  return model, params, gg


def text_ids(tok, config, chars_per_token_bound: int = 8) -> List[int]:
  """The first `config.eval.max_tokens` token ids of the evaluation text (no special
  tokens): `config.eval.text_file`, else the Shakespeare evaluation split."""
  max_tokens = int(config.eval.max_tokens)
  if max_tokens < 2:
    raise ValueError(f"eval.max_tokens={max_tokens} must be at least 2")
  if config.eval.text_file:
    try:
      with open(config.eval.text_file, encoding="utf-8") as f:
        text = f.read()
    except UnicodeDecodeError as e:
      raise ValueError(f"eval.text_file={config.eval.text_file!r} is not UTF-8 text ({e})") from e
  else:  # a prefix long enough for max_tokens (a token is rarely > 8 characters)
    text = shakespeare.evaluation_text(max_chars=max_tokens * chars_per_token_bound)
  return tok.encode(text, add_special_tokens=False).ids[:max_tokens]


def calibration_batches(tok, config, bos_id=None) -> List[np.ndarray]:
  """`calib.num_windows` windows of The Tempest, as int32 `[calib.batch_size, window]`."""
  c = config.calib
  need = int(c.num_windows) * int(c.window)
  ids = tok.encode(shakespeare.calibration_text(), add_special_tokens=False).ids
  if len(ids) < need:
    raise ValueError(f"calib.num_windows x calib.window = {need} tokens, but the "
                     f"calibration text has {len(ids)}")
  wins = [w for w in windows(ids[:need], int(c.window), bos_id=bos_id)
          if len(w) == int(c.window)]
  b = int(c.batch_size)
  return [np.stack(wins[i:i + b]) for i in range(0, len(wins) - b + 1, b)]


def needs_calibration(rules) -> bool:
  """Whether some rule has a PTQ algorithm or static activation ranges to calibrate."""
  return any(r.ptq is not None or (r.act is not None and r.act.static) for r in rules)


def quantize(model, params, rules, calib_batches, progress=True) -> Tuple[Any, Dict]:
  """(serving model, serving variables) of `model` under `rules`; float when no rules.
  Statistics are of the float model's activations (`jq.calibrate(forward='float')`);
  rules with nothing to calibrate (round to nearest, dynamic activations) skip it."""
  if not rules:
    return model, {"params": params}
  qmodel = jq.quantize_model(model, rules)
  if not needs_calibration(rules):
    return jq.convert(qmodel, {"params": params}, calib_batches[0][:1])
  if progress:
    print(f"calibrating on {len(calib_batches)} batches of {calib_batches[0].shape}...",
          flush=True)
  variables = jq.calibrate(qmodel, {"params": params}, calib_batches, forward="float")
  return jq.convert(qmodel, variables, calib_batches[0][:1])


def bits_per_weight(variables) -> Tuple[float, Dict[str, int]]:
  """(stored bits / parameter over every tensor in 'params', {float, quantized} bytes)."""
  report = jq.size_report(variables)
  count = report.total_float_bytes / 4  # the float model is float32
  return (8.0 * report.total_quantized_bytes / count,
          {"float": report.total_float_bytes, "quantized": report.total_quantized_bytes})
