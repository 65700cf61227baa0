"""`get_model`: build a model by name, with its keyword arguments checked up front."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from experiments.models.classifiers import CNN1D, MLP
from experiments.models.resnet import ResNet
from experiments.models.transformer import BERT, GPT

_MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "cnn1d": CNN1D,
    "resnet": ResNet,
    "gpt": GPT,
    "bert": BERT,
}

MODEL_NAMES: tuple[str, ...] = tuple(_MODELS)

# Linen's own dataclass fields, never model hyperparameters.
_LINEN_FIELDS = frozenset({"parent", "name"})


def model_fields(name: str) -> tuple[str, ...]:
  """The keyword arguments `get_model(name, ...)` accepts, `num_classes` included."""
  cls = _lookup(name)
  fields = [f.name for f in dataclasses.fields(cls) if f.name not in _LINEN_FIELDS]
  # GPT's vocabulary is its output classes: get_model passes num_classes as vocab_size.
  return tuple("num_classes" if f == "vocab_size" and cls is GPT else f for f in fields)


def _lookup(name: str) -> type[nn.Module]:
  if name not in _MODELS:
    raise ValueError(f"unknown model {name!r}; allowed: {', '.join(MODEL_NAMES)}")
  return _MODELS[name]


def get_model(name: str, *, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds an unbound Linen model; use it as `model.apply({'params': p}, x)`.

  Args:
    name: one of `MODEL_NAMES`: 'mlp', 'cnn1d', 'resnet', 'gpt', 'bert'.
    num_classes: output logits; for 'gpt' this is the vocabulary size (256 for bytes).
    **kwargs: the model's hyperparameters (see `model_fields(name)`). Lists are turned
      into tuples so configs from ConfigDict/JSON give hashable module fields.

  Raises:
    ValueError: unknown model name.
    TypeError: a keyword the model does not have (the message names it and lists the
      accepted ones).
  """
  cls = _lookup(name)
  allowed = model_fields(name)
  unknown = sorted(set(kwargs) - set(allowed))
  if unknown:
    raise TypeError(
        f"get_model({name!r}) got unexpected keyword(s) {', '.join(unknown)}; "
        f"accepted: {', '.join(allowed)}"
    )
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  if cls is GPT:
    return cls(vocab_size=num_classes, **kwargs)
  return cls(num_classes=num_classes, **kwargs)
