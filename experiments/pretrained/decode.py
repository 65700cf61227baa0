"""Text generation with a fixed-size KV cache: chat template, prefill, jitted decode step.

  prompt ids --prefill (one jit per prompt length)--> cache, first logits
  repeat: token = sample(logits) --decode step (one jit for every token)--> logits, cache

The cache has `cache_size` slots from the start (`experiments.models.llama.KVCache`), so
the decode step sees the same shapes at every token and compiles once. Sampling is in the
step: greedy at temperature 0, else softmax(logits / T) restricted to the smallest set of
tokens whose probability reaches `top_p` (nucleus sampling, Holtzman et al. 2020), with a
key folded from the seed and the step.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp

from experiments.models.llama import init_cache

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def render_chat(template: Optional[str], messages: Sequence[Dict[str, str]],
                add_generation_prompt: bool = True) -> str:
  """The prompt text of `messages` under a Jinja chat template (ChatML when None)."""
  import jinja2  # pylint: disable=import-outside-toplevel
  env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
  return env.from_string(template or CHATML).render(
      messages=list(messages), add_generation_prompt=add_generation_prompt)


def sample(logits_BxV: jax.Array, key, temperature: float, top_p: float) -> jax.Array:
  """Next tokens `[B]`: argmax at temperature 0, else nucleus sampling."""
  if temperature <= 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  z = logits_BxV.astype(jnp.float32) / temperature
  if top_p < 1.0:
    order = jnp.argsort(-z, axis=-1)
    z_sorted = jnp.take_along_axis(z, order, axis=-1)
    p_sorted = jax.nn.softmax(z_sorted, axis=-1)
    before = jnp.cumsum(p_sorted, axis=-1) - p_sorted  # mass of the more likely tokens
    z_sorted = jnp.where(before < top_p, z_sorted, -jnp.inf)  # the top token always stays
    z = jnp.full_like(z, -jnp.inf).at[
        jnp.arange(z.shape[0])[:, None], order].set(z_sorted)
  return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)


class Generator:
  """Greedy / nucleus generation from one (serving) Llama model and its variables.

  `prefill` and `step` are jitted once per object; `step._cache_size()` stays 1 however
  many tokens are generated.
  """

  def __init__(self, model, variables, *, cache_size: int, temperature: float = 0.0,
               top_p: float = 1.0, seed: int = 0):
    if not 0 < top_p <= 1:
      raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if temperature < 0:
      raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    self.model, self.variables, self.cache_size = model, variables, cache_size
    self.config = model.config
    key = jax.random.key(seed)

    def prefill(variables, ids_1xT):
      cache = init_cache(self.config, ids_1xT.shape[0], cache_size,
                         kv_bits=getattr(model, "kv_bits", 0),
                         kv_key_group=getattr(model, "kv_key_group", 0))
      logits, cache = model.apply(variables, ids_1xT, cache)
      tok = sample(logits[:, -1], jax.random.fold_in(key, 0), temperature, top_p)
      return tok, cache

    def step(variables, cache, tok_B):
      logits, cache = model.apply(variables, tok_B[:, None], cache)
      tok = sample(logits[:, -1], jax.random.fold_in(key, cache.length), temperature, top_p)
      return tok, cache

    self.prefill = jax.jit(prefill)
    self.step = jax.jit(step, donate_argnums=(1,))

  def generate(self, prompt_ids: Sequence[int], max_new_tokens: int,
               stop_ids: Sequence[int] = ()) -> Dict[str, Any]:
    """{'ids' (new tokens, the stop token included), 'prefill_s', 'decode_s',
    'tokens_per_s' (decode steps after the first, which compiles)}."""
    if len(prompt_ids) + max_new_tokens > self.cache_size:
      raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens="
                       f"{max_new_tokens} exceeds the cache size {self.cache_size}; raise "
                       "--config.generate.cache_size")
    t0 = time.perf_counter()
    tok, cache = self.prefill(self.variables, jnp.asarray([list(prompt_ids)], jnp.int32))
    tok.block_until_ready()
    prefill_s = time.perf_counter() - t0
    out: List[int] = [int(tok[0])]
    t_steady, n_steady = None, 0
    while len(out) < max_new_tokens and out[-1] not in stop_ids:
      tok, cache = self.step(self.variables, cache, tok)
      out.append(int(tok[0]))  # reading the token waits for the step
      if t_steady is None:
        t_steady = time.perf_counter()  # after the first (compiling) step
      else:
        n_steady += 1
    decode_s = 0.0 if t_steady is None else time.perf_counter() - t_steady
    return {"ids": out, "prefill_s": prefill_s, "decode_s": decode_s,
            "tokens_per_s": n_steady / decode_s if n_steady else float("nan")}
