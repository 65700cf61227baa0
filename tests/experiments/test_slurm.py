"""The slurm launcher against a real one-node SLURM cluster (munged, slurmctld, slurmd).

CI starts the cluster with `.ci/slurm_cluster.sh` and exports SLURM_CONF; elsewhere the
`cluster` fixture starts one when it can (root, slurm-wlm installed) and stops what it
started. Without either, every test here is skipped with the reason.

Jobs are real: `python -m experiments.sweep --launcher=slurm` submits job arrays through
submitit, slurmd runs them, and the points run the fake trainer (the fast cases) or the
real one (a 2-task W8A8 point and a preempted point, both marked slow, which .ci/run
runs after the default suite with `-m "slurm and slow"`).
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.config_file import load_config_module
from experiments.sweeps import slurm, task
from experiments.training import loop, preemption, restore
from experiments.training.results import read_jsonl
from tests.conftest import subprocess_xla_flags

pytestmark = [pytest.mark.slurm,
              pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")]

REPO = pathlib.Path(__file__).resolve().parents[2]
FAKE = ["--config=tests/experiments/fixtures/fake_config.py:crash",
        "--trainer=tests.experiments.fixtures.fake_train"]
REAL_CONFIG = "tests/experiments/fixtures/slurm_config.py"
SCRIPT = REPO / ".ci" / "slurm_cluster.sh"


def _cluster_up(env) -> bool:
  try:
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True,
                         text=True, timeout=20)
  except (OSError, subprocess.SubprocessError):
    return False
  return out.returncode == 0 and any(s.strip().startswith(("idle", "mix", "alloc"))
                                     for s in out.stdout.splitlines())


@pytest.fixture(scope="module")
def cluster():
  """The environment (with SLURM_CONF) of a running cluster; skips when none can start.

  Without this test process's host device count (each job process sees one CPU device),
  with its XLA optimization level (`conftest.subprocess_xla_flags`)."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if subprocess_xla_flags():
    env["XLA_FLAGS"] = subprocess_xla_flags()
  if env.get("SLURM_CONF") and _cluster_up(env):
    yield env
    return
  if shutil.which("slurmctld") is None or shutil.which("munged") is None:
    pytest.skip("no SLURM cluster: slurm-wlm and munge are not installed (run `bash "
                ".ci/slurm_cluster.sh install`, as root)")
  if os.geteuid() != 0:
    pytest.skip("no SLURM cluster: SLURM_CONF is unset and starting one needs root")
  started = subprocess.run(["bash", str(SCRIPT), "start"], capture_output=True, text=True,
                           timeout=120)
  if started.returncode != 0:
    pytest.skip(f"no SLURM cluster: .ci/slurm_cluster.sh start failed: "
                f"{started.stderr.strip()[-500:]}")
  conf = started.stdout.strip().split("SLURM_CONF=")[-1]
  env["SLURM_CONF"] = conf
  ours = "already running" not in started.stderr
  try:
    yield env
  finally:
    if ours:
      subprocess.run(["bash", str(SCRIPT), "stop"], capture_output=True, timeout=120)


def sweep(env, workdir, *flags, timeout=300):
  return subprocess.run([sys.executable, "-m", "experiments.sweep", f"--workdir={workdir}",
                         "--launcher=slurm", "--slurm_time=10", *flags], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def queued(env):
  out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %j"], env=env, capture_output=True,
                       text=True, timeout=20).stdout
  return [line.split() for line in out.splitlines() if line.strip()]


def wait_until_gone(env, ids, timeout=60.0):
  """Waits until no job of `ids` (job or array-task ids) is in the queue any more.

  A sweep returns once every point's summary is written; the jobs that wrote them may
  still be completing in slurmctld's queue for a moment after that."""
  arrays = {i.split("_")[0] for i in ids}
  deadline = time.monotonic() + timeout
  while any(j.split("_")[0] in arrays for j, _ in queued(env)):
    assert time.monotonic() < deadline, f"jobs {sorted(arrays)} still queued: {queued(env)}"
    time.sleep(0.5)


def read_json(path):
  return json.loads(pathlib.Path(path).read_text())


def ledger_counts(path):
  return {n: path.read_text().split().count(n) for n in set(path.read_text().split())}


# ------------------------------------------------------------ fast cases (fake trainer)


def test_three_point_sweep_with_a_crash_then_rerun_resumes(cluster, tmp_path):
  workdir, ledger = tmp_path / "sweep", tmp_path / "ledger.txt"
  env = dict(cluster, FAKE_TRAIN_LEDGER=str(ledger))
  first = sweep(env, workdir, *FAKE)
  out = first.stdout + first.stderr
  assert first.returncode == 1, out
  assert out.count(" submit ") == 3 and "2 ok, 0 skipped" in out and "1 failed" in out, out
  assert "FAILED crash=True,seed=1 (exit status 1" in out and "report: python -m" in out
  for name in ("crash=False,seed=0", "crash=False,seed=2"):
    assert (workdir / name / "summary.json").exists()
    assert read_json(workdir / name / "slurm_job.json")["job_id"]
  failure = read_json(workdir / "crash=True,seed=1" / "failed.json")
  assert failure["returncode"] == 1 and "fake crash at step 3" in failure["log_tail"]
  assert "--config.crash=True" in failure["command"]

  again = sweep(env, workdir, *FAKE)  # the same command: only the failed point reruns
  out = again.stdout + again.stderr
  assert again.returncode == 1 and "0 ok, 2 skipped (2 done before" in out, out
  assert out.count(" submit ") == 1
  assert ledger_counts(ledger) == {"crash=False,seed=0": 1, "crash=False,seed=2": 1,
                                   "crash=True,seed=1": 2}
  report = subprocess.run([sys.executable, "-m", "experiments.report", f"--workdir={workdir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert report.returncode == 0, report.stderr[-3000:]
  assert (workdir / "report.md").exists()


def test_nowait_returns_job_ids_and_a_rerun_follows_them(cluster, tmp_path):
  workdir, ledger = tmp_path / "sweep", tmp_path / "ledger.txt"
  env = dict(cluster, FAKE_TRAIN_LEDGER=str(ledger))
  flags = ["--config=tests/experiments/fixtures/fake_config.py:many",
           "--trainer=tests.experiments.fixtures.fake_train"]
  submitted = sweep(env, workdir, *flags, "--nowait")
  assert submitted.returncode == 0, submitted.stderr
  assert "8 point(s) queued, job ids: " in submitted.stdout
  ids = submitted.stdout.split("job ids: ")[1].split("\n")[0].split()
  assert len(ids) == 8 and len({i.split("_")[0] for i in ids}) == 1  # one job array
  followed = sweep(env, workdir, *flags)
  out = followed.stdout
  assert followed.returncode == 0, out + followed.stderr
  assert " submit " not in out  # every point was queued or done: nothing resubmitted
  assert "8 skipped" in out or "from an earlier submission" in out
  for name in set(ledger.read_text().split()):
    assert (workdir / name / "summary.json").exists()
  assert sorted(ledger_counts(ledger).values()) == [1] * 8
  wait_until_gone(env, ids)  # leave an empty queue to the tests that compare it


@pytest.mark.parametrize("flag,message", [
    ("--slurm_partition=nosuch", "'nosuch' is not a partition of this cluster"),
    ("--slurm_ntasks_per_point=64", "but the nodes of partition"),
    ("--slurm_gpus_per_task=1", "GPU(s) on one node"),
    ("--slurm_time=1-00:00:00:00", "use minutes or [D-]HH:MM[:SS]"),
    ("--slurm=output=x.log", "output is set by the launcher"),
], ids=["partition", "ntasks", "gpus", "time", "reserved"])
def test_bad_launcher_flags_fail_before_anything_is_submitted(cluster, tmp_path, flag,
                                                              message):
  workdir = tmp_path / "sweep"
  workdir.mkdir()
  (workdir / "notes.txt").write_text("keep me")
  before = queued(cluster)
  result = sweep(cluster, workdir, *FAKE, flag)
  assert result.returncode == 2 and message in result.stderr, result.stderr
  assert sorted(p.name for p in workdir.iterdir()) == ["notes.txt"]
  assert (workdir / "notes.txt").read_text() == "keep me"
  # No new job: every entry queued now was queued before (an earlier test's finished
  # job may have left the queue meanwhile).
  assert not {tuple(j) for j in queued(cluster)} - {tuple(j) for j in before}


def test_the_task_and_the_trainer_agree_on_the_preempted_status():
  assert task.PREEMPTED_EXIT == preemption.PREEMPTED_EXIT
  assert slurm.time_minutes("90") == 90 and slurm.time_minutes("1:30:00") == 90
  assert slurm.time_minutes("1-0") == 1440 and slurm.time_minutes("2:30") == 3
  assert slurm.parse_options(["mem=4G", "exclusive", "--qos=high"]) == (
      ("mem", "4G"), ("exclusive", True), ("qos", "high"))


# ------------------------------------------------------------ real trainer points


def _losses(workdir):
  return [r["loss"] for r in read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")
          if r.get("split") == "train"]


def _config():
  """The real points' config with the sweep's override (seed 0)."""
  config = load_config_module(str(REPO / REAL_CONFIG)).get_config()
  config.seed = 0
  return config


@pytest.mark.slow  # ~1-3 min: two jax processes joined over gloo; CI runs it
def test_two_task_point_is_one_two_process_run_that_matches_one_process(cluster, tmp_path):
  """W8A8 QAT of the MNIST-1D CNN, the data axis over both processes' devices."""
  workdir = tmp_path / "sweep"
  result = sweep(cluster, workdir, f"--config={REAL_CONFIG}:one", "--slurm_ntasks_per_point=2",
                 timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  point = workdir / "seed=0"
  summary = read_json(point / "summary.json")
  assert summary["mesh"] == {"shape": {"data": 2, "model": 1}, "num_devices": 2,
                             "num_processes": 2}
  assert summary["quantized"] and summary["config"]["quant"]["bits"] == 8
  assert (point / "log.task1.txt").exists()  # task 1 ran the trainer too
  assert "Rank 1 is connected" in (point / "log.task1.txt").read_text()  # gloo peers
  # Process 0 alone writes the metrics and TensorBoard files.
  assert len(list((point / "tensorboard").iterdir())) == 1
  steps = [r["step"] for r in read_jsonl(point / "metrics.jsonl") if r.get("split") == "train"]
  assert steps == list(range(1, 41))

  # One process driving the same 2-device mesh: the same curve to float rounding.
  config = _config()
  config.mesh_shape = (2, 1)
  single = loop.train_and_evaluate(config, str(tmp_path / "single"))
  assert single["mesh"] == {"shape": {"data": 2, "model": 1}, "num_devices": 8,
                            "num_processes": 1}
  np.testing.assert_allclose(_losses(point), _losses(tmp_path / "single"), rtol=1e-5)
  np.testing.assert_allclose(summary["metrics"]["final_loss"],
                             single["metrics"]["final_loss"], rtol=1e-5)
  np.testing.assert_allclose(summary["metrics"]["test_loss"],
                             single["metrics"]["test_loss"], rtol=1e-5)


@pytest.mark.slow  # ~1.5-2.5 min: two trainer runs and SLURM's requeue delay; CI runs it
def test_preempted_point_is_requeued_and_resumes_bit_identical(cluster, tmp_path):
  """`scancel --signal=USR1` mid-run: the trainer saves and exits 75, submitit requeues
  the job, the requeued job resumes from the checkpoint, and the final train state equals
  an uninterrupted run's bit for bit."""
  workdir = tmp_path / "sweep"
  proc = subprocess.Popen(
      [sys.executable, "-m", "experiments.sweep", f"--workdir={workdir}", "--launcher=slurm",
       "--slurm_time=10", f"--config={REAL_CONFIG}:long"],
      cwd=REPO, env=cluster, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  point = workdir / "num_steps=1500,seed=0"
  try:
    deadline = time.monotonic() + 300
    while not any(r.get("split") == "train" and r["step"] >= 3
                  for r in _records(point / "metrics.jsonl")):
      assert proc.poll() is None, proc.stdout.read()
      assert time.monotonic() < deadline, "step 3 was never logged"
      time.sleep(0.01)
    job_id = read_json(point / "slurm_job.json")["job_id"]
    subprocess.run(["scancel", "--signal=USR1", job_id], env=cluster, check=True, timeout=30)
    out, _ = proc.communicate(timeout=420)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 0, out
  records = read_jsonl(point / "metrics.jsonl")
  stops = [r["step"] for r in records if r.get("event") == "preempted"]
  resumes = [r["step"] for r in records if r.get("event") == "resume"]
  assert len(stops) == 1 and resumes == stops, (stops, resumes)
  summary = read_json(point / "summary.json")
  assert summary["resumed_from_step"] == stops[0] < summary["steps"] == 1500
  log = (point / "log.txt").read_text()
  assert log.count(f"(job {job_id}, task 0)") == 2  # the same job ran twice
  assert "stopped by SIGUSR1 at step" in log

  # The uninterrupted run in a process set up like the job's (one CPU device: XLA:CPU
  # sums in another order when a process has 8 host devices, even on a (1, 1) mesh).
  reference = tmp_path / "reference"
  ref_run = subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--config={REAL_CONFIG}",
       f"--workdir={reference}", "--config.num_steps=1500", "--config.seed=0"],
      cwd=REPO, env=cluster, capture_output=True, text=True, timeout=600)
  assert ref_run.returncode == 0, ref_run.stderr[-3000:]
  ref_summary = read_json(reference / "summary.json")
  assert summary["metrics"]["final_loss"] == ref_summary["metrics"]["final_loss"]
  config = _config()
  config.num_steps = 1500
  _, state, _ = restore.load_checkpoint(config, str(point))
  _, ref_state, _ = restore.load_checkpoint(config, str(reference))
  a, b = jax.device_get(state), jax.device_get(ref_state)
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b)
  assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))


def _records(path):
  try:
    return read_jsonl(path)
  except (OSError, ValueError):
    return []
