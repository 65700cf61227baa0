"""Config schema, FieldReference sweeps, rules_from_config, and bad-config handling."""

import ast
import glob
import os
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

import jaxquant as jq
from configs import base, digits_resnet, mnist1d_cnn, pytext_gpt, quickstart
from experiments.config_file import load_config_module
from experiments.pretrained.llm_run import recipe_rules as llm_recipe_rules
from experiments.pretrained.ptq_run import recipe_rules
from experiments.training import config_build, loop, sharding
from experiments.training.config_build import (ConfigError, rules_from_config,
                                               rules_from_list, validate_config)
from experiments.training.schema import ptq_spec, quant_rule, quant_spec
from jaxquant import QuantSpec, Rule
from jaxquant import state as jq_state
from jaxquant.ptq import gptq as gptq_lib
from jaxquant.ptq import stats as ptq_stats

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _apply(config, overrides):
  """What `--config.a.b=v` does: assignment through the ConfigDict (refs propagate)."""
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
      node = node[p]
    setattr(node, leaf, value)
  return config


@pytest.mark.parametrize("make", [
    base.get_config,
    *[lambda a=a: mnist1d_cnn.get_config(a) for a in mnist1d_cnn.VARIANTS],
    quickstart.get_config, digits_resnet.get_config, pytext_gpt.get_config,
])
def test_every_recipe_validates(make):
  validate_config(make())


def test_float_has_no_rules_and_w4a4_follows_bits():
  assert rules_from_config(mnist1d_cnn.get_config().quant) == []
  rules = rules_from_config(mnist1d_cnn.get_config("w4a4").quant)
  assert all(isinstance(r, Rule) for r in rules)
  first, last, rest = rules
  assert (first.weight.bits, first.act.bits, last.weight.bits, last.act.bits) == (8, 8, 8, 8)
  assert (rest.weight.bits, rest.act.bits, rest.weight.format) == (4, 4, "int")
  assert (rest.weight.ste, rest.act.calibration, first.act.calibration) == (
      "lsq", "percentile", "absmax")


def test_bits_override_propagates_through_field_references():
  config = _apply(mnist1d_cnn.get_config("w8a8"), {"quant.bits": 2})
  rest = rules_from_config(config.quant)[-1]
  assert (rest.weight.bits, rest.act.bits) == (2, 2)
  # act_bits follows bits until it is overridden on its own; then only it changes.
  config = _apply(config, {"quant.act_bits": 8, "quant.bits": 3})
  rest = rules_from_config(config.quant)[-1]
  assert (rest.weight.bits, rest.act.bits) == (3, 8)
  assert config_build.config_to_dict(config)["quant"]["rules"][2]["weight"]["bits"] == 3


def test_binary_variant_is_binary_weights_8bit_activations():
  config = mnist1d_cnn.get_config("binary")
  rest = rules_from_config(config.quant)[-1]
  assert rest.weight == QuantSpec(**{**config_build.config_to_dict(config.quant.rules[2].weight)})
  assert (rest.weight.format, rest.weight.effective_bits, rest.act.bits) == ("binary", 1, 8)
  assert rest.weight.ste == "identity"
  assert config.quant.bits == 1


def test_quickstart_sweep_grid():
  sweep = quickstart.get_sweep()
  assert len(sweep) == 15
  assert sorted({p["seed"] for p in sweep}) == [0, 1, 2]
  assert sorted({p["quant.bits"] for p in sweep}) == [1, 2, 4, 8, 32]
  for point in sweep:
    config = _apply(quickstart.get_config(), point)
    validate_config(config)
    rules = rules_from_config(config.quant)
    assert bool(rules) == (point["quant.bits"] != 32)


def _bad(overrides):
  return _apply(mnist1d_cnn.get_config("w4a4"), overrides)


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c.__setattr__("nmu_steps", 3), ["nmu_steps", "num_steps"]),
    (lambda c: c.optimizer.__setattr__("lrate", 0.1), ["optimizer.lrate", "'lr'"]),
    # ConfigDict itself refuses a str for an int field; a config built from a dict can not.
    (lambda c: ml_collections.ConfigDict({**c.to_dict(), "num_steps": "many"}),
     ["num_steps", "expected int"]),
    (lambda c: _apply(c, {"mesh_shape": (2, 2, 2)}), ["mesh_shape", "expected tuple"]),
    (lambda c: c.quant.rules[0].__setitem__("pattern", "conv_(0"),
     ["quant.rules[0]", "pattern='conv_(0'", "regex"]),
    (lambda c: _apply(c, {"quant.bits": 9}), ["quant.bits", "9", "32", "[2, 3, 4"]),
    (lambda c: _apply(c, {"quant.bits": 1}), ["quant.bits", "format='int'"]),
    (lambda c: _apply(c, {"dataset.name": "mnist2d"}), ["dataset.name", "mnist1d",
                                                        "pytext"]),
    (lambda c: _apply(c, {"model.name": "vgg"}), ["model.name", "cnn1d", "gpt"]),
    (lambda c: _apply(c, {"optimizer.name": "adam"}), ["optimizer.name", "adamw", "sgd"]),
    (lambda c: c.quant.rules[1].weight.__setattr__("granularty", "tensor"),
     ["quant.rules[1].weight.granularty", "granularity"]),
    (lambda c: _apply(c, {"quant.bits": 1, "quant.format": "binary", "quant.act_bits": 8}),
     ["quant.rules[2].weight", "ste='lsq'", "format='int'"]),
    (lambda c: c.quant.rules[2].act.__setitem__("rounding", "up"),
     ["quant.rules[2].act", "rounding", "stochastic"]),
])
def test_bad_config_raises_one_clear_message(mutate, expected):
  config = mnist1d_cnn.get_config("w4a4")
  config = mutate(config) or config
  with pytest.raises(ConfigError) as info:
    validate_config(config)
  for fragment in expected:
    assert fragment in str(info.value), str(info.value)


def test_bad_model_kwargs_name_the_key(tmp_path):
  config = _apply(base.get_config(), {"model.kwargs": ml_collections.ConfigDict({"chanels": 3})})
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match=r"model\.kwargs.*chanels.*channels"):
    loop.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()


def _train_cli(*args):
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})


# The unknown key's case (exit 2, the key named, no workdir made) is also the default
# test_cli_takes_jax_flags_and_names_a_mistyped_override's: it runs with the slow tests.
@pytest.mark.parametrize("flag, fragments, existing", [
    pytest.param("--config.optimizer.lrr=0.1", ["unknown config key 'optimizer.lrr'", "'lr'"],
                 False, marks=pytest.mark.slow),
    ("--config.quant.bits=12", ["quant.bits", "12", "[2, 3, 4, 5, 6, 7, 8, 16]"], True),
])
def test_cli_bad_config_exits_2_and_leaves_workdir_untouched(tmp_path, flag, fragments,
                                                            existing):
  workdir = tmp_path / "run"
  if existing:  # a previous run's workdir must not be modified either
    workdir.mkdir()
    (workdir / "marker.txt").write_text("keep")
  result = _train_cli("--config=configs/mnist1d_cnn.py:w4a4", f"--workdir={workdir}", flag)
  assert result.returncode == 2, result.stderr
  message = result.stderr.strip().splitlines()[-1]
  for fragment in fragments:
    assert fragment in message, result.stderr
  if existing:
    assert os.listdir(workdir) == ["marker.txt"]
  else:
    assert not workdir.exists()


def test_cli_takes_jax_flags_and_names_a_mistyped_override(tmp_path):
  """jax's absl flags parse (an unknown flag would be refused before the config), and
  the locked config names the field a typo missed."""
  workdir = tmp_path / "run"
  result = _train_cli("--config=configs/mnist1d_cnn.py:w8a8", f"--workdir={workdir}",
                      "--jax_platforms=cpu", "--jax_enable_x64", "--config.num_stepz=3")
  assert result.returncode == 2, result.stderr
  message = result.stderr.strip().splitlines()[-1]
  assert "unknown config key 'num_stepz'" in message and "'num_steps'" in message
  assert not workdir.exists()
  unknown = _train_cli("--config=configs/mnist1d_cnn.py:w8a8", f"--workdir={workdir}",
                       "--jax_platfroms=cpu")
  assert unknown.returncode != 0 and "jax_platfroms" in unknown.stderr


@pytest.mark.parametrize("flags, fragment", [
    (["--num_processes=2"], "--num_processes also need(s) --coordinator_address, "
                            "--process_id"),
    pytest.param(["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"],
                 "--process_id=2 must be < --num_processes=2",
                 marks=pytest.mark.slow),  # a second message of the same check: slow
])
def test_cli_multiprocess_flags_are_checked(tmp_path, flags, fragment):
  result = _train_cli("--config=configs/mnist1d_cnn.py:w8a8", f"--workdir={tmp_path / 'r'}",
                      *flags)
  assert result.returncode == 2 and fragment in result.stderr, result.stderr
  assert not (tmp_path / "r").exists()


def test_multiprocess_slurm_is_a_step_of_several_tasks():
  assert sharding.under_multiprocess_slurm({"SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "2"})
  assert not sharding.under_multiprocess_slurm({"SLURM_STEP_NODELIST": "n1",
                                             "SLURM_NTASKS": "1"})
  # A batch script of a 2-task job runs as one process, outside any step.
  assert not sharding.under_multiprocess_slurm({"SLURM_JOB_ID": "5", "SLURM_NTASKS": "2"})
  assert not sharding.under_multiprocess_slurm({})


def test_float_run_still_checks_rule_patterns_and_modes():
  """bits=32 builds no rules, but a typo in one would break the sweep's quantized points."""
  for bad_rule, fragment in [(quant_rule("conv_(0"), "regex"),
                             (quant_rule("head", mode="int8"), "mode='int8'")]:
    config = mnist1d_cnn.get_config("float")
    config.quant.rules = [config.quant.rules[0], bad_rule]
    with pytest.raises(ConfigError, match=r"quant\.rules\[1\]") as info:
      validate_config(config)
    assert fragment in str(info.value)


def test_quant_bits_allowed_per_format_come_from_quantspec():
  # Independent statement of the formats' widths (QuantSpec docstring): int 2..8 and 16,
  # binary 1, ternary 2, fp8 8, the block formats their element widths.
  assert config_build.format_bits("int") == (2, 3, 4, 5, 6, 7, 8, 16)
  assert config_build.format_bits("mxfp8") == (8,)
  assert config_build.format_bits("mxfp4") == config_build.format_bits("nvfp4") == (4,)
  assert config_build.format_bits("binary") == (1,)
  assert config_build.format_bits("ternary") == (2,)
  assert config_build.format_bits("fp8_e4m3") == config_build.format_bits("fp8_e5m2") == (8,)


# --------------------------------------------------------------------------- every config


def _config_files():
  root = os.path.join(REPO, "configs")
  files = sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(os.path.join(root, "claims",
                                                                               "*.py")))
  return [os.path.relpath(f, REPO) for f in files
          if os.path.basename(f) not in ("__init__.py", "common.py")]


def _build(path, module, config):
  """What the config's runner builds first: pretrained-model recipes their rules,
  integer-only recipes the training config under their `integer` section, the rest the
  trainer's whole config."""
  if os.path.basename(path) == "smollm2.py":
    rules = llm_recipe_rules(config)
    assert bool(rules) == (config.variant not in module.FLOAT_VARIANTS)
    return
  if os.path.basename(path) == "minilm_ptq.py":
    rules = recipe_rules(config)  # integer_only builds a program from the float model
    assert bool(rules) == (config.variant not in ("float", "integer_only"))
    return
  if "integer" in config:
    config = ml_collections.ConfigDict(config.to_dict())
    del config["integer"]
  validate_config(config)


def _arguments(module):
  """Every ARG the module declares (VARIANTS, EXTRA, its sweep's config_args), or None."""
  args = [*getattr(module, "VARIANTS", ()), *getattr(module, "EXTRA", ())]
  if hasattr(module, "get_sweep"):
    args += [p["config_arg"] for p in module.get_sweep() if "config_arg" in p]
  return list(dict.fromkeys(args)) or [None]


@pytest.mark.parametrize("path", _config_files())
def test_every_config_file_builds_every_variant_and_sweep_point(path):
  module = load_config_module(os.path.join(REPO, path))
  for arg in _arguments(module):
    _build(path, module, module.get_config() if arg is None else module.get_config(arg))
  for point in (module.get_sweep() if hasattr(module, "get_sweep") else []):
    arg = point.get("config_arg")
    config = module.get_config() if arg is None else module.get_config(arg)
    _build(path, module, _apply(config, {k: v for k, v in point.items() if k != "config_arg"}))


def test_configs_spell_specs_one_way():
  """No config writes jaxquant objects itself: specs, rules and PTQ algorithms are the
  schema's quant_spec / quant_rule / ptq_spec (and base's presets of quant_spec)."""
  for path in _config_files():
    with open(os.path.join(REPO, path)) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        assert not any(a.name.startswith("jaxquant") for a in node.names), path
      if isinstance(node, ast.ImportFrom):
        assert not (node.module or "").startswith("jaxquant"), path
      if isinstance(node, ast.Call):
        name = getattr(node.func, "attr", getattr(node.func, "id", ""))
        assert name not in ("QuantSpec", "Rule", "PTQ", "DotSpec"), (path, name)


def test_weight_and_act_presets_are_quant_spec_with_defaults():
  assert base.weight_spec(4, ste="lsq").to_dict() == quant_spec(
      format="int", bits=4, symmetric=True, granularity="channel", calibration="absmax",
      ste="lsq").to_dict()
  assert base.act_spec(8, symmetric=True).to_dict() == quant_spec(
      format="int", bits=8, symmetric=True, granularity="tensor", calibration="absmax",
      percentile=99.0, ste="clipped").to_dict()


# --------------------------------------------------------------------------- PTQ in rules


def test_config_rules_carry_every_ptq_knob_to_jq_ptq():
  group = quant_spec(bits=4, granularity="group", group_size=32, symmetric=False)
  rules = rules_from_list([
      quant_rule("a", weight=group, ptq=ptq_spec(method="gptq", percdamp=0.2, act_order=False)),
      quant_rule("b", weight=quant_spec(bits=3, granularity="group", group_size=64),
                 ptq=ptq_spec(method="awq", grid=7)),
      quant_rule("c", weight=quant_spec(bits=8), act=quant_spec(bits=8, static=True,
                                                                granularity="tensor"),
                 ptq=ptq_spec(method="smoothquant", alpha=0.35)),
      quant_rule("d", weight=quant_spec(bits=8)),
  ])
  assert rules[0].ptq == jq.PTQ(method="gptq", percdamp=0.2, act_order=False)
  assert (rules[0].weight.group_size, rules[0].weight.symmetric) == (32, False)
  assert rules[1].ptq == jq.PTQ(method="awq", grid=7)
  assert rules[1].weight.group_size == 64
  assert rules[2].ptq == jq.PTQ(method="smoothquant", alpha=0.35)
  assert rules[3].ptq is None
  # Every PTQ field has a config spelling (a new field would need none of this file).
  everything = {f: getattr(jq.PTQ(method="gptq", percdamp=0.3, act_order=False, alpha=0.1,
                                  grid=3), f) for f in config_build.PTQ_FIELDS}
  built = rules_from_list([quant_rule("x", weight=group, ptq=ptq_spec(**everything))])[0]
  assert built.ptq == jq.PTQ(**everything)


@pytest.mark.parametrize("ptq, fragments", [
    (ptq_spec(method="gptx"), ["quant.rules[0].ptq", "gptx", "gptq"]),
    (ptq_spec(method="gptq", percdamp=1.5), ["quant.rules[0].ptq", "percdamp"]),
    (ptq_spec(method="awq", grids=4), ["quant.rules[0].ptq.grids", "PTQ fields", "grid"]),
    ("gptq", ["quant.rules[0].ptq", "ptq_spec"]),
])
def test_bad_ptq_in_a_config_rule_names_the_key(ptq, fragments):
  with pytest.raises(ConfigError) as info:
    rules_from_list([quant_rule("x", weight=quant_spec(bits=4), ptq=ptq)])
  for fragment in fragments:
    assert fragment in str(info.value), str(info.value)


def test_trainer_ptq_rules_need_ptq_enabled_and_keep_their_own_algorithm():
  config = mnist1d_cnn.get_config("w4a4")
  config.quant.weight_ste = "identity"
  config.quant.rules[2].ptq = ptq_spec(method="gptq", percdamp=0.05)
  with pytest.raises(ConfigError, match=r"quant\.rules\[2\]\.ptq.*ptq\.enabled=True"):
    validate_config(config)
  config.ptq.enabled, config.ptq.method = True, "awq"
  validate_config(config)
  rules = config_build.ptq_rules(config, rules_from_config(config.quant))
  assert [r.ptq for r in rules] == [jq.PTQ(method="awq")] * 2 + [
      jq.PTQ(method="gptq", percdamp=0.05)]


class _Dense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(24, name="fc")(x)


def test_gptq_knobs_from_a_config_reach_the_stored_codes():
  """percdamp and act_order set in a config rule give the codes of a direct gptq() call
  with those knobs on the layer's own statistics, and not those of the defaults."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(256, 32)) @ rng.normal(size=(32, 32)) / 6.0
  x[:, :3] *= 10.0  # outlier channels: act_order and damping matter
  x = np.asarray(x, np.float32)
  params = _Dense().init(jax.random.key(0), x[:2])["params"]
  spec_cfg = quant_spec(bits=3, granularity="group", group_size=8, symmetric=False)
  rules = rules_from_list([quant_rule("fc", weight=spec_cfg, ptq=ptq_spec(
      method="gptq", percdamp=0.3, act_order=False))])
  qmodel = jq.quantize_model(_Dense(), rules)
  variables = jq.calibrate(qmodel, {"params": params}, [x[:128], x[128:]])
  _, svars = jq.convert(qmodel, variables, x[:2])
  stored = svars["params"]["fc"]["kernel"].unpacked()
  st = jq_state.observer_state(jq_state.PTQ_STATS, variables["quant_stats"]["fc"])
  hessian = ptq_stats.hessian(ptq_stats.Stats(st["xtx"], st["abs_sum"], st["abs_max"],
                                              st["count"]))
  spec = QuantSpec(bits=3, granularity="group", group_size=8, symmetric=False)
  kernel = params["fc"]["kernel"]
  direct = gptq_lib.gptq(kernel, hessian, spec, percdamp=0.3, act_order=False).qtensor
  np.testing.assert_array_equal(np.asarray(stored.values), np.asarray(direct.values))
  np.testing.assert_array_equal(np.asarray(stored.scale), np.asarray(direct.scale))
  default = gptq_lib.gptq(kernel, hessian, spec, percdamp=0.01, act_order=True).qtensor
  assert not np.array_equal(np.asarray(stored.values), np.asarray(default.values))
