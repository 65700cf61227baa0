"""Sharding: the parameter rule, equal loss curves across meshes, and a 2-process run.

The in-process tests use the 8 host CPU devices set up by conftest.py. The 2-process
tests start this module twice as `python -m tests.experiments.test_sharding worker ...`,
each process with 2 local CPU devices, joined by `jax.distributed` on 127.0.0.1 (no
traffic leaves loopback), once for the float model and once quantized (QAT with the
recipes' standard rules: int8 first/last layers, LSQ weights, percentile activations).
"""

import json
import os
import socket
import subprocess
import sys

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from experiments.training import loop, run_setup
from experiments.training.results import read_jsonl
from experiments.training.sharding import partition_spec
from configs import base
from tests.conftest import subprocess_xla_flags
from tests.experiments.test_train import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _tiny_config(mesh_shape, quantized=False, **overrides):
  config = tiny_config(mesh_shape=mesh_shape, num_steps=5, log_every=1, eval_every=0,
                       checkpoint_every=0, **overrides)
  if quantized:
    config.model.kwargs.features = (16, 16)
    config.quant.rules = base.standard_rules(config.quant, first="dense_0", last="head")
    config.quant.bits = 4
  return config


def _train_losses(workdir):
  return [r["loss"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if r.get("split") == "train"]


def test_partition_rule():
  k = jax.tree_util.DictKey
  leaf = lambda *shape: jax.ShapeDtypeStruct(shape, np.float32)
  assert partition_spec((k("dense_0"), k("kernel")), leaf(40, 16), 2) == P(None, "model")
  assert partition_spec((k("head"), k("kernel")), leaf(16, 10), 4) == P()  # 10 % 4
  assert partition_spec((k("conv_0"), k("kernel")), leaf(5, 1, 24), 2) == P()  # not 2-D
  assert partition_spec((k("dense_0"), k("bias")), leaf(16), 2) == P()
  assert partition_spec((k("dense_0"), k("kernel")), leaf(40, 16), 1) == P()


# (4, 2) splits the batch over 'data' and the kernels over 'model' at once; the pure
# 8-way data-parallel mesh is the same property's breadth, run with the slow tests.
@pytest.mark.parametrize("other_mesh", [(4, 2), pytest.param((8, 1), marks=pytest.mark.slow)])
def test_same_loss_curve_on_1_8_and_model_parallel_meshes(tmp_path, other_mesh):
  curves = {}
  for mesh_shape in [(1, 1), other_mesh]:
    workdir = str(tmp_path / "x".join(map(str, mesh_shape)))
    summary = loop.train_and_evaluate(_tiny_config(mesh_shape), workdir)
    assert summary["mesh"]["shape"] == {"data": mesh_shape[0], "model": mesh_shape[1]}
    curves[mesh_shape] = _train_losses(workdir)
  assert len(curves[(1, 1)]) == 5
  np.testing.assert_allclose(curves[other_mesh], curves[(1, 1)], rtol=1e-5)
  if other_mesh[1] == 1:
    return

  # The (4, 2) run really splits Dense kernels (and their Adam moments) over 'model'.
  setup = run_setup.prepare(_tiny_config((4, 2)))
  params = setup.state_shardings["trainable"]["params"]
  assert params["dense_0"]["kernel"].spec == P(None, "model")
  assert params["head"]["kernel"].spec == P(None, "model")
  assert params["dense_0"]["bias"].spec == P()
  adam = setup.state_shardings["opt_state"][0]  # ScaleByAdamState(count, mu, nu)
  assert adam.mu["params"]["dense_0"]["kernel"].spec == P(None, "model")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow  # ~12 s idle, ~30 s on a busy 2-core machine (each)
@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantized"])
def test_two_process_distributed_run_agrees(tmp_path, quantized):
  port, workdir = _free_port(), str(tmp_path / "dist")
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": subprocess_xla_flags(device_count=2)}
  logs = [open(tmp_path / f"worker{i}.log", "w+") for i in range(2)]  # no pipe can fill up
  procs = [subprocess.Popen([sys.executable, "-m", "tests.experiments.test_sharding", "worker",
                             str(i), str(port), workdir, str(int(quantized))],
                            cwd=REPO, env=env, stdout=logs[i], stderr=subprocess.STDOUT,
                            text=True) for i in range(2)]
  outputs = []
  try:
    for p in procs:
      p.wait(timeout=180)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, log in zip(procs, logs):
    log.seek(0)
    text = log.read()
    log.close()
    assert p.returncode == 0, text[-3000:]
    outputs.append(json.loads(text.strip().splitlines()[-1]))
  assert outputs[0] == outputs[1]  # both processes see the same global metrics
  assert outputs[0]["num_processes"] == 2 and outputs[0]["num_devices"] == 4
  assert outputs[0]["quantized"] == quantized

  # Same curve as one process driving a 4-device mesh.
  single = str(tmp_path / "single")
  summary = loop.train_and_evaluate(_tiny_config((4, 1), quantized), single)
  assert summary["quantized"] == quantized
  assert len(_train_losses(single)) == 5
  np.testing.assert_allclose(_train_losses(workdir), _train_losses(single), rtol=1e-5)
  np.testing.assert_allclose(outputs[0]["test_loss"], summary["metrics"]["test_loss"],
                             rtol=1e-5)


def _worker(process_id: int, port: int, workdir: str, quantized: bool) -> None:
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                             process_id=process_id, local_device_ids=None)
  summary = loop.train_and_evaluate(_tiny_config((-1, 1), quantized), workdir)
  print(json.dumps({"final_loss": summary["metrics"]["final_loss"],
                    "test_loss": summary["metrics"]["test_loss"],
                    "test_accuracy": summary["metrics"]["test_accuracy"],
                    "num_processes": summary["mesh"]["num_processes"],
                    "num_devices": summary["mesh"]["num_devices"],
                    "quantized": summary["quantized"]}), flush=True)
  jax.distributed.shutdown()


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "worker":
  _worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], bool(int(sys.argv[5])))
