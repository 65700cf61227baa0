"""The experiment boundary: a ConfigDict in, typed objects out.

Everything a run needs is checked here before anything touches the workdir:
`validate_config` compares the config against the declared schema
(`experiments/training/schema.py`: every key the trainer reads), `rules_from_config`
turns the `quant` section into `jaxquant.Rule`s (`rules_from_list` any list of config
rules, for recipes with their own runner), and `build_model` gives the float model plus
its rules. Each problem raises one `ConfigError` naming the key and what it allows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import ml_collections

import jaxquant as jq
from jaxquant.spec import CALIBRATIONS, FORMATS, MODES, PTQ_METHODS
from experiments.data import DATASET_NAMES
from experiments.models import MODEL_NAMES, get_model
from experiments.training import schema
from experiments.training.optim import OPTIMIZERS, SCHEDULES

# Keys whose contents are free-form (checked by their consumer, not by the schema).
FREE_FORM_KEYS = ("model.kwargs",)
# A rule in the config has exactly jaxquant.Rule's fields; a spec, QuantSpec's; a `ptq`,
# jaxquant.PTQ's.
RULE_KEYS = tuple(f.name for f in dataclasses.fields(jq.Rule))
# May be absent: rules saved in config.json before config rules carried a PTQ algorithm.
OPTIONAL_RULE_KEYS = ("ptq",)
SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(jq.QuantSpec))
PTQ_FIELDS = tuple(f.name for f in dataclasses.fields(jq.PTQ))
FLOAT_BITS = 32  # quant.bits of a float run (no rules)


class ConfigError(ValueError):
  """An invalid experiment config; the message names the key and the allowed values."""


def _type_name(value: Any) -> str:
  return type(value).__name__


def _check_value(path: str, value: Any, ref: Any) -> None:
  """Checks `value` has the declared type of `ref` (ints are accepted for floats)."""
  if isinstance(ref, bool):
    ok = isinstance(value, bool)
  elif isinstance(ref, int):
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif isinstance(ref, float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  elif isinstance(ref, str):
    ok = isinstance(value, str)
  elif isinstance(ref, (tuple, list)):
    ok = isinstance(value, (tuple, list)) and len(value) == len(ref)
    if ok:
      for i, (v, r) in enumerate(zip(value, ref)):
        _check_value(f"{path}[{i}]", v, r)
  else:
    ok = True
  if not ok and isinstance(ref, (tuple, list)) and isinstance(value, (tuple, list)):
    raise ConfigError(f"config key '{path}'={value!r} has {len(value)} entries; expected "
                      f"{_type_name(ref)} of {len(ref)} like its default {ref!r}")
  if not ok:
    raise ConfigError(f"config key '{path}' has type {_type_name(value)} ({value!r}); "
                      f"expected {_type_name(ref)} like its default {ref!r}")


def _check_tree(cfg: ml_collections.ConfigDict, ref: ml_collections.ConfigDict,
                prefix: str) -> None:
  cfg_keys, ref_keys = set(cfg.keys()), set(ref.keys())
  where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
  for key in sorted(cfg_keys - ref_keys):
    raise ConfigError(f"unknown config key '{prefix}{key}'; keys allowed {where}: "
                      f"{sorted(ref_keys)}")
  for key in sorted(ref_keys - cfg_keys):
    raise ConfigError(f"missing config key '{prefix}{key}' (declared in "
                      "experiments/training/schema.py)")
  for key in sorted(ref_keys):
    path, value, ref_value = prefix + key, cfg[key], ref[key]
    if path in FREE_FORM_KEYS:
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"config key '{path}' must be a ConfigDict of keyword "
                          f"arguments, got {_type_name(value)}")
    elif path == "quant.rules":
      if not isinstance(value, (list, tuple)):
        raise ConfigError(f"config key 'quant.rules' must be a list of rules, got "
                          f"{_type_name(value)}")
    elif isinstance(ref_value, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f"config key '{path}' must be a ConfigDict, got "
                          f"{_type_name(value)}")
      _check_tree(value, ref_value, path + ".")
    else:
      _check_value(path, value, ref_value)


def _check_choice(path: str, value: Any, allowed: Sequence[Any]) -> None:
  if value not in allowed:
    raise ConfigError(f"config key '{path}'={value!r} is not allowed; choose one of "
                      f"{list(allowed)}")


def _check_min(path: str, value: Any, minimum: float, what: str = "") -> None:
  if value < minimum:
    raise ConfigError(f"config key '{path}'={value!r} is not allowed; it must be "
                      f">= {minimum}{what}")


def validate_config(config: ml_collections.ConfigDict,
                    reference: ml_collections.ConfigDict | None = None) -> None:
  """Raises ConfigError unless `config` matches the schema and its values are allowed.

  Checks keys and types against `reference` (default: the schema,
  `experiments.training.schema.get_config()`), then value ranges and choices, then
  builds the quantization rules.
  """
  if not isinstance(config, ml_collections.ConfigDict):
    raise ConfigError(f"config must be an ml_collections.ConfigDict, got "
                      f"{_type_name(config)}")
  _check_tree(config, reference if reference is not None else schema.get_config(), "")
  _check_min("seed", config.seed, 0)
  _check_choice("dataset.name", config.dataset.name, DATASET_NAMES)
  _check_min("dataset.seq_len", config.dataset.seq_len, 1)
  _check_min("dataset.split_seed", config.dataset.split_seed, 0)
  _check_choice("model.name", config.model.name, MODEL_NAMES)
  opt = config.optimizer
  _check_choice("optimizer.name", opt.name, OPTIMIZERS)
  _check_choice("optimizer.schedule", opt.schedule, SCHEDULES)
  if not opt.lr > 0:
    raise ConfigError(f"config key 'optimizer.lr'={opt.lr!r} is not allowed; it must be > 0")
  _check_min("optimizer.weight_decay", opt.weight_decay, 0.0)
  _check_min("optimizer.momentum", opt.momentum, 0.0)
  _check_min("optimizer.warmup_steps", opt.warmup_steps, 0)
  _check_min("optimizer.grad_clip_norm", opt.grad_clip_norm, 0.0, " (0 disables clipping)")
  for name in ("b1", "b2"):
    if not 0.0 <= opt[name] < 1.0:
      raise ConfigError(f"config key 'optimizer.{name}'={opt[name]!r} is not allowed; "
                        "it must be in [0, 1)")
  _check_min("batch_size", config.batch_size, 1)
  _check_min("num_steps", config.num_steps, 0)
  _check_min("log_every", config.log_every, 1)
  _check_min("eval_every", config.eval_every, 0, " (0: evaluate only at the end)")
  _check_min("checkpoint_every", config.checkpoint_every, 0,
             " (0: checkpoint only at the end)")
  _check_min("checkpoint_every_minutes", config.checkpoint_every_minutes, 0.0,
             " (0: no wall-clock checkpoints)")
  _check_min("keep_checkpoints", config.keep_checkpoints, 1)
  for i, size in enumerate(config.mesh_shape):
    if size != -1 and size < 1:
      raise ConfigError(f"config key 'mesh_shape[{i}]'={size!r} is not allowed; use a "
                        "positive axis size or -1 (all remaining devices)")
  if list(config.mesh_shape).count(-1) > 1:
    raise ConfigError(f"config key 'mesh_shape'={tuple(config.mesh_shape)!r} may hold "
                      "at most one -1")
  _check_min("debug.nan_at_step", config.debug.nan_at_step, -1, " (-1 disables it)")
  _check_min("debug.signal_at_step", config.debug.signal_at_step, -1, " (-1 disables it)")
  _check_min("ptq.calib_batches", config.ptq.calib_batches, 1)
  if not config.distill.temperature > 0:
    raise ConfigError(f"config key 'distill.temperature'={config.distill.temperature!r} is "
                      "not allowed; it must be > 0")
  if not 0.0 <= config.distill.weight <= 1.0:
    raise ConfigError(f"config key 'distill.weight'={config.distill.weight!r} is not "
                      "allowed; it must be in [0, 1]")
  _check_min("eval.input_noise_std", config.eval.input_noise_std, 0.0, " (0 disables it)")
  _check_min("eval.weight_noise_std", config.eval.weight_noise_std, 0.0, " (0 disables it)")
  rules = rules_from_config(config.quant)
  if config.ptq.from_workdir and not config.ptq.enabled:
    raise ConfigError(f"config key 'ptq.from_workdir'={config.ptq.from_workdir!r} needs "
                      "ptq.enabled=True (it names the float run to quantize)")
  _check_choice("ptq.method", config.ptq.method, ("rtn",) + PTQ_METHODS)
  if config.ptq.method != "rtn" and not config.ptq.enabled:
    raise ConfigError(f"config key 'ptq.method'={config.ptq.method!r} needs ptq.enabled=True")
  if not config.ptq.enabled:
    for i, rule_cfg in enumerate(config.quant.rules):
      if rule_cfg.get("ptq") is not None:
        raise ConfigError(
            f"config key 'quant.rules[{i}].ptq' sets a post-training algorithm, which "
            "runs when a trained float model is converted: it needs ptq.enabled=True "
            "(or remove the rule's ptq for quantization-aware training)")
  if config.ptq.enabled:
    for i, rule in enumerate(rules):
      for name in ("weight", "act", "grad"):
        spec = getattr(rule, name)
        if spec is not None and spec.learned:
          raise ConfigError(
              f"config key 'quant.rules[{i}].{name}' has ste={spec.ste!r}, a learned "
              "quantizer, but ptq.enabled quantizes after training: use ste='identity' "
              "or 'clipped' (e.g. --config.quant.weight_ste=identity)")


# --------------------------------------------------------------------------- quant rules


@functools.lru_cache(maxsize=None)
def format_bits(fmt: str) -> tuple[int, ...]:
  """The values `quant.bits` may take for weights of format `fmt` (float aside).

  Asked of QuantSpec itself: the widths b for which `QuantSpec(format=fmt, bits=b)` is
  valid and has `effective_bits == b` (int: 2..8, binary: 1, ternary: 2, fp8: 8).
  """
  allowed = []
  for bits in range(1, FLOAT_BITS):
    try:
      spec = jq.QuantSpec(format=fmt, bits=bits)
    except ValueError:
      continue
    if spec.effective_bits == bits:
      allowed.append(bits)
  return tuple(allowed)


def _dataclass_from_config(path: str, cfg: Any, cls: type, allowed: Sequence[str]):
  """`cls(**cfg)`; an unknown field or a value `cls` rejects is a ConfigError at `path`."""
  fields = dict(cfg.items())
  # The dataclass's own TypeError would not list the fields it has.
  for key in sorted(set(fields) - set(allowed)):
    raise ConfigError(f"unknown config key '{path}.{key}'; {cls.__name__} fields allowed: "
                      f"{list(allowed)}")
  try:
    return cls(**fields)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config key '{path}': {e}") from None


def _spec_from_config(path: str, spec_cfg: Any) -> jq.QuantSpec:
  return _dataclass_from_config(path, spec_cfg, jq.QuantSpec, SPEC_FIELDS)


def _ptq_from_config(path: str, ptq_cfg: Any) -> jq.PTQ:
  if not isinstance(ptq_cfg, (ml_collections.ConfigDict, dict)):
    raise ConfigError(f"config key '{path}' must be None or a ConfigDict of jaxquant.PTQ "
                      f"fields {list(PTQ_FIELDS)} (experiments.training.schema.ptq_spec), "
                      f"got {_type_name(ptq_cfg)}")
  return _dataclass_from_config(path, ptq_cfg, jq.PTQ, PTQ_FIELDS)


def _check_quant_header(quant_cfg: ml_collections.ConfigDict) -> None:
  _check_choice("quant.format", quant_cfg.format, FORMATS)
  _check_choice("quant.mode", quant_cfg.mode, MODES)
  _check_choice("quant.weight_granularity", quant_cfg.weight_granularity, ("channel", "tensor"))
  _check_choice("quant.act_calibration", quant_cfg.act_calibration, CALIBRATIONS)
  bits = quant_cfg.bits
  if bits == FLOAT_BITS:
    return
  allowed = format_bits(quant_cfg.format)
  if bits not in allowed:
    raise ConfigError(
        f"config key 'quant.bits'={bits!r} is out of range for "
        f"quant.format={quant_cfg.format!r}; choose {FLOAT_BITS} (float, no "
        f"quantization) or one of {list(allowed)}")
  if quant_cfg.act_bits not in format_bits("int"):
    raise ConfigError(f"config key 'quant.act_bits'={quant_cfg.act_bits!r} is out of "
                      f"range; choose one of {list(format_bits('int'))} (activations "
                      "are integers; it follows quant.bits unless overridden)")


def _rule_from_config(path: str, rule_cfg: Any, *, with_specs: bool) -> jq.Rule:
  """The rule at `path`; every value check is `jaxquant.Rule`'s (and QuantSpec's) own.

  Without specs (a float run) only the pattern, mode and PTQ algorithm are validated:
  the specs follow quant.bits=32, which no QuantSpec accepts.
  """
  if not isinstance(rule_cfg, (ml_collections.ConfigDict, dict)):
    raise ConfigError(f"config key '{path}' must be a ConfigDict with keys "
                      f"{list(RULE_KEYS)}, got {_type_name(rule_cfg)}")
  keys = set(rule_cfg.keys())
  for key in sorted(keys - set(RULE_KEYS)):
    raise ConfigError(f"unknown config key '{path}.{key}'; rule keys allowed: "
                      f"{list(RULE_KEYS)}")
  for key in RULE_KEYS:
    if key not in keys and key not in OPTIONAL_RULE_KEYS:
      raise ConfigError(f"missing config key '{path}.{key}'; a rule has keys "
                        f"{list(RULE_KEYS)} (use experiments.training.schema.quant_rule "
                        "to build one)")
  fields = {}
  for key in RULE_KEYS:
    value = rule_cfg.get(key)
    if key == "ptq":
      if value is not None:
        value = _ptq_from_config(f"{path}.ptq", value)
        if not with_specs:
          value = None  # checked; a rule without its weight spec takes no algorithm
    elif isinstance(value, (ml_collections.ConfigDict, dict)):  # a spec's fields
      value = _spec_from_config(f"{path}.{key}", value) if with_specs else None
    fields[key] = value
  try:
    return jq.Rule(**fields)
  except (ValueError, TypeError) as e:
    raise ConfigError(f"config key '{path}': {e}") from None


def rules_from_config(quant_cfg: ml_collections.ConfigDict) -> list[jq.Rule]:
  """Turns the `quant` config section into an ordered list of `jaxquant.Rule`s.

  `quant.bits == 32` means float: no rules (the listed rules are ignored, but their
  patterns and modes are still validated). Otherwise every rule is built; specs that
  reference `quant.bits` / `quant.format` / `quant.act_bits` already carry their values
  (ml_collections FieldReferences resolve on access).

  Raises:
    ConfigError: a bad header value, an unknown/missing rule key, or a value that
      jaxquant.Rule / QuantSpec rejects; the message names the config key.
  """
  if quant_cfg.bits == FLOAT_BITS:
    # A float run must not be rejected because of specs it does not use, but a typo'd
    # header or pattern would surprise a later quantized point of the same sweep.
    _check_quant_header(quant_cfg)
    rules_from_list(quant_cfg.rules, with_specs=False)
    return []
  _check_quant_header(quant_cfg)
  if not quant_cfg.rules:
    raise ConfigError(f"config key 'quant.bits'={quant_cfg.bits} asks for quantization "
                      "but 'quant.rules' is empty; add rules or set quant.bits=32")
  return rules_from_list(quant_cfg.rules)


def rules_from_list(rules_cfg: Sequence[Any], path: str = "quant.rules", *,
                    with_specs: bool = True) -> list[jq.Rule]:
  """`jaxquant.Rule`s of a list of config rules (`schema.quant_rule`), in order.

  The rule builder of every recipe: `rules_from_config` uses it for the trainer's `quant`
  section, and recipes with their own runner (configs/minilm_ptq.py) for their list.
  `path` names the list in error messages. `with_specs=False` validates the patterns,
  modes and PTQ algorithms only and returns rules without specs (a float run's).

  Raises:
    ConfigError: not a list, an unknown/missing rule key, or a value that jaxquant.Rule,
      QuantSpec or PTQ rejects; the message names the config key.
  """
  if not isinstance(rules_cfg, (list, tuple)):
    raise ConfigError(f"config key '{path}' must be a list of rules "
                      f"(experiments.training.schema.quant_rule), got {_type_name(rules_cfg)}")
  return [_rule_from_config(f"{path}[{i}]", rule_cfg, with_specs=with_specs)
          for i, rule_cfg in enumerate(rules_cfg)]


def variant_rules(config, recipe: str, overrides: Mapping[str, Any] = ()) -> list[jq.Rule]:
  """The `jq.Rule`s of a variant recipe's `config.quant.rules` (`recipe`: its config file,
  e.g. configs/minilm_ptq.py). `overrides` are the command line's `--config.KEY`
  overrides: `variant` only records the config argument, so overriding it (which would
  leave the rules unchanged) is a ValueError that says to pass `--config=RECIPE:VARIANT`."""
  if "variant" in overrides:
    raise ValueError(f"--config.variant={overrides['variant']!r} would not change the "
                     f"rules; choose the variant as --config={recipe}:VARIANT")
  return rules_from_list(config.quant.rules)


# --------------------------------------------------------------------------- model


def ptq_rules(config: ml_collections.ConfigDict, rules: Sequence[jq.Rule]) -> list[jq.Rule]:
  """The rules PTQ applies: `rules`, each rule with a weight spec and no `ptq` of its own
  given `ptq.method`'s algorithm (`jq.PTQ(method=...)`, its defaults) when one is set."""
  if config.ptq.method == "rtn":
    return list(rules)
  algorithm = jq.PTQ(method=config.ptq.method)
  return [dataclasses.replace(r, ptq=algorithm) if r.weight is not None and r.ptq is None
          else r for r in rules]


def build_model(config: ml_collections.ConfigDict, *, num_classes: int):
  """Returns `(float_model, rules)` for `config`; `rules == []` means a float run.

  The training loop quantizes with `jaxquant.quantize_model(model, rules)` when
  `rules` is non-empty (see `run_setup.maybe_quantize`).
  """
  rules = rules_from_config(config.quant)
  kwargs = config.model.kwargs.to_dict()
  try:
    model = get_model(config.model.name, num_classes=num_classes, **kwargs)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"config key 'model.kwargs' (model.name={config.model.name!r}): "
                      f"{e}") from None
  return model, rules


# --------------------------------------------------------------------------- helpers


def config_to_dict(config: Any) -> Any:
  """A JSON-serialisable copy: FieldReferences resolved, lists of ConfigDicts recursed."""
  if isinstance(config, (ml_collections.ConfigDict, dict)):
    return {str(k): config_to_dict(config[k]) for k in sorted(config.keys())}
  if isinstance(config, (list, tuple)):
    return [config_to_dict(v) for v in config]
  if isinstance(config, ml_collections.FieldReference):
    return config_to_dict(config.get())
  if config is None or isinstance(config, (bool, int, float, str)):
    return config
  return repr(config)


def config_from_json(saved: dict) -> ml_collections.ConfigDict:
  """A run's config from its config.json (a resolved dict): the schema's defaults with
  the saved values on top, so runs written before a key existed still load."""
  config = schema.get_config()

  def fill(node, values, prefix):
    for key, value in values.items():
      if key not in node:
        raise ConfigError(f"saved config key '{prefix}{key}' is not in the schema")
      if isinstance(node[key], ml_collections.ConfigDict) and isinstance(value, dict):
        if prefix + key in FREE_FORM_KEYS:
          node[key] = ml_collections.ConfigDict(value)
        else:
          fill(node[key], value, f"{prefix}{key}.")
      else:
        node[key] = tuple(value) if isinstance(node[key], tuple) else value
  fill(config, saved, "")
  return config


def diagnose_override(config: ml_collections.ConfigDict, dotted_key: str) -> str | None:
  """Names the problem with a `--config.<dotted_key>=...` override, or None if the key exists."""
  node, prefix = config, ""
  for part in dotted_key.split("."):
    if prefix.rstrip(".") in FREE_FORM_KEYS:
      return None  # model kwargs: get_model checks them
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
      allowed = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      return (f"unknown config key '{prefix}{part}' (from --config.{dotted_key}); keys "
              f"allowed {where}: {allowed}")
    node, prefix = node[part], prefix + part + "."
  return None
