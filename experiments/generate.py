r"""Generate text from a (quantized) llama GGUF model with a KV cache.

    python -m experiments.generate --config=configs/smollm2.py:float \
        --prompt="What is the capital of France?" --max_new_tokens=32 \
        [--config.generate.temperature=0.7 --config.generate.top_p=0.9] [--raw]

The prompt is one user message rendered with the chat template in the GGUF metadata
(`tokenizer.chat_template`; ChatML when the file has none); `--raw` feeds the prompt text
as is. Decoding is greedy at temperature 0 (the default), else nucleus sampling; it stops
at the end-of-sequence token (`tokenizer.ggml.eos_token_id`, `<|im_end|>` for SmolLM2)
or after `--max_new_tokens`. The decode step is jitted once with a fixed-size cache
(`generate.cache_size` slots); prefill time and decode tokens/s are printed
(experiments/pretrained/decode.py).
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from experiments.pretrained import decode, llm_run

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/smollm2.py:VARIANT",
                                          lock_config=False)
_PROMPT = flags.DEFINE_string("prompt", None, "The user message (or raw text with --raw).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.",
                                lower_bound=1)
_RAW = flags.DEFINE_bool("raw", False, "Feed --prompt without the chat template.")


def run(config, prompt: str, max_new_tokens: int, raw: bool = False, overrides=()):
  """{'text', 'prompt_tokens', 'new_tokens', 'prefill_s', 'tokens_per_s', ...}."""
  rules = llm_run.recipe_rules(config, overrides)
  model, params, gg = llm_run.load_model(config)
  tok = gg.tokenizer()
  calib = llm_run.calibration_batches(tok, config, gg.bos_id if gg.add_bos else None) \
      if rules else []
  smodel, svars = llm_run.quantize(model, params, rules, calib)
  text = prompt if raw else decode.render_chat(
      gg.chat_template, [{"role": "user", "content": prompt}])
  ids = tok.encode(text, add_special_tokens=False).ids
  if gg.add_bos and gg.bos_id is not None:
    ids = [gg.bos_id] + ids
  g = config.generate
  gen = decode.Generator(smodel, svars, cache_size=int(g.cache_size),
                         temperature=float(g.temperature), top_p=float(g.top_p),
                         seed=int(g.seed))
  stop = [gg.eos_id] if gg.eos_id is not None else []
  out = gen.generate(ids, max_new_tokens, stop)
  return {**out, "text": tok.decode(out["ids"], skip_special_tokens=True),
          "prompt_tokens": len(ids), "new_tokens": len(out["ids"]),
          "decode_compiles": gen.step._cache_size()}  # pylint: disable=protected-access


def main(argv):
  """Generates from --prompt and prints the text and the speeds."""
  del argv
  if _CONFIG.value is None or _PROMPT.value is None:
    raise app.UsageError("--config and --prompt are required")
  r = run(_CONFIG.value, _PROMPT.value, _MAX_NEW.value, _RAW.value,
          config_flags.get_override_values(flags.FLAGS["config"]))
  print(r["text"], flush=True)
  print(f"[{r['prompt_tokens']} prompt tokens, prefill {r['prefill_s']:.2f} s (with "
        f"compile); {r['new_tokens']} new tokens, {r['tokens_per_s']:.1f} tokens/s decode "
        f"(after the first step); decode step compiled {r['decode_compiles']}x]", flush=True)


if __name__ == "__main__":
  app.run(main)
