"""Every claim recipe in configs/claims/: its sweep plans (the --launcher=print path),
its first quantized point takes two jitted training steps (a representative few recipes
in the default suite, the others marked slow), and
(marked slow) that point runs end to end for 2 steps, so no recipe rots.

The end-to-end run (~30-45 s each, compile-dominated: train, evaluation and serving
steps) is the sweep's own command for its first quantized point with tiny overrides
appended (2 steps, batch 8; the GPT claim with a one-layer, 16-wide model). The default
suite's check compiles only the training step (~5 s each).
"""
import glob
import json
import os
import pathlib
import subprocess
import sys

import pytest

import jax
import numpy as np

from experiments.data import BatchIterator
from experiments.config_file import load_config_module
from experiments.sweeps import build_points, load_sweep
from experiments.training import run_setup, steps
from experiments.training.config_build import rules_from_config, validate_config
from tests.experiments.test_configs import _apply

pytestmark = pytest.mark.heavy  # long together: scheduled first (tests/conftest.py)

REPO = pathlib.Path(__file__).resolve().parents[2]
RECIPES = sorted(os.path.relpath(p, REPO) for p in glob.glob(str(REPO / "configs/claims/*.py"))
                 if os.path.basename(p) not in ("__init__.py", "common.py"))
TINY = ["--config.num_steps=2", "--config.batch_size=8", "--config.log_every=1",
        "--config.eval_every=0", "--config.checkpoint_every=0"]
TINY_GPT = ["--config.model.kwargs.d_model=16", "--config.model.kwargs.num_layers=1",
            "--config.model.kwargs.num_heads=2", "--config.dataset.seq_len=16",
            "--config.model.kwargs.max_len=16"]


def test_every_claim_is_listed():
  names = {pathlib.Path(p).stem for p in RECIPES}
  assert {"bit_ladder", "four_ways", "estimators", "edge_layers", "quantized_grads",
          "lr_clipping", "size_savings", "gpt_bytes"} <= names
  readme = (REPO / "configs/claims/README.md").read_text()
  for name in names:
    assert f"{name}.py" in readme, name


@pytest.mark.parametrize("recipe", RECIPES)
def test_claim_recipe_plans(recipe, tmp_path):
  points = load_sweep(recipe)
  assert len({p["seed"] for p in points}) >= 3, "a claim runs >= 3 seeds"
  printed = subprocess.run([sys.executable, "-m", "experiments.sweep", f"--config={recipe}",
                            f"--workdir={tmp_path / 'p'}", "--launcher=print"],
                           cwd=REPO, capture_output=True, text=True, timeout=120)
  assert printed.returncode == 0, printed.stderr
  assert len(printed.stdout.strip().splitlines()) == len(points)
  assert not (tmp_path / "p").exists()  # print writes nothing
  # Every point's config (its variant, then its overrides) passes the trainer's checks,
  # which build the jaxquant Rules, so an invalid spec fails here, not in the sweep.
  module = load_config_module(recipe)
  for p in points:
    overrides = {k: v for k, v in p.items() if k != "config_arg"}
    config = _apply(module.get_config(p.get("config_arg")), overrides)
    validate_config(config)
    assert bool(rules_from_config(config.quant)) == (config.quant.bits != 32)


def _point_config(module, point, extra=None):
  overrides = {k: v for k, v in point.items() if k != "config_arg"}
  return _apply(module.get_config(point.get("config_arg")), {**overrides, **(extra or {})})


def _first_quantized(recipe):
  """Index of the recipe's first point whose resolved config quantizes."""
  module = load_config_module(recipe)
  return next(i for i, p in enumerate(load_sweep(recipe))
              if _point_config(module, p).quant.bits != 32)


def _first_quantized_config(recipe, extra):
  module = load_config_module(recipe)
  return _point_config(module, load_sweep(recipe)[_first_quantized(recipe)], extra)


# Each recipe's sweep points are built and validated by test_claim_recipe_plans (default,
# cheap). Stepping is compile-dominated (5-15 s per recipe on the 2-core CI machine), so
# the default suite steps a representative few: a QAT recipe (four_ways), the PTQ path
# (ptq_vs_qat), and size_savings (its steps compile to ptq_vs_qat's); the rest run with
# `-m slow`.
_DEFAULT_STEP_RECIPES = ("configs/claims/four_ways.py", "configs/claims/ptq_vs_qat.py",
                         "configs/claims/size_savings.py")


@pytest.mark.parametrize("recipe", [r if r in _DEFAULT_STEP_RECIPES
                                    else pytest.param(r, marks=pytest.mark.slow)
                                    for r in RECIPES])
def test_claim_recipe_trains_two_steps(recipe):
  """The recipe's first quantized point builds (model, rules, optimizer) and two jitted
  training steps run: finite losses, and the trainable variables move."""
  extra = {"batch_size": 8, "mesh_shape": (1, 1), "distill.teacher_workdir": "", "init.from_workdir": ""}
  if "gpt" in recipe:
    extra.update({"model.kwargs.d_model": 16, "model.kwargs.num_layers": 1,
                  "model.kwargs.num_heads": 2, "model.kwargs.max_len": 16,
                  "dataset.seq_len": 16})
  config = _first_quantized_config(recipe, extra)
  setup = run_setup.prepare(config)
  assert setup.quantized or setup.ptq_rules
  data = BatchIterator(setup.dataset, batch_size=8, seed=0)
  state = setup.init_fn(jax.random.key(0), next(data)["x"])
  before = jax.tree_util.tree_leaves(state["trainable"])
  step = jax.jit(steps.make_train_step(setup.model, setup.tx, setup.schedule,
                                       quantized=setup.quantized, seed=0, nan_at_step=-1))
  for _ in range(2):
    state, metrics = step(state, next(data))
    assert np.isfinite(float(metrics["loss"]))
  after = jax.tree_util.tree_leaves(state["trainable"])
  assert any(not np.array_equal(a, b) for a, b in zip(before, after))


# ~45 s per recipe on a loaded 2-core CPU (jit compiles of the QAT, eval and serving
# steps), so slow: eight of them would not fit the default suite's budget.
@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_claim_recipe_one_point_trains(recipe, tmp_path):
  built = build_points(load_sweep(recipe), config_arg=recipe, workdir=str(tmp_path))
  # The first point whose config quantizes (the float baseline exercises less).
  point = built[_first_quantized(recipe)]
  extra = TINY + (TINY_GPT if "gpt" in recipe else [])
  run = subprocess.run([*point.argv, *extra], cwd=REPO, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  summary = json.loads(pathlib.Path(point.directory, "summary.json").read_text())
  assert summary["steps"] == 2
  assert summary["config"]["quant"]["bits"] != 32
  assert summary["param_bytes"]["quantized"] < summary["param_bytes"]["float"]
