"""Config schema, FieldReference sweeps, rules_from_config, and bad-config handling."""

import os
import subprocess
import sys

import ml_collections
import pytest

from configs import base, digits_resnet, mnist1d_cnn, pytext_gpt, quickstart
from experiments.training import config_build, loop, sharding
from experiments.training.config_build import ConfigError, rules_from_config, validate_config
from experiments.training.schema import quant_rule
from jaxquant import QuantSpec, Rule

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


@pytest.mark.parametrize("flag, fragments, existing", [
    ("--config.optimizer.lrr=0.1", ["unknown config key 'optimizer.lrr'", "'lr'"], False),
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
    (["--coordinator_address=127.0.0.1:1", "--num_processes=2", "--process_id=2"],
     "--process_id=2 must be < --num_processes=2"),
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
