"""Llama checkpoints as HF-style directories: `config.json` + `model.safetensors`.

The tensor names and `config.json` keys are those of HF `LlamaForCausalLM` checkpoints
(`model.layers.{i}.self_attn.q_proj.weight`, ..., `[out, in]` weights, Q/K rows in
rotate-half RoPE order), read and written with `safetensors.numpy`, so no torch.
`save_dir` writes one from a `Llama` params tree (e.g. the dequantized GGUF) and `load_dir`
reads it back; `tokenizer.json` is written / read beside them when given / present.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import numpy as np

from experiments.models.llama import Llama, LlamaConfig

_BLOCK = {  # ours (path under block_i) -> HF (under model.layers.i)
    ("attn_norm", "scale"): "input_layernorm.weight",
    ("attn", "query", "kernel"): "self_attn.q_proj.weight",
    ("attn", "key", "kernel"): "self_attn.k_proj.weight",
    ("attn", "value", "kernel"): "self_attn.v_proj.weight",
    ("attn", "out", "kernel"): "self_attn.o_proj.weight",
    ("mlp_norm", "scale"): "post_attention_layernorm.weight",
    ("mlp", "gate", "kernel"): "mlp.gate_proj.weight",
    ("mlp", "up", "kernel"): "mlp.up_proj.weight",
    ("mlp", "down", "kernel"): "mlp.down_proj.weight",
}


def config_to_hf(c: LlamaConfig) -> Dict[str, Any]:
  """`config.json` contents of an HF LlamaForCausalLM with this shape."""
  return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
          "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
          "num_key_value_heads": c.num_kv_heads, "intermediate_size": c.intermediate_size,
          "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope_theta,
          "max_position_embeddings": c.max_position, "hidden_act": "silu",
          "tie_word_embeddings": c.tie_embeddings, "torch_dtype": "float32"}


def config_from_hf(hf: Dict[str, Any], source: str = "config.json") -> LlamaConfig:
  """A `LlamaConfig` from HF `config.json` contents; refuses other model types."""
  if hf.get("model_type", "llama") != "llama":
    raise ValueError(f"{source}: model_type={hf['model_type']!r}; only 'llama' loads here")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{source}: hidden_act={hf['hidden_act']!r}; Llama's SwiGLU needs 'silu'")
  if hf.get("rope_scaling"):
    raise ValueError(f"{source}: rope_scaling={hf['rope_scaling']!r} is not supported")
  try:
    return LlamaConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
        intermediate_size=hf["intermediate_size"],
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        max_position=hf.get("max_position_embeddings", 2048),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
  except KeyError as e:
    raise ValueError(f"{source}: missing key {e.args[0]!r}") from None


def tensors_from_params(params: Dict[str, Any], c: LlamaConfig) -> Dict[str, np.ndarray]:
  """HF-named `[out, in]` float32 tensors of a `Llama` params tree."""
  out = {"model.embed_tokens.weight": np.asarray(params["token_embed"]["embedding"]),
         "model.norm.weight": np.asarray(params["final_norm"]["scale"])}
  if not c.tie_embeddings:
    out["lm_head.weight"] = np.asarray(params["lm_head"]["kernel"]).T
  for i in range(c.num_layers):
    for path, name in _BLOCK.items():
      v = params[f"block_{i}"]
      for key in path:
        v = v[key]
      v = np.asarray(v, np.float32)
      out[f"model.layers.{i}.{name}"] = v.T if path[-1] == "kernel" else v
  return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def params_from_tensors(t: Dict[str, np.ndarray], c: LlamaConfig,
                        source: str = "model.safetensors") -> Dict[str, Any]:
  """A `Llama` params tree from HF-named tensors (shapes checked, names reported)."""
  def get(name, shape):
    if name not in t:
      raise ValueError(f"{source}: missing tensor {name!r}")
    v = np.asarray(t[name], np.float32)
    if v.shape != shape:
      raise ValueError(f"{source}: tensor {name!r} has shape {v.shape}, expected {shape}")
    return v

  d, f, kv = c.hidden_size, c.intermediate_size, c.num_kv_heads * c.head_dim
  shapes = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,),
            "self_attn.q_proj.weight": (d, d), "self_attn.k_proj.weight": (kv, d),
            "self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, d),
            "mlp.gate_proj.weight": (f, d), "mlp.up_proj.weight": (f, d),
            "mlp.down_proj.weight": (d, f)}
  params = {"token_embed": {"embedding": get("model.embed_tokens.weight", (c.vocab_size, d))},
            "final_norm": {"scale": get("model.norm.weight", (d,))}}
  if not c.tie_embeddings:
    params["lm_head"] = {"kernel": get("lm_head.weight", (c.vocab_size, d)).T}
  for i in range(c.num_layers):
    block: Dict[str, Any] = {}
    for path, name in _BLOCK.items():
      v = get(f"model.layers.{i}.{name}", shapes[name])
      node = block
      for key in path[:-1]:
        node = node.setdefault(key, {})
      node[path[-1]] = v.T if path[-1] == "kernel" else v
    params[f"block_{i}"] = block
  return params


def save_dir(path: str, config: LlamaConfig, params: Dict[str, Any], tokenizer=None) -> None:
  """Writes `config.json`, `model.safetensors` (and `tokenizer.json`) into `path`."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config_to_hf(config), f, indent=2)
  save_file(tensors_from_params(params, config), os.path.join(path, "model.safetensors"))
  if tokenizer is not None:
    tokenizer.save(os.path.join(path, "tokenizer.json"))


def load_dir(path: str):
  """(Llama model, float32 params, tokenizer or None) of an HF-style directory."""
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise ValueError(f"{path}: no config.json; an HF-style Llama directory holds "
                     "config.json and model.safetensors")
  with open(cfg_path) as f:
    config = config_from_hf(json.load(f), cfg_path)
  weights = os.path.join(path, "model.safetensors")
  if not os.path.isfile(weights):
    raise ValueError(f"{path}: no model.safetensors (sharded checkpoints are not supported)")
  params = params_from_tensors(load_file(weights), config, weights)
  tokenizer: Optional[Any] = None
  if os.path.isfile(os.path.join(path, "tokenizer.json")):
    from tokenizers import Tokenizer  # pylint: disable=import-outside-toplevel
    tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
  return Llama(config), params, tokenizer
