"""End-to-end training in a temp dir: workdir files, resume, determinism, NaN guard."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from configs import base
from experiments.training import loop, restore
from experiments.training.results import read_jsonl

# A failed orbax restore (the corrupt-checkpoint test) leaves coroutines that are
# garbage-collected during whichever test runs next; they are harmless.
pytestmark = [pytest.mark.heavy,  # long together: scheduled first (tests/conftest.py)
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]


def tiny_config(**overrides):
  """A few steps of a small MLP on MNIST-1D, on one device."""
  config = base.get_config()
  config.model.name = "mlp"
  config.model.kwargs.features = (16,)
  config.batch_size = 32
  config.num_steps = 6
  config.log_every = 2
  config.eval_every = 3
  config.checkpoint_every = 3
  config.keep_checkpoints = 3
  config.mesh_shape = (1, 1)
  config.progress = False
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
      node = node[p]
    setattr(node, leaf, value)
  return config


def _params(config, workdir):
  step, state, _ = restore.load_checkpoint(config, str(workdir))
  return step, jax.device_get(state["trainable"]["params"])


def _assert_trees_equal(a, b):
  jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)


def test_end_to_end_then_rerun_resumes(tmp_path):
  workdir = tmp_path / "run"
  summary = loop.train_and_evaluate(tiny_config(), str(workdir))

  on_disk = json.loads((workdir / "summary.json").read_text())
  assert on_disk == json.loads(json.dumps(summary))
  for key in ("config", "metrics", "param_bytes", "wall_time_s", "steps", "versions", "data"):
    assert key in on_disk, key
  assert on_disk["steps"] == 6
  assert on_disk["config"]["quant"]["bits"] == 32
  metrics = on_disk["metrics"]
  assert 0.0 <= metrics["test_accuracy"] <= 1.0
  assert metrics["serving_test_accuracy"] == metrics["test_accuracy"]
  assert np.isfinite(metrics["final_loss"])
  assert on_disk["param_bytes"]["float"] == on_disk["param_bytes"]["quantized"] > 0
  macs = 40 * 16 + 16 * 10  # MNIST-1D's 40 inputs -> 16 -> 10
  assert on_disk["compute_per_example"] == {"macs": macs, "bops": macs * 32 * 32,
                                            "float_bops": macs * 32 * 32}
  assert set(on_disk["versions"]) == {"python", "jax", "flax", "optax", "jaxquant"}
  assert on_disk["data"]["name"] == "mnist1d"
  assert json.loads((workdir / "config.json").read_text()) == on_disk["config"]
  assert os.listdir(workdir / "tensorboard")
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]

  records = read_jsonl(workdir / "metrics.jsonl")
  with open(workdir / "metrics.jsonl") as f:
    assert len(records) == len(f.readlines())  # every line parses on its own
  train_steps = [r["step"] for r in records if r.get("split") == "train"]
  assert train_steps == [2, 4, 6]
  assert [r["step"] for r in records if r.get("split") == "test"] == [3, 6]

  # Same command with a longer schedule: continues from step 6, does not restart.
  summary = loop.train_and_evaluate(tiny_config(num_steps=10), str(workdir))
  assert summary["steps"] == 10 and summary["resumed_from_step"] == 6
  records = read_jsonl(workdir / "metrics.jsonl")
  assert [r["step"] for r in records if r.get("split") == "train"] == [2, 4, 6, 8, 10]
  assert any(r.get("event") == "resume" and r["step"] == 6 for r in records)
  assert _params(tiny_config(num_steps=10), workdir)[0] == 10


def test_interrupted_and_resumed_is_bit_identical(tmp_path):
  config = tiny_config(num_steps=8, checkpoint_every=4, eval_every=0)
  full, interrupted = tmp_path / "full", tmp_path / "interrupted"
  loop.train_and_evaluate(config, str(full))
  # An interruption right after the step-4 checkpoint: the same workdir minus what
  # happened later.
  shutil.copytree(full / "checkpoints", interrupted / "checkpoints")
  shutil.rmtree(interrupted / "checkpoints" / "8")
  summary = loop.train_and_evaluate(config, str(interrupted))
  assert summary["resumed_from_step"] == 4 and summary["steps"] == 8
  step_full, params_full = _params(config, full)
  step_resumed, params_resumed = _params(config, interrupted)
  assert step_full == step_resumed == 8
  _assert_trees_equal(params_full, params_resumed)


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, caplog):
  config = tiny_config(eval_every=0)
  workdir = tmp_path / "run"
  loop.train_and_evaluate(config, str(workdir))
  _, params_before = _params(config, workdir)
  damaged = 0
  for root, _, files in os.walk(workdir / "checkpoints" / "6" / "state"):
    for name in files:
      path = os.path.join(root, name)
      if "/d/" in path:  # the array data files
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)
        damaged += 1
  assert damaged
  with caplog.at_level("WARNING"):
    summary = loop.train_and_evaluate(config, str(workdir))
  assert "step 6" in caplog.text and "unreadable" in caplog.text
  assert summary["resumed_from_step"] == 3 and summary["steps"] == 6
  assert os.listdir(workdir / "corrupt_checkpoints") == ["6"]
  # Replaying steps 4..6 from the good checkpoint reproduces the lost one exactly.
  _assert_trees_equal(params_before, _params(config, workdir)[1])

  # A changed model cannot restore any checkpoint: that is refused, not "repaired".
  config_json = (workdir / "config.json").read_text()
  changed = tiny_config(eval_every=0, **{"model.kwargs.features": (8,)})
  with pytest.raises(loop.NoReadableCheckpointError, match="use a new --workdir"):
    loop.train_and_evaluate(changed, str(workdir))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
  assert (workdir / "config.json").read_text() == config_json


@pytest.mark.parametrize("overrides, expected", [
    ({"debug.nan_at_step": 5}, "non-finite loss (nan) at step 5"),
    ({"optimizer.lr": 1e30, "optimizer.schedule": "constant"}, "non-finite"),
])
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, overrides, expected):
  config = tiny_config(num_steps=8, checkpoint_every=2, eval_every=0, **overrides)
  workdir = tmp_path / "run"
  with pytest.raises(loop.NonFiniteError) as info:
    loop.train_and_evaluate(config, str(workdir))
  message = str(info.value)
  assert expected in message, message
  assert "First layer with non-finite" in message and "params/" in message, message
  assert not (workdir / "summary.json").exists()
  steps_saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints"))
  if steps_saved:
    assert f"Last good checkpoint: step {steps_saved[-1]}" in message, message
    _, params = _params(config, workdir)
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(params))
  else:
    assert "No checkpoint was saved" in message, message
  if "debug.nan_at_step" in overrides:
    assert steps_saved[-1] == 4
    assert "params/dense_0/bias" in message  # first leaf in path order
  events = [r for r in read_jsonl(workdir / "metrics.jsonl") if r.get("event") == "nonfinite"]
  assert len(events) == 1


def _learning_config(bits):
  """60 steps of a small MLP on the 8x8 digits; W4A4 (LSQ weights) in dense_1 when
  `bits` is 4, the first and last layer W8A8."""
  config = tiny_config(**{"dataset.name": "digits", "model.kwargs.features": (32, 32),
                          "num_steps": 60, "log_every": 1, "eval_every": 0,
                          "checkpoint_every": 30})
  if bits != 32:
    config.quant.rules = base.standard_rules(config.quant, first="dense_0", last="head")
    config.quant.bits = bits
  return config


@pytest.fixture(scope="module")
def w4a4_run(tmp_path_factory):
  """(summary, workdir) of the quantized learning run (read-only: tests copy it). One
  run serves the learning check and the quantized-run checks, so its training step and
  serving conversion compile once."""
  workdir = tmp_path_factory.mktemp("w4a4") / "run"
  summary = loop.train_and_evaluate(_learning_config(4), str(workdir))
  return summary, workdir


def test_quantized_run_reports_serving_metrics_and_resumes(w4a4_run, tmp_path):
  summary, finished = w4a4_run
  assert summary["quantized"] and summary["config"]["quant"]["bits"] == 4
  metrics = summary["metrics"]
  assert 0.0 <= metrics["serving_test_accuracy"] <= 1.0
  assert summary["param_bytes"]["quantized"] < summary["param_bytes"]["float"]
  # dense_0 and head at W8A8, dense_1 at W4A4 (bit operations = MACs x b_w x b_a); the
  # digits' 64 inputs -> 32 -> 32 -> 10
  assert summary["compute_per_example"]["bops"] == 2048 * 64 + 1024 * 16 + 320 * 64
  config = _learning_config(4)
  workdir = tmp_path / "w4a4"
  shutil.copytree(finished, workdir)
  _, state, _ = restore.load_checkpoint(config, str(workdir))
  assert "quant_stats" in state["state"]  # activation ranges travel with the checkpoint
  config.num_steps = 62
  summary = loop.train_and_evaluate(config, str(workdir))
  assert summary["resumed_from_step"] == 60 and summary["steps"] == 62


@pytest.mark.parametrize("bits", [32, 4], ids=["float", "w4a4"])
def test_short_training_run_learns(tmp_path, bits, request):
  """60 steps of a small MLP on the 8x8 digits must clearly lower the loss and beat chance.

  Every other end-to-end test checks files, ranges and determinism, which a train step
  that ascends the loss (or whose quantized layers pass no gradient) still satisfies.
  Margins are derived from chance, not from a recorded run: test accuracy above twice
  chance (1 / num_classes), and the mean train loss of the last 10 steps below 0.8x the
  loss of the first step (before any update it is about ln(num_classes), chance level).
  """
  if bits == 4:
    summary, workdir = request.getfixturevalue("w4a4_run")
  else:
    workdir = tmp_path / "run"
    summary = loop.train_and_evaluate(_learning_config(bits), str(workdir))
  assert summary["quantized"] == (bits != 32)

  chance = 1.0 / 10  # digits: 10 classes
  losses = [r["loss"] for r in read_jsonl(workdir / "metrics.jsonl")
            if r.get("split") == "train"]
  assert len(losses) == 60
  initial, final = losses[0], float(np.mean(losses[-10:]))
  assert initial > 0.8 * np.log(1 / chance), initial  # the first step starts near chance
  assert final < 0.8 * initial, (initial, final)
  assert summary["metrics"]["test_accuracy"] > 2 * chance, summary["metrics"]
  assert summary["metrics"]["serving_test_accuracy"] > 2 * chance, summary["metrics"]


def test_one_summary_writer_requires_the_schema_keys(tmp_path):
  from experiments.training.results import write_summary  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=r"needs the key\(s\) \['param_bytes', 'wall_time_s'\]"):
    write_summary(tmp_path, {"config": {}, "metrics": {}})
  assert not (tmp_path / "summary.json").exists()
  path = write_summary(tmp_path, {"config": {}, "metrics": {"x": 1.0},
                                  "param_bytes": {"float": 4, "quantized": 1},
                                  "wall_time_s": 0.5, "extra": True})
  assert json.loads(open(path).read())["extra"] is True
