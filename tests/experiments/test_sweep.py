"""Sweep DSL, naming, planning, and the local / print launchers over a fake trainer
(the slurm launcher against a real cluster: test_slurm.py).

The launcher tests start real `python -m experiments.sweep` processes from the repo root
with `--trainer=tests.experiments.fixtures.fake_train` (no jax; ~0.2 s per point).
"""
import collections
import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest

from experiments import sweeps
from experiments.sweeps import grid, local, locks, plan

REPO = pathlib.Path(__file__).resolve().parents[2]
FAKE_CONFIG = "tests/experiments/fixtures/fake_config.py"


def sweep_cmd(arg, workdir, *extra):
  return [sys.executable, "-m", "experiments.sweep", f"--config={FAKE_CONFIG}:{arg}",
          f"--workdir={workdir}", "--trainer=tests.experiments.fixtures.fake_train", *extra]


def run_sweep(arg, workdir, *extra, ledger=None):
  env = dict(os.environ, FAKE_TRAIN_LEDGER=str(ledger or workdir.parent / "ledger.txt"))
  return subprocess.run(sweep_cmd(arg, workdir, *extra), cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


def ledger_counts(path):
  return collections.Counter(path.read_text().split()) if path.exists() else {}


def read_json(path):
  return json.loads(pathlib.Path(path).read_text())


# --- the DSL ---------------------------------------------------------------------------

def test_axis_product_zip_chain():
  bits = sweeps.axis("quant.bits", [2, 4])
  seeds = sweeps.axis("seed", range(2))
  assert bits == [{"quant.bits": 2}, {"quant.bits": 4}]
  assert sweeps.product(bits, seeds) == [
      {"quant.bits": 2, "seed": 0}, {"quant.bits": 2, "seed": 1},
      {"quant.bits": 4, "seed": 0}, {"quant.bits": 4, "seed": 1}]
  lrs = sweeps.axis("lr", [0.1, 0.2])
  assert sweeps.zip_(bits, lrs) == [{"quant.bits": 2, "lr": 0.1}, {"quant.bits": 4, "lr": 0.2}]
  mixed = sweeps.chain([{"quant.preset": "float"}],
                       sweeps.product(sweeps.zip_(bits, lrs), sweeps.axis("seed", [7])))
  assert mixed == [{"quant.preset": "float"}, {"quant.bits": 2, "lr": 0.1, "seed": 7},
                   {"quant.bits": 4, "lr": 0.2, "seed": 7}]
  assert grid.swept_keys(mixed) == ["quant.preset", "quant.bits", "lr", "seed"]


@pytest.mark.parametrize("build, message", [
    (lambda: sweeps.zip_(sweeps.axis("a", [1, 2]), sweeps.axis("b", [1])), "equal length"),
    (lambda: sweeps.product(sweeps.axis("a", [1]), sweeps.axis("a", [2])), "more than one"),
    (lambda: sweeps.axis("a", []), "no values"),
    (lambda: sweeps.axis("a", "abc"), "list of values"),
    (lambda: sweeps.axis("bad key", [1]), "dotted config key"),
    (lambda: sweeps.axis("a", [{"x": 1}]), "tuple of those"),
    (lambda: grid.normalize({"seed": 0}), "list of override dicts"),
    (lambda: grid.normalize([{"seed": 0}, 3]), "not a dict"),
    (lambda: grid.normalize([]), "no points"),
    (lambda: grid.normalize([{"seed": 1}, {"seed": "1"}]), "same run directory"),
])
def test_bad_sweeps_raise(build, message):
  with pytest.raises(ValueError, match=message):
    build()


def test_point_names_are_readable_stable_and_distinct():
  assert sweeps.point_name({"seed": 1, "quant.preset": "w4a4"}) == "quant.preset=w4a4,seed=1"
  assert sweeps.point_name({"quant.preset": "w4a4", "seed": 1}) == "quant.preset=w4a4,seed=1"
  assert sweeps.point_name({}) == "base"
  assert sweeps.point_name({"lr": 1e-05, "on": True}) == "lr=1e-05,on=True"
  # Unsafe characters are replaced and a hash keeps lossy names apart.
  slash, under = sweeps.point_name({"name": "a/b"}), sweeps.point_name({"name": "a_b"})
  assert slash.startswith("name=a_b~") and under == "name=a_b"
  assert sweeps.point_name({"name": "a/b"}) == slash  # same overrides, same name
  assert sweeps.point_name({"name": "a,b=c"}) != sweeps.point_name({"name": "a", "b": "c"})
  dims = sweeps.point_name({"model.dims": (1, 2)})
  assert dims.startswith("model.dims=_1_2_~") and "/" not in dims
  long_name = sweeps.point_name({"name": "x" * 400})
  assert len(long_name) < 200 and long_name != sweeps.point_name({"name": "x" * 401})


def test_format_value_for_absl():
  assert sweeps.format_value((1, 2)) == "(1,2)"
  assert sweeps.format_value([4]) == "(4,)"
  assert sweeps.format_value(("a", 1.5)) == "('a',1.5)"
  assert sweeps.format_value(False) == "False"
  assert sweeps.format_value(0.1) == "0.1"
  assert sweeps.format_value("w4a4") == "w4a4"


def test_build_points_commands(tmp_path):
  points = sweeps.build_points([{"quant.bits": 4, "model.dims": (2, 3)}],
                               config_arg="c.py:x", workdir=str(tmp_path), trainer="my.train",
                               python="py")
  (p,) = points
  assert p.argv == ("py", "-m", "my.train", "--config=c.py:x", f"--workdir={p.directory}",
                    "--config.quant.bits=4", "--config.model.dims=(2,3)")
  assert p.directory == os.path.join(str(tmp_path), p.name)


# --- loading config files ---------------------------------------------------------------

def test_load_sweep_errors(tmp_path):
  with pytest.raises(sweeps.SweepError, match="not found"):
    sweeps.load_sweep(str(tmp_path / "nope.py"))
  no_sweep = tmp_path / "no_sweep.py"
  no_sweep.write_text("def get_config(arg=None):\n  return None\n")
  with pytest.raises(sweeps.SweepError, match="defines no get_sweep"):
    sweeps.load_sweep(str(no_sweep))
  with pytest.raises(sweeps.SweepError, match=r"\['quant.bitz'\] are not in get_config"):
    sweeps.load_sweep(f"{REPO / FAKE_CONFIG}:typo")
  with pytest.raises(sweeps.SweepError, match="list of override dicts"):
    sweeps.load_sweep(f"{REPO / FAKE_CONFIG}:notalist")
  assert len(sweeps.load_sweep(f"{REPO / FAKE_CONFIG}:grid")) == 6


@pytest.mark.parametrize("config, message", [
    ("tests/experiments/fixtures/missing.py", "not found"),
    ("{tmp}/no_sweep.py", "defines no get_sweep"),
])
def test_cli_bad_config_exits_2(tmp_path, config, message):
  (tmp_path / "no_sweep.py").write_text("def get_config(arg=None):\n  return None\n")
  config = config.format(tmp=tmp_path)
  result = subprocess.run(
      [sys.executable, "-m", "experiments.sweep", f"--config={config}",
       f"--workdir={tmp_path / 'w'}"], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 2, result.stderr
  assert message in result.stderr
  assert not (tmp_path / "w").exists()


# --- claims -------------------------------------------------------------------------------

def dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_claims_exclusive_and_stale_takeover(tmp_path):
  point = str(tmp_path / "p")
  assert locks.acquire(point) == (True, None)
  ok, owner = locks.acquire(point)  # held by a live process (us): not stale
  assert not ok and owner.pid == os.getpid()
  locks.release(point)
  assert locks.read(point) is None
  # A claim left by a dead sweep on this host is taken over.
  stale = locks.Owner(dead_pid(), locks.socket.gethostname(), dead_pid(), 0.0)
  (tmp_path / "p" / "claim").write_text(json.dumps(locks.dataclasses.asdict(stale)))
  assert locks.acquire(point) == (True, None)
  assert locks.read(point).pid == os.getpid()
  # One from another host is never judged stale.
  (tmp_path / "p" / "claim").write_text(json.dumps({"pid": dead_pid(), "host": "elsewhere"}))
  ok, owner = locks.acquire(point)
  assert not ok and owner.host == "elsewhere"


# --- the local launcher -------------------------------------------------------------------

def test_local_sweep_runs_then_skips_on_rerun(tmp_path):
  workdir, ledger = tmp_path / "sweep", tmp_path / "ledger.txt"
  first = run_sweep("grid", workdir, "--parallel=2")
  assert first.returncode == 0, first.stdout + first.stderr
  assert "6 ok, 0 skipped" in first.stdout and "start quant.bits=4,seed=1" in first.stdout
  listed = read_json(workdir / "sweep.json")
  names = [p["name"] for p in listed["points"]]
  assert names[0] == "quant.bits=2,seed=0" and len(names) == 6
  assert listed["points"][0]["overrides"] == {"quant.bits": 2, "seed": 0}
  assert "--config.quant.bits=2 --config.seed=0" in listed["points"][0]["command"]
  for name in names:
    assert (workdir / name / "summary.json").exists()
    assert not (workdir / name / "claim").exists()
  assert read_json(workdir / "quant.bits=4,seed=1" / "summary.json")["config"]["quant"] == {
      "bits": 4, "preset": "w8a8"}

  second = run_sweep("grid", workdir, "--parallel=2")
  assert second.returncode == 0
  assert "0 ok, 6 skipped (6 done before" in second.stdout
  assert all(n == 1 for n in ledger_counts(ledger).values()) and len(ledger_counts(ledger)) == 6


def test_override_values_reach_the_trainer(tmp_path):
  result = run_sweep("types", tmp_path / "sweep")
  assert result.returncode == 0, result.stdout + result.stderr
  (point,) = read_json(tmp_path / "sweep" / "sweep.json")["points"]
  config = read_json(tmp_path / "sweep" / point["name"] / "summary.json")["config"]
  assert config["model"]["dims"] == [2, 3] and config["lr"] == 0.5
  assert config["name"] == "a b/c" and config["quant"]["bits"] == 4


def test_failed_point_is_recorded_and_sweep_carries_on(tmp_path):
  workdir, ledger = tmp_path / "sweep", tmp_path / "ledger.txt"
  result = run_sweep("crash", workdir)
  assert result.returncode == 1
  assert "2 ok, 0 skipped (0 done before, 0 left to another sweep), 1 failed" in result.stdout
  crashed = workdir / "crash=True,seed=1"
  failure = read_json(crashed / "failed.json")
  assert failure["returncode"] == 1 and failure["reason"] == "exit status 1"
  assert "RuntimeError: fake crash at step 3" in failure["log_tail"]
  assert "--config.crash=True" in failure["command"]
  assert not (crashed / "summary.json").exists()
  assert (workdir / "crash=False,seed=2" / "summary.json").exists()  # ran after the crash
  # A rerun retries only the failed point (and it fails again).
  again = run_sweep("crash", workdir)
  assert again.returncode == 1 and "0 ok, 2 skipped" in again.stdout
  assert ledger_counts(ledger)["crash=True,seed=1"] == 2


def test_two_concurrent_sweeps_never_run_a_point_twice(tmp_path):
  workdir, ledger = tmp_path / "sweep", tmp_path / "ledger.txt"
  env = dict(os.environ, FAKE_TRAIN_LEDGER=str(ledger))
  procs = [subprocess.Popen(sweep_cmd("many", workdir, "--parallel=2"), cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for _ in range(2)]
  outputs = [p.communicate(timeout=120)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs
  counts = ledger_counts(ledger)
  assert len(counts) == 8 and set(counts.values()) == {1}, counts
  ran = sum(int(out.split("sweep: ")[-1].split(" ok")[0]) for out in outputs)
  assert ran == 8, outputs


def test_sigterm_stops_runs_and_frees_claims(tmp_path):
  workdir = tmp_path / "sweep"
  env = dict(os.environ, FAKE_TRAIN_LEDGER=str(tmp_path / "ledger.txt"))
  proc = subprocess.Popen(sweep_cmd("many", workdir, "--parallel=2"), cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  for line in proc.stdout:
    if " start " in line:
      break
  proc.send_signal(signal.SIGTERM)
  rest = proc.communicate(timeout=60)[0]
  assert proc.returncode == 128 + signal.SIGTERM, rest
  assert not list(workdir.glob("*/claim"))
  owners = [locks.read(str(d)) for d in workdir.iterdir() if d.is_dir()]
  assert owners and not any(owners)


# --- print and slurm ----------------------------------------------------------------------

def test_print_launcher_prints_commands_and_writes_nothing(tmp_path):
  result = run_sweep("grid", tmp_path / "sweep", "--launcher=print")
  assert result.returncode == 0
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 6 and all(" -m tests.experiments.fixtures.fake_train " in line for line in lines)
  assert lines[1].endswith("--config.quant.bits=2 --config.seed=1")
  assert not (tmp_path / "sweep").exists() and not (tmp_path / "ledger.txt").exists()


def test_print_launcher_needs_no_workdir():
  env = dict(os.environ)
  result = subprocess.run(sweep_cmd("grid", "unused")[:4] + ["--launcher=print"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 6
  assert "--workdir=runs/fake_config_grid/quant.bits=2,seed=0 " in lines[0]


def test_other_launchers_need_a_workdir(tmp_path):
  result = subprocess.run(sweep_cmd("grid", "unused")[:4], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode == 2
  assert "--workdir is required with --launcher=local" in result.stderr


# --- accelerators for local sweeps ----------------------------------------------------------

def test_slot_environments_pin_gpus_and_share_without_preallocation():
  assert local.slot_environments(1, ["0", "1"]) == [{}]  # one run sees every GPU
  assert local.slot_environments(3, []) == [{}, {}, {}]  # CPU only: nothing to pin
  assert local.slot_environments(2, ["0", "1"]) == [{"CUDA_VISIBLE_DEVICES": "0"},
                                                    {"CUDA_VISIBLE_DEVICES": "1"}]
  assert local.slot_environments(2, ["0", "1", "2", "3"]) == [
      {"CUDA_VISIBLE_DEVICES": "0,2"}, {"CUDA_VISIBLE_DEVICES": "1,3"}]
  shared = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
  assert local.slot_environments(3, ["5"]) == [{"CUDA_VISIBLE_DEVICES": "5", **shared}] * 3
  assert local.slot_environments(4, ["0", "1"])[3] == {"CUDA_VISIBLE_DEVICES": "1", **shared}


def test_local_gpus_reads_the_visible_devices_without_jax():
  assert local.local_gpus({"CUDA_VISIBLE_DEVICES": "2, 3"}) == ["2", "3"]
  assert local.local_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
  assert local.local_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == []


@pytest.mark.parametrize("gpus,parallel,shared", [(["0", "1"], 2, False), (["7"], 2, True)],
                         ids=["one-per-gpu", "two-on-one-gpu"])
def test_each_local_run_receives_its_gpu_environment(tmp_path, gpus, parallel, shared):
  """The environment each trainer process actually receives (a fake trainer reports it)."""
  workdir = tmp_path / "sweep"
  points = sweeps.build_points(
      sweeps.product(sweeps.axis("seed", range(4)), sweeps.axis("sleep_s", [0.2])),
      config_arg=f"{FAKE_CONFIG}:grid", workdir=str(workdir),
      trainer="tests.experiments.fixtures.fake_train")
  report = tmp_path / "env.jsonl"
  with pytest.MonkeyPatch.context() as mp:
    mp.chdir(REPO)
    mp.setenv("FAKE_TRAIN_ENV_REPORT", str(report))
    tally = local.run_local(points, parallel=parallel, gpus=gpus, echo=lambda line: None)
  assert len(tally.ok) == 4
  seen = [json.loads(line) for line in report.read_text().splitlines()]
  assert len(seen) == 4
  assert {r["CUDA_VISIBLE_DEVICES"] for r in seen} == set(gpus)
  for r in seen:
    assert r["XLA_PYTHON_CLIENT_PREALLOCATE"] == ("false" if shared else None)


def test_staged_points_start_after_the_point_they_refer_to(tmp_path):
  workdir, ledger = tmp_path / "sweep", tmp_path / "ledger.txt"
  result = run_sweep("staged", workdir, "--parallel=2", ledger=ledger)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "6 ok" in result.stdout
  order = ledger.read_text().split()
  points = read_json(workdir / "sweep.json")["points"]
  for p in points:
    start = p["overrides"].get("start")
    if start:  # the stage before ran first, and its directory reached the trainer
      target = start[len(grid.REF_PREFIX):]
      assert order.index(target) < order.index(p["name"])
      assert f"--config.start={workdir / target}" in p["command"]
      assert "from-" in p["name"]
      config = read_json(workdir / p["name"] / "summary.json")["config"]
      assert config["start"] == str(workdir / target)


def test_a_failed_stage_fails_the_stages_after_it(tmp_path):
  workdir, ledger = tmp_path / "sweep", tmp_path / "ledger.txt"
  result = run_sweep("staged_crash", workdir, "--parallel=2", ledger=ledger)
  assert result.returncode == 1
  assert "3 ok, 0 skipped (0 done before, 0 left to another sweep), 3 failed" in result.stdout
  assert result.stdout.count("which did not finish") == 2
  ran = ledger_counts(ledger)
  assert len(ran) == 4  # seed 0's three stages and seed 1's crashed first stage


def test_a_reference_to_a_later_point_is_refused():
  with pytest.raises(ValueError, match="not an earlier point"):
    grid.normalize([{"seed": 0, "start": sweeps.ref({"seed": 1})}, {"seed": 1}])
  with pytest.raises(ValueError, match="takes a point"):
    sweeps.ref("seed=1")


def test_slurm_launcher_refuses_staged_sweeps(tmp_path):
  result = run_sweep("staged", tmp_path / "sweep", "--launcher=slurm")
  assert result.returncode == 2 and "--launcher=local" in result.stderr
