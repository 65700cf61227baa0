"""Harness run options beyond plain QAT: post-training quantization (`ptq.enabled`,
`ptq.from_workdir`), evaluation under noise (`eval.input_noise_std`,
`eval.weight_noise_std`) and knowledge distillation (`distill.*`)."""

import json

import jax
import numpy as np
import pytest

from configs import base
from experiments.training import evaluation, loop, restore, run_setup, steps
from experiments.training.config_build import ConfigError
from experiments.training.results import read_jsonl
from experiments.training.schema import quant_rule
from tests.experiments.test_train import tiny_config

pytestmark = pytest.mark.heavy  # long together: scheduled first (tests/conftest.py)


def _digits_config(**overrides):
  """60 steps of a small MLP on the 8x8 digits: trained well above chance (0.1)."""
  config = tiny_config(**{"dataset.name": "digits", "model.kwargs.features": (32, 32),
                          "num_steps": 60, "log_every": 10, "eval_every": 0,
                          "checkpoint_every": 0, **overrides})
  config.quant.rules = base.standard_rules(config.quant, first="dense_0", last="head")
  return config


def _ptq_config(bits, **overrides):
  config = _digits_config(**{"ptq.enabled": True, "quant.weight_ste": "identity",
                             "quant.act_calibration": "absmax", **overrides})
  config.quant.bits = bits
  return config


@pytest.fixture(scope="module")
def float_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("float")
  summary = loop.train_and_evaluate(_digits_config(), str(workdir))
  assert summary["metrics"]["test_accuracy"] > 0.5, summary["metrics"]
  return str(workdir), summary


def test_ptq_of_a_finished_float_run(float_run, tmp_path):
  source, float_summary = float_run
  float_acc = float_summary["metrics"]["test_accuracy"]
  summary = loop.train_and_evaluate(_ptq_config(8, **{"ptq.from_workdir": source}),
                                    str(tmp_path / "w8a8"))
  m = summary["metrics"]
  # The float weights are the source run's own: the same evaluation gives the same number.
  assert m["float_test_accuracy"] == float_acc
  assert summary["steps"] == float_summary["steps"] and summary["quantized"]
  # 8-bit weights (per channel) and 8-bit static activation ranges barely move a model:
  # their rounding error is ~0.4% of each range.
  assert abs(m["test_accuracy"] - float_acc) <= 0.03, m
  assert abs(m["serving_test_accuracy"] - m["test_accuracy"]) <= 0.01, m
  assert m["test_loss"] != m["float_test_loss"]  # it did quantize
  assert summary["param_bytes"]["quantized"] < summary["param_bytes"]["float"] / 2
  splits = [r["split"] for r in read_jsonl(tmp_path / "w8a8" / "metrics.jsonl")
            if "split" in r]
  assert splits == ["float_test", "test", "serving_test"], splits


@pytest.mark.slow
def test_ptq_bits_follow_the_config(float_run, tmp_path):
  """2-bit weights with one scale per tensor are far coarser than W8A8: far worse."""
  source, float_summary = float_run
  runs = {}
  for name, bits, extra in (("w8a8", 8, {}), ("w2_tensor", 2, {"quant.weight_granularity": "tensor"})):
    runs[name] = loop.train_and_evaluate(
        _ptq_config(bits, **{"ptq.from_workdir": source, **extra}), str(tmp_path / name))["metrics"]
  assert runs["w2_tensor"]["float_test_accuracy"] == float_summary["metrics"]["test_accuracy"]
  assert runs["w2_tensor"]["test_loss"] > runs["w8a8"]["test_loss"], runs


def test_ptq_method_gptq_serves_its_weights(float_run, tmp_path):
  """ptq.method='gptq': the rules' weights go through GPTQ at conversion, so the test
  metrics are the served model's, and they differ from round to nearest's."""
  source, _ = float_run
  runs = {}
  for method in ("rtn", "gptq"):
    config = _ptq_config(3, **{"ptq.from_workdir": source, "ptq.method": method})
    config.quant.rules = [quant_rule(".*", weight=base.weight_spec(3, format="int", ste="identity"))]
    runs[method] = loop.train_and_evaluate(config, str(tmp_path / method))["metrics"]
  rtn, gptq = runs["rtn"], runs["gptq"]
  assert gptq["test_loss"] == gptq["serving_test_loss"]
  assert gptq["test_accuracy"] == gptq["serving_test_accuracy"]
  assert gptq["float_test_loss"] == rtn["float_test_loss"]
  assert gptq["test_loss"] != rtn["test_loss"]
  # GPTQ minimizes each layer's output error on the calibration inputs: on this model
  # its loss is not worse than rounding to nearest.
  assert gptq["test_loss"] <= rtn["test_loss"] * 1.02, (gptq, rtn)


def test_ptq_enabled_trains_float_then_quantizes(float_run, tmp_path):
  _, float_summary = float_run
  summary = loop.train_and_evaluate(_ptq_config(8), str(tmp_path / "run"))
  # Training is the float run's (same seed, same steps): PTQ is applied only afterwards.
  assert summary["metrics"]["float_test_accuracy"] == float_summary["metrics"]["test_accuracy"]
  assert summary["metrics"]["final_loss"] == float_summary["metrics"]["final_loss"]
  _, state, _ = restore.load_checkpoint(_ptq_config(8), str(tmp_path / "run"))
  assert "quant" not in state["trainable"] and "quant_stats" not in state["state"]


def test_ptq_config_errors(float_run, tmp_path):
  source, _ = float_run
  with pytest.raises(ConfigError, match="needs ptq.enabled"):
    loop.train_and_evaluate(_digits_config(**{"ptq.from_workdir": source}), str(tmp_path / "a"))
  config = _ptq_config(4, **{"quant.weight_ste": "lsq"})
  with pytest.raises(ConfigError, match=r"quant.rules\[2\].weight.*learned"):
    loop.train_and_evaluate(config, str(tmp_path / "b"))
  with pytest.raises(ConfigError, match="not a run directory"):
    loop.train_and_evaluate(_ptq_config(8, **{"ptq.from_workdir": str(tmp_path / "none")}),
                            str(tmp_path / "c"))
  (tmp_path / "qat").mkdir()  # the check reads the run's config.json
  (tmp_path / "qat" / "config.json").write_text(json.dumps({"quant": {"bits": 4}}))
  with pytest.raises(ConfigError, match="is a quantized run"):
    loop.train_and_evaluate(_ptq_config(8, **{"ptq.from_workdir": str(tmp_path / "qat")}),
                            str(tmp_path / "d"))
  with pytest.raises(ConfigError, match="'ptq.method'='gptq' needs ptq.enabled"):
    loop.train_and_evaluate(_digits_config(**{"ptq.method": "gptq"}), str(tmp_path / "f"))
  with pytest.raises(ConfigError, match="ptq.method"):
    loop.train_and_evaluate(_ptq_config(8, **{"ptq.method": "nearest"}), str(tmp_path / "g"))
  with pytest.raises(ConfigError, match="quant.act_calibration"):
    loop.train_and_evaluate(_ptq_config(8, **{"quant.act_calibration": "max"}),
                            str(tmp_path / "e"))


def test_noisy_weights_follow_the_formula():
  w = jax.random.normal(jax.random.key(0), (64, 64))
  variables = {"params": {"dense": {"kernel": w, "bias": jax.numpy.ones((64,))}},
               "quant_stats": {"x": w}}
  out = evaluation.noisy_weights(variables, 0.2, seed=3)
  relative = np.asarray(out["params"]["dense"]["kernel"] / w - 1) / 0.2  # the N(0, 1) draws
  assert abs(relative.mean()) < 0.05 and abs(relative.std() - 1) < 0.05
  np.testing.assert_array_equal(out["params"]["dense"]["bias"], 1.0)  # biases untouched
  assert out["quant_stats"]["x"] is w  # only 'params'
  again = evaluation.noisy_weights(variables, 0.2, seed=3)["params"]["dense"]["kernel"]
  np.testing.assert_array_equal(again, out["params"]["dense"]["kernel"])


def test_noisy_evaluation(float_run):
  source, float_summary = float_run
  clean_acc = float_summary["metrics"]["test_accuracy"]

  def noisy(input_std, weight_std):
    config = _digits_config(**{"eval.input_noise_std": input_std,
                               "eval.weight_noise_std": weight_std})
    _, state, setup = restore.load_checkpoint(config, source)
    return evaluation.noisy_evaluation(setup, state)["accuracy"]

  assert noisy(0.0, 0.0) == clean_acc  # no noise: the plain evaluation
  # Noise 3x the input std (SNR 1/9) leaves little of the 8x8 digits; weights scaled by
  # 1 + 2 N(0, 1) are mostly sign-flipped or doubled. Both fall far below clean.
  assert noisy(3.0, 0.0) < clean_acc - 0.2
  assert noisy(0.0, 2.0) < clean_acc - 0.2
  assert noisy(0.1, 0.05) == noisy(0.1, 0.05)  # draws fixed by the seed


def test_distillation_loss_closed_form():
  rng = np.random.default_rng(0)
  zs, zt = rng.normal(size=(5, 10)) * 3, rng.normal(size=(5, 10)) * 3
  t = 4.0
  softmax = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(
      z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)
  ps, pt = softmax(zs / t), softmax(zt / t)
  expected = t * t * np.sum(pt * (np.log(pt) - np.log(ps)), axis=-1)
  got = steps.distillation_loss(jax.numpy.asarray(zs, np.float32),
                                jax.numpy.asarray(zt, np.float32), t)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-6)
  # d/dz_s of T²·KL is T·(p_s − p_t); the teacher gets no gradient.
  gs, gt = jax.grad(lambda a, b: steps.distillation_loss(a, b, t).sum(), argnums=(0, 1))(
      jax.numpy.asarray(zs, np.float32), jax.numpy.asarray(zt, np.float32))
  np.testing.assert_allclose(np.asarray(gs), t * (ps - pt), rtol=1e-4, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(gt), 0.0)


def test_distillation_from_a_float_teacher(float_run, tmp_path):
  """weight=1: the student never sees a label, only the teacher's soft targets, and
  still learns the task (accuracy well above chance, its distillation loss falls)."""
  source, _ = float_run
  config = _digits_config(**{"distill.teacher_workdir": source, "distill.weight": 1.0,
                             "log_every": 1})
  summary = loop.train_and_evaluate(config, str(tmp_path / "student"))
  kd = [r["distill_loss"] for r in read_jsonl(tmp_path / "student" / "metrics.jsonl")
        if r.get("split") == "train"]
  assert len(kd) == 60 and np.mean(kd[-10:]) < 0.8 * kd[0], (kd[0], kd[-10:])
  assert summary["metrics"]["test_accuracy"] > 0.5, summary["metrics"]

  with pytest.raises(ConfigError, match="not a run directory"):
    loop.train_and_evaluate(_digits_config(**{"distill.teacher_workdir": str(tmp_path)}),
                            str(tmp_path / "a"))
  (tmp_path / "q").mkdir()
  (tmp_path / "q" / "config.json").write_text(json.dumps({"quant": {"bits": 4}}))
  with pytest.raises(ConfigError, match="must be a float run"):
    loop.train_and_evaluate(_digits_config(**{"distill.teacher_workdir": str(tmp_path / "q")}),
                            str(tmp_path / "b"))
  with pytest.raises(ConfigError, match="distill.weight"):
    loop.train_and_evaluate(_digits_config(**{"distill.weight": 1.5}), str(tmp_path / "c"))


def test_warm_start_from_a_float_run(float_run, tmp_path):
  """init.from_workdir: the float run's weights, LSQ steps initialised from them (Esser
  et al. 2019: 2·mean|w|/sqrt(Q_P) per output channel), a fresh optimizer."""
  source, _ = float_run
  config = _digits_config(**{"init.from_workdir": source})
  config.quant.bits = 4  # dense_1 at W4A4 with LSQ weights
  setup = run_setup.prepare(config)
  state = jax.jit(setup.init_fn)(jax.random.key(0), setup.example_batch["x"])  # one compile
  _, float_state, _ = restore.load_checkpoint(_digits_config(), source)
  other = restore.other_run(setup, "init.from_workdir", source, float_only=False)[3]
  warm = restore.warm_start(setup, state, other, jax.random.key(0))
  got, want = warm["trainable"]["params"], float_state["trainable"]["params"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
  w = np.asarray(want["dense_1"]["kernel"])
  step = np.asarray(warm["trainable"]["quant"]["dense_1"]["weight_lsq"]).reshape(-1)
  np.testing.assert_allclose(step, 2 * np.abs(w).mean(axis=0) / np.sqrt(7), rtol=1e-5)
  assert int(warm["step"]) == 0
  assert all(not np.any(np.asarray(m)) for m in jax.tree_util.tree_leaves(
      warm["opt_state"]) if np.asarray(m).dtype.kind == "f")  # fresh Adam moments

  # 10 QAT steps: too few for a fresh init to pass 0.5 here, so the accuracy is the
  # warm start's.
  config.num_steps = 10
  summary = loop.train_and_evaluate(config, str(tmp_path / "ft"))
  assert summary["metrics"]["test_accuracy"] > 0.5
  wider = _digits_config(**{"init.from_workdir": source, "model.kwargs.features": (48, 32)})
  with pytest.raises(ConfigError, match="do not match this model"):
    loop.train_and_evaluate(wider, str(tmp_path / "wider"))
  assert not (tmp_path / "wider").exists()  # refused before the workdir is touched
