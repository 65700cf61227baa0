"""Fault injection on the real training harness: `python -m experiments.train` processes
killed with SIGKILL at a random step, damaged checkpoints, a NaN loss, bad configs, torn
result files under the report, and a sweep whose point crashes.

The runs use tests/experiments/fixtures/faults_config.py (a W4A4 MLP on MNIST-1D with stochastic
rounding of weights and activations, a checkpoint every step). Subprocesses share a persistent
XLA compilation cache and an MNIST-1D cache (module-scoped), so after the first run each
one takes ~10 s on a busy 2-core CPU; the `slow` cases run without the caches, on the
sharded MNIST-1D CNN recipe.

Covered elsewhere (not repeated here): in-process resume/corrupt/NaN in test_train.py,
the CLI's unknown key and quant.bits=12 in test_configs.py, the sweep's crash and
two-sweeps-one-workdir cases with the fake trainer in test_sweep.py, malformed
summaries in test_report.py.
"""
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import mnist1d_cnn
from experiments import sweeps
from experiments.sweeps import plan
from experiments.training import restore
from experiments.training.results import read_jsonl

# A failed orbax restore (test_train.py's corrupt-checkpoint case, earlier in the same
# session) leaves coroutines that may be garbage-collected during these tests; harmless.
pytestmark = [pytest.mark.heavy,  # long together: scheduled first (tests/conftest.py)
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = "tests/experiments/fixtures/faults_config.py"
_spec = importlib.util.spec_from_file_location("faults_config", REPO / CONFIG)
faults_config = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(faults_config)
QUANT_FLAGS = ("--config.quant.bits=4",)
NUM_STEPS = faults_config.NUM_STEPS
KILL_SEED, NAN_SEED = 20240611, 7
# The slow variant: the CNN recipe at W4A4 on all (8 host) devices, no caches.
CNN_CONFIG = "configs/mnist1d_cnn.py:w4a4"
CNN_FLAGS = ("--config.num_steps=24", "--config.checkpoint_every=2", "--config.eval_every=8",
             "--config.log_every=1", "--config.keep_checkpoints=2", "--config.progress=False")
CNN_STEPS = 24


# --------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Environment of the trainer subprocesses: CPU, shared compilation + dataset caches."""
  caches = tmp_path_factory.mktemp("faults_caches")
  data_cache = os.environ.get("JAXQUANT_CACHE") or str(caches / "data")
  environ = dict(os.environ, JAX_PLATFORMS="cpu", JAXQUANT_CACHE=data_cache,
                 JAX_COMPILATION_CACHE_DIR=str(caches / "xla"),
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("JAXQUANT_CACHE", data_cache)  # this process's load_checkpoint, too
    yield environ


def bare_env():
  """No persistent caches: every process compiles and builds its data from scratch."""
  environ = {k: v for k, v in os.environ.items()
             if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
  environ.pop("JAXQUANT_CACHE", None)
  return dict(environ, JAX_PLATFORMS="cpu")


def train_argv(workdir, *flags, config=CONFIG, quant=QUANT_FLAGS):
  return [sys.executable, "-m", "experiments.train", f"--config={config}",
          f"--workdir={workdir}", *quant, *flags]


def train(workdir, *flags, env, timeout=300, **kwargs):
  return subprocess.run(train_argv(workdir, *flags, **kwargs), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def error_line(result) -> str:
  """The launcher's one-line error (the last stderr line)."""
  lines = result.stderr.strip().splitlines()
  return lines[-1] if lines else ""


def fixture_config(**overrides):
  config = faults_config.get_config()
  config.quant.bits = 4
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
      node = node[p]
    setattr(node, leaf, value)
  return config


def cnn_config():
  config = mnist1d_cnn.get_config("w4a4")
  config.num_steps, config.checkpoint_every, config.eval_every = CNN_STEPS, 2, 8
  config.log_every, config.keep_checkpoints, config.progress = 1, 2, False
  return config


def final_state(workdir, config=None):
  """(step, whole train state on the host) of the newest checkpoint of `workdir`."""
  step, state, _ = restore.load_checkpoint(config or fixture_config(), str(workdir))
  return step, jax.device_get(state)


def assert_bit_identical(a, b):
  leaves_a = jax.tree_util.tree_leaves_with_path(a)
  leaves_b = jax.tree_util.tree_leaves_with_path(b)
  assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b]
  differ = [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(leaves_a, leaves_b)
            if not np.array_equal(np.asarray(x), np.asarray(y))]
  assert not differ, f"{len(differ)}/{len(leaves_a)} leaves differ, e.g. {differ[:5]}"


def train_losses(workdir):
  """{step: [loss, ...]} of the train records (a replayed step is logged again)."""
  out = {}
  for r in read_jsonl(pathlib.Path(workdir) / "metrics.jsonl"):
    if r.get("split") == "train":
      out.setdefault(r["step"], []).append(r["loss"])
  return out


def logged_train_steps(workdir) -> list[int]:
  return [r["step"] for r in _records(workdir) if r.get("split") == "train"]


def snapshot(directory):
  """{relative path: (kind, size, mtime_ns, bytes)} of everything under `directory`."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for name in dirs + files:
      path = os.path.join(root, name)
      st = os.lstat(path)
      data = None
      if name in files:
        with open(path, "rb") as f:
          data = f.read()
      out[os.path.relpath(path, directory)] = ("file" if data is not None else "dir",
                                              st.st_size, st.st_mtime_ns, data)
  st = os.stat(directory)
  out["."] = ("dir", st.st_size, st.st_mtime_ns, None)
  return out


@dataclasses.dataclass(frozen=True)
class Killed:
  snapshot: pathlib.Path  # the workdir as the SIGKILL left it (copy; never written again)
  kill_step: int  # the run was killed once this train step had been logged (+ a delay)
  last_logged: int  # the last train step in metrics.jsonl at the kill
  stderr: str


def _records(workdir) -> list[dict]:
  try:
    return read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")
  except (OSError, ValueError):
    return []


def run_and_kill(argv, workdir, *, env, kill_step=None, until=None, delay_s=0.0,
                 timeout=300) -> tuple[int, str]:
  """Starts `argv`, waits until train step `kill_step` is logged (or `until(records of
  metrics.jsonl)` holds), sleeps `delay_s`, then SIGKILLs it. Returns (the last logged
  train step, its stderr)."""
  if until is None:
    until = lambda records: any(r.get("split") == "train" and r["step"] >= kill_step
                                for r in records)
  err_path = pathlib.Path(str(workdir) + ".stderr")
  with open(err_path, "w") as err:
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
      deadline = time.monotonic() + timeout
      while not until(_records(workdir)):
        assert proc.poll() is None, (
            f"the run exited ({proc.returncode}) before the kill point: "
            f"{err_path.read_text()[-3000:]}")
        assert time.monotonic() < deadline, "the kill point never came"
        time.sleep(0.005)
      time.sleep(delay_s)
      assert proc.poll() is None, "the run ended before the kill"
      os.kill(proc.pid, signal.SIGKILL)
      proc.wait(timeout=60)
    finally:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  assert proc.returncode == -signal.SIGKILL
  steps = logged_train_steps(workdir)
  return (max(steps) if steps else 0), err_path.read_text()


@pytest.fixture(scope="module")
def runs(env, tmp_path_factory):
  """(reference, killed): an uninterrupted run of the fixture config (read-only: tests
  copy it), and the same run SIGKILLed at a random step (seeded) after a random delay.

  The reference compiles from scratch and fills the compilation cache; the killed run
  (and every later one) then loads its executables: one cold compile instead of two, and
  the reruns' bit-identity with the reference compares loaded executables with freshly
  compiled ones.
  """
  base = tmp_path_factory.mktemp("faults_runs")
  rng = np.random.default_rng(KILL_SEED)
  kill_step = int(rng.integers(2, NUM_STEPS - 3))
  delay_s = float(rng.uniform(0.0, 0.1))
  ref = train(base / "reference", env=env, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  last_logged, stderr = run_and_kill(train_argv(base / "killed"), base / "killed", env=env,
                                     kill_step=kill_step, delay_s=delay_s)
  shutil.copytree(base / "killed", base / "snapshot", symlinks=True)
  return base / "reference", Killed(base / "snapshot", kill_step, last_logged, stderr)


@pytest.fixture(scope="module")
def reference(runs):
  return runs[0]


@pytest.fixture(scope="module")
def killed(runs):
  return runs[1]


# ------------------------------------------------------ 1. SIGKILL, rerun, bit-identical


def test_sigkill_at_a_random_step_then_rerun_is_bit_identical(reference, killed, env, tmp_path):
  assert not (killed.snapshot / "summary.json").exists()
  assert killed.kill_step <= killed.last_logged < NUM_STEPS
  workdir = tmp_path / "run"
  shutil.copytree(killed.snapshot, workdir, symlinks=True)
  result = train(workdir, env=env)  # the same command again
  assert result.returncode == 0, result.stderr[-3000:]

  summary = json.loads((workdir / "summary.json").read_text())
  resumed = summary["resumed_from_step"]
  # Step s is logged before checkpoint s is saved, and checkpoint s-1 before step s runs.
  assert killed.kill_step - 1 <= resumed <= killed.last_logged, (resumed, killed)
  assert summary["steps"] == NUM_STEPS
  step_ref, state_ref = final_state(reference)
  step, state = final_state(workdir)
  assert step == step_ref == NUM_STEPS
  assert_bit_identical(state_ref, state)  # params, optimizer moments, quant ranges, step
  # A kill inside a save leaves N.orbax-checkpoint-tmp; the rerun's save of N replaces it.
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "11", "12"]
  ref_summary = json.loads((reference / "summary.json").read_text())
  assert summary["metrics"] == ref_summary["metrics"]
  assert summary["param_bytes"] == ref_summary["param_bytes"]

  # Every train step (replayed ones are logged twice) has the reference's loss.
  ref_losses = {s: v[0] for s, v in train_losses(reference).items()}
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, NUM_STEPS + 1))
  for s, values in losses.items():
    assert values == [ref_losses[s]] * len(values), s
  assert len(losses[resumed + 1]) == (2 if resumed < killed.last_logged else 1)
  events = [r for r in read_jsonl(workdir / "metrics.jsonl") if r.get("event") == "resume"]
  assert [e["step"] for e in events] == [resumed]


# ------------------------------ 1b. SIGUSR1 / SIGTERM: save, exit 75, rerun, bit-identical


def test_stop_signal_saves_exits_75_and_rerun_is_bit_identical(reference, env, tmp_path):
  """What a scheduler's preemption does (SLURM: `--signal=USR1@T`, `scancel
  --signal=USR1`): the run saves at the end of the running step and exits 75, with no
  checkpoint period set; the same command then finishes bit-identical. The signal is a
  real SIGUSR1 that the trainer sends itself during step 4 (debug.signal_at_step), so
  the step is known; SIGTERM takes the same path (tests/experiments/test_preemption.py)."""
  workdir = tmp_path / "run"
  stopped = train(workdir, "--config.checkpoint_every=0", "--config.debug.signal_at_step=4",
                  env=env)
  assert stopped.returncode == 75, stopped.stderr[-3000:]
  assert ("stopped by SIGUSR1 at step 4" in stopped.stderr
          and "rerun the same command" in stopped.stderr), stopped.stderr[-3000:]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4"]  # only the stop's save
  events = [r for r in read_jsonl(workdir / "metrics.jsonl") if r.get("event") == "preempted"]
  assert [e["step"] for e in events] == [4]
  assert not (workdir / "summary.json").exists()

  result = train(workdir, "--config.checkpoint_every=0", env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["resumed_from_step"] == 4 and summary["steps"] == NUM_STEPS
  assert_bit_identical(final_state(reference)[1], final_state(workdir)[1])
  ref_summary = json.loads((reference / "summary.json").read_text())
  assert summary["metrics"] == ref_summary["metrics"]


# ------------------------------------- 5a. what a SIGKILL leaves behind is all parseable


def test_sigkill_leaves_only_parseable_result_files(killed):
  workdir = killed.snapshot
  config = json.loads((workdir / "config.json").read_text())
  assert config["quant"]["bits"] == 4 and config["num_steps"] == NUM_STEPS
  text = (workdir / "metrics.jsonl").read_text()
  complete = text.splitlines(keepends=True)
  if complete and not complete[-1].endswith("\n"):
    complete = complete[:-1]  # a torn last line is allowed (read_jsonl skips it)
  assert [json.loads(line) for line in complete] == read_jsonl(workdir / "metrics.jsonl")
  assert max(logged_train_steps(workdir)) == killed.last_logged
  leftovers = [p.name for p in workdir.iterdir() if p.name.endswith(".tmp")]
  assert not leftovers and not (workdir / "summary.json").exists()
  assert "Traceback" not in killed.stderr


@pytest.mark.slow
def test_sigkill_after_the_last_checkpoint_rerun_only_evaluates(reference, env, tmp_path):
  """Killed during the final evaluation (step 12 saved, no summary.json yet): the rerun
  restores step 12, trains nothing, and writes the reference's summary."""
  workdir = tmp_path / "run"
  run_and_kill(train_argv(workdir), workdir, env=env, until=lambda records: any(
      r.get("split") == "test" and r["step"] == NUM_STEPS for r in records))
  assert not (workdir / "summary.json").exists()
  result = train(workdir, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  ref_summary = json.loads((reference / "summary.json").read_text())
  assert summary["resumed_from_step"] == NUM_STEPS == summary["steps"]
  assert summary["metrics"] == ref_summary["metrics"]  # final_loss from the checkpoint
  assert_bit_identical(final_state(reference)[1], final_state(workdir)[1])


# ------------------------------------------ 2. a damaged latest checkpoint is set aside


def _damage(step_dir: pathlib.Path, mode: str) -> str:
  """Damages one file of a checkpoint directory; returns what was done."""
  state = step_dir / "state"
  if mode == "garble":  # bytes overwritten in the middle of the largest array data file
    data_files = [p for p in state.rglob("*") if p.is_file() and p.parent.name == "d"]
    path = max(data_files, key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 16] = bytes(255 - b for b in data[middle:middle + 16])
    path.write_bytes(bytes(data))
  elif mode == "truncate_meta":  # the JSON item (data-iterator position) cut in half
    path = step_dir / "meta" / "metadata"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
  elif mode == "empty_state_metadata":  # the array tree metadata emptied
    path = state / "_METADATA"
    path.write_bytes(b"")
  else:
    raise ValueError(mode)
  return f"{mode} {path.relative_to(step_dir)}"


@pytest.mark.parametrize("mode", [
    "garble",
    pytest.param("truncate_meta", marks=pytest.mark.slow),
    pytest.param("empty_state_metadata", marks=pytest.mark.slow),
])
def test_damaged_latest_checkpoint_warns_and_resumes_from_the_previous(reference, env,
                                                                      tmp_path, mode):
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir, symlinks=True)
  (workdir / "summary.json").unlink()
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "11", "12"]
  what = _damage(workdir / "checkpoints" / "12", mode)

  result = train(workdir, env=env)
  assert result.returncode == 0, f"{what}: {result.stderr[-3000:]}"
  assert re.search(r"checkpoint at step 12 in \S+ is unreadable .*falling back to step 11",
                   result.stderr), f"{what}: {result.stderr[-3000:]}"
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["resumed_from_step"] == 11 and summary["steps"] == NUM_STEPS, what
  assert os.listdir(workdir / "corrupt_checkpoints") == ["12"]
  assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "11", "12"]
  _, state_ref = final_state(reference)
  _, state = final_state(workdir)
  assert_bit_identical(state_ref, state)  # step 12 replayed from 11 == the lost one


# ---------------------------------------------- 3. NaN loss: step, layer, exit 1, last good


def _nan_run(reference, env, workdir) -> int:
  """A run with a NaN injected at a random step: checks the failure; returns the step."""
  nan_step = int(np.random.default_rng(NAN_SEED).integers(3, NUM_STEPS))
  result = train(workdir, f"--config.debug.nan_at_step={nan_step}", env=env)
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  message = error_line(result)
  assert message.startswith(f"experiments.train: error: Training stopped: non-finite loss "
                            f"(nan) at step {nan_step} (injected"), message
  assert re.search(r"First layer with non-finite gradients: params/dense_\d/(bias|kernel)\.",
                   message), message
  assert f"Last good checkpoint: step {nan_step - 1} in {workdir}/checkpoints" in message
  assert not (workdir / "summary.json").exists()
  saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints"))
  assert saved[-1] == nan_step - 1 and len(saved) <= 3
  step, state = final_state(workdir)
  assert step == nan_step - 1
  assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(state)
             if np.issubdtype(np.asarray(x).dtype, np.floating))
  # Up to the NaN the run is the reference run; the NaN step itself is not logged.
  ref_losses = train_losses(reference)
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, nan_step))
  assert all(losses[s] == ref_losses[s] for s in losses)
  events = [r for r in read_jsonl(workdir / "metrics.jsonl") if r.get("event") == "nonfinite"]
  assert [e["step"] for e in events] == [nan_step]
  return nan_step


def test_nan_loss_exits_1_naming_step_and_layer_and_keeps_last_good(reference, env, tmp_path):
  _nan_run(reference, env, tmp_path / "run")


@pytest.mark.slow
def test_after_a_nan_stop_the_rerun_continues_from_the_last_good_checkpoint(reference, env,
                                                                           tmp_path):
  workdir = tmp_path / "run"
  nan_step = _nan_run(reference, env, workdir)
  # Without the injected NaN, the same workdir continues from the last good checkpoint and
  # ends where the uninterrupted run did.
  again = train(workdir, env=env)
  assert again.returncode == 0, again.stderr[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["resumed_from_step"] == nan_step - 1
  assert_bit_identical(final_state(reference)[1], final_state(workdir)[1])


# ------------------------------------------------ 4. bad configs: exit 2, workdir untouched


# name: (config arg, flags, fragments of the one-line message). The CLI's unknown key and
# quant.bits out of range are in test_configs.py (existing and new workdir).
BAD_CONFIGS = {
    "wrong type": (CONFIG, ["--config.num_steps=many"], ["num_steps", "'many'", "int"]),
    "invalid regex": (f"{CONFIG}:badregex", [],
                      ["quant.rules[0]", "pattern='dense_(0'", "regex"]),
}
# Slow: each more process checks the same CLI path (exit 2, one line, workdir untouched);
# their messages are checked in-process by test_configs.py's
# test_bad_config_raises_one_clear_message.
MORE_BAD_CONFIGS = {
    "unknown dataset": (CONFIG, ["--config.dataset.name=mnist2d"],
                        ["dataset.name", "'mnist2d'", "['mnist1d', 'digits', 'pytext']"]),
    "unknown model": (CONFIG, ["--config.model.name=vgg"],
                      ["model.name", "'vgg'", "['mlp', 'cnn1d', 'resnet', 'gpt', 'bert']"]),
    "unknown spec field": (f"{CONFIG}:badfield", [],
                           ["quant.rules[1].weight.granularty", "granularity"]),
    "act bits out of range": (CONFIG, ["--config.quant.act_bits=1"],
                              ["quant.act_bits", "=1", "[2, 3, 4, 5, 6, 7, 8, 16]"]),
    "unknown variant": ("configs/mnist1d_cnn.py:w3a3", [],
                        ["--config", "'w3a3'",
                         "['float', 'w8a8', 'w4a4', 'w2a2', 'binary', 'ptq_w8a8', 'ptq_w4a4']"]),
    "tuple of the wrong length": (CONFIG, ["--config.mesh_shape=(2,2,2)"],
                                  ["mesh_shape", "(2, 2, 2)", "3 entries", "tuple of 2"]),
}
NEW_WORKDIR_CASES = ("invalid regex",)


@pytest.mark.parametrize("cases", [
    BAD_CONFIGS, pytest.param(MORE_BAD_CONFIGS, marks=pytest.mark.slow)], ids=["core", "more"])
def test_bad_configs_exit_2_with_one_message_and_leave_the_workdir_alone(reference, env,
                                                                        tmp_path, cases):
  """Each bad config against a copy of a finished run's workdir (listing, sizes, mtimes
  and bytes compared) and, for some, against a workdir that does not exist yet. The
  processes run concurrently."""
  jobs = []
  for i, (name, (config, flags, fragments)) in enumerate(cases.items()):
    existing = tmp_path / f"existing{i}"
    shutil.copytree(reference, existing, symlinks=True)
    jobs.append((name, existing, snapshot(existing), config, flags, fragments))
    if name in NEW_WORKDIR_CASES:
      jobs.append((name, tmp_path / f"new{i}" / "run", None, config, flags, fragments))
  procs = [subprocess.Popen(train_argv(workdir, *flags, config=config, quant=()), cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
           for _, workdir, _, config, flags, _ in jobs]
  problems = []
  for (name, workdir, before, _, _, fragments), proc in zip(jobs, procs):
    stdout, stderr = proc.communicate(timeout=300)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    message = error_line(result)
    where = "existing" if before is not None else "new"
    if result.returncode != 2:
      problems.append(f"{name} ({where}): exit {result.returncode}: {stderr[-2000:]}")
      continue
    if "Traceback" in stderr or stderr.count("experiments.train: error:") != 1:
      problems.append(f"{name} ({where}): not one clean message: {stderr[-2000:]}")
    missing = [f for f in fragments if f not in message]
    if missing or not message.startswith("experiments.train: error: "):
      problems.append(f"{name} ({where}): {missing} not in {message!r}")
    if before is not None and snapshot(workdir) != before:
      problems.append(f"{name}: the existing workdir changed")
    if before is None and workdir.parent.exists():
      problems.append(f"{name}: created {workdir.parent}")
  assert not problems, "\n".join(problems)


# ------------------------------------ 5b. torn / leftover result files and the report


def test_report_survives_torn_metrics_tmp_leftovers_and_a_killed_run(reference, killed,
                                                                    tmp_path):
  sweep_dir = tmp_path / "sweep"
  points = sweeps.build_points([{"seed": 0}, {"seed": 1}], config_arg=CONFIG,
                               workdir=str(sweep_dir))
  plan.write_sweep_json(str(sweep_dir), points, config_arg=CONFIG, trainer="experiments.train")
  done, dead = (pathlib.Path(p.directory) for p in points)
  shutil.copytree(reference, done, symlinks=True)
  shutil.copytree(killed.snapshot, dead, symlinks=True)
  records = read_jsonl(done / "metrics.jsonl")
  with open(done / "metrics.jsonl", "a") as f:  # a crash in the middle of an append
    f.write('{"step": 13, "split": "train", "loss": 0.12')
  summary_text = (done / "summary.json").read_text()
  # What a crash inside write_json_atomic (or a naive writer) can leave next to it.
  (done / "summary.json.tmp").write_text(summary_text[: len(summary_text) // 2])
  (done / ".summary.json.k3j2l1.tmp").write_text(summary_text[:10])
  (dead / "summary.json.tmp").write_text("{")
  assert read_jsonl(done / "metrics.jsonl") == records  # the torn line is skipped

  result = subprocess.run([sys.executable, "-m", "experiments.report",
                           f"--workdir={sweep_dir}"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "report: warning" not in result.stderr, result.stderr
  accuracy = json.loads(summary_text)["metrics"]["test_accuracy"]
  assert "2 points: 1 ok, 1 not run" in result.stdout, result.stdout
  assert f"| 1/2 | {accuracy:.4f} |" in result.stdout, result.stdout  # seeds averaged
  assert "## Not run\n\n- seed=1\n" in result.stdout, result.stdout


# ---------------------------------------------- 6. a real sweep with a crashing point


@pytest.mark.slow
def test_real_sweep_point_with_nan_fails_others_finish_report_lists_it(reference, env,
                                                                      tmp_path):
  sweep_dir = tmp_path / "sweep"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", f"--config={CONFIG}:nanpoint",
       f"--workdir={sweep_dir}", "--parallel=2"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 1, result.stdout + result.stderr[-3000:]
  assert "1 ok, 0 skipped (0 done before, 0 left to another sweep), 1 failed" in result.stdout
  good = sweep_dir / "debug.nan_at_step=-1,seed=0"
  bad = sweep_dir / "debug.nan_at_step=3,seed=0"
  summary = json.loads((good / "summary.json").read_text())
  assert summary["steps"] == NUM_STEPS and summary["config"]["quant"]["bits"] == 4
  failure = json.loads((bad / "failed.json").read_text())
  assert failure["returncode"] == 1
  assert "non-finite loss (nan) at step 3" in failure["log_tail"], failure
  assert not (bad / "summary.json").exists()

  report = subprocess.run([sys.executable, "-m", "experiments.report",
                           f"--workdir={sweep_dir}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert report.returncode == 0, report.stderr[-3000:]
  assert "2 points: 1 ok, 1 failed" in report.stdout, report.stdout
  assert "### debug.nan_at_step=3,seed=0\n\nexit status 1" in report.stdout, report.stdout
  assert "non-finite loss (nan) at step 3" in report.stdout


# ------------------------------------------ slow: the CNN recipe, sharded, killed twice


@pytest.mark.slow
def test_cnn_recipe_killed_twice_then_finished_is_bit_identical(tmp_path):
  """No caches (each process compiles from scratch), 8 host devices (data-parallel),
  mid-run evaluations, a checkpoint every 2 steps, and two SIGKILLs at random steps."""
  environ = bare_env()
  full, run = tmp_path / "full", tmp_path / "run"
  result = train(full, *CNN_FLAGS, env=environ, config=CNN_CONFIG, quant=QUANT_FLAGS,
                 timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  rng = np.random.default_rng(KILL_SEED + 1)
  first = int(rng.integers(3, CNN_STEPS // 2))
  second = int(rng.integers(first + 3, CNN_STEPS - 3))
  argv = train_argv(run, *CNN_FLAGS, config=CNN_CONFIG)
  kills = []
  for kill_step in (first, second):
    last, stderr = run_and_kill(argv, run, env=environ, kill_step=kill_step,
                                delay_s=float(rng.uniform(0.0, 0.2)), timeout=600)
    assert "Traceback" not in stderr
    kills.append((kill_step, last))
  result = subprocess.run(argv, cwd=REPO, env=environ, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((run / "summary.json").read_text())
  assert summary["resumed_from_step"] is not None
  assert summary["resumed_from_step"] <= kills[-1][1] and summary["resumed_from_step"] % 2 == 0
  events = [r["step"] for r in read_jsonl(run / "metrics.jsonl") if r.get("event") == "resume"]
  assert len(events) == 2, (events, kills)
  assert summary["mesh"]["num_devices"] == 8
  assert summary["metrics"] == json.loads((full / "summary.json").read_text())["metrics"]
  step_full, state_full = final_state(full, cnn_config())
  step_run, state_run = final_state(run, cnn_config())
  assert step_full == step_run == CNN_STEPS
  assert_bit_identical(state_full, state_run)


# --------------------------------------------- a config that validates must not crash late


def test_stochastic_weight_rounding_converts_for_serving(reference):
  """Was a crash after training (convert quantized the serving kernels without a key).
  The reference run trains the fixture config (stochastic rounding of weights and
  activations) and ends with that conversion and the serving model's evaluation."""
  summary = json.loads((reference / "summary.json").read_text())
  assert summary["quantized"]
  assert 0.0 <= summary["metrics"]["serving_test_accuracy"] <= 1.0
  assert summary["param_bytes"]["quantized"] < summary["param_bytes"]["float"]
  records = read_jsonl(reference / "metrics.jsonl")
  assert [r["step"] for r in records if r.get("split") == "serving_test"] == [NUM_STEPS]
