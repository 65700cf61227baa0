"""The byte-level BPE tokenizer of a GGUF file, rebuilt with `tokenizers` (no transformers).

A GGUF with `tokenizer.ggml.model = 'gpt2'` stores the vocabulary (`tokens`, id = index),
the merges in rank order ('a b' strings), a type per token (1 normal, 3 control, 4 user
defined, 6 byte) and the name of its pre-tokenizer (`tokenizer.ggml.pre`). The rebuilt
tokenizer is GPT-2's byte-level BPE (Radford et al. 2019; Sennrich et al. 2016): text is
split by the pre-tokenizer, each piece mapped to printable byte characters, then merged by
rank. Pre-tokenizers known here:

  'gpt2', 'default'   GPT-2's regex (contractions, letters, numbers, other, spaces);
  'smollm'            every digit alone first, then GPT-2's regex (as llama.cpp does for
                      SmolLM / StarCoder2 vocabularies).

Control and user-defined tokens (`<|im_start|>`, `<|endoftext|>`, ...) are added as
special tokens, so they are matched whole in the input text and dropped by
`decode(..., skip_special_tokens=True)`.
"""
from __future__ import annotations

from typing import Any, Dict

PRE_TOKENIZERS = ("gpt2", "default", "smollm")
_SPECIAL_TYPES = (3, 4)  # control, user defined


def tokenizer_from_metadata(metadata: Dict[str, Any], source: str = "GGUF"):
  """A `tokenizers.Tokenizer` from GGUF `tokenizer.ggml.*` metadata.

  Raises ValueError naming `source` when the model is not byte-level BPE, the
  pre-tokenizer is unknown, or tokens / merges are missing.
  """
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers  # pylint: disable=import-outside-toplevel
  kind = metadata.get("tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"{source}: tokenizer.ggml.model={kind!r}; only byte-level BPE "
                     "('gpt2') tokenizers are rebuilt here")
  pre = metadata.get("tokenizer.ggml.pre", "default")
  if pre not in PRE_TOKENIZERS:
    raise ValueError(f"{source}: tokenizer.ggml.pre={pre!r} is not one of {PRE_TOKENIZERS}; "
                     "its split regex would need adding to gguf_tokenizer.py")
  tokens = metadata.get("tokenizer.ggml.tokens")
  merges = metadata.get("tokenizer.ggml.merges")
  if not tokens or merges is None:
    raise ValueError(f"{source}: tokenizer.ggml.tokens and tokenizer.ggml.merges are both "
                     "needed to rebuild a BPE tokenizer")
  vocab = {tok: i for i, tok in enumerate(tokens)}
  if len(vocab) != len(tokens):
    raise ValueError(f"{source}: tokenizer.ggml.tokens has duplicate entries")
  pairs = []
  for m in merges:
    a, sep, b = m.partition(" ")
    if not sep:
      raise ValueError(f"{source}: merge {m!r} is not two tokens separated by a space")
    pairs.append((a, b))
  tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre == "smollm":
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), byte_level])
  else:
    tok.pre_tokenizer = byte_level
  tok.decoder = decoders.ByteLevel()
  types = metadata.get("tokenizer.ggml.token_type")
  if types is not None:
    special = [tokens[i] for i, t in enumerate(types) if int(t) in _SPECIAL_TYPES]
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special])
  return tok
