"""Wall time of all-MiniLM-L6-v2 as an integer-only program against its float forward,
in one process on the same token ids:

    python -m experiments.minilm_integer_speed --batch=8 --repeats=3

Builds the program as `configs/minilm_ptq.py:integer_only` does (256 calibration
sentences, 48 tokens, int16 residual stream), then times, interleaved after one warm-up
call each, the float forward (`jax.jit(model.apply)`), the JAX program
(`program.run`, compiled once; its compile time is printed separately) and the numpy
runtime (jaxquant/deploy/numpy_runtime.py) on the first `batch` evaluation sentences.
Prints one JSON line of medians (seconds) and the ratios to float.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax
import numpy as np
from absl import app, flags

from experiments.pretrained import minilm, minilm_integer, sentences

_BATCH = flags.DEFINE_integer("batch", 8, "sentences per call")
_REPEATS = flags.DEFINE_integer("repeats", 3, "timed calls of each forward")
_LENGTH = 48  # the program's token count (configs/minilm_ptq.py int_length)


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def main(argv):
  del argv
  model, params, tok = minilm.load()
  program = minilm_integer.build(model, params, tok, sentences.calibration(256), length=_LENGTH)
  ids = minilm_integer.pad_to(tok, sentences.evaluation(_BATCH.value), _LENGTH)
  mask = (ids != tok.pad_id).astype(np.int32)
  float_apply = jax.jit(model.apply)
  numpy_run = minilm_integer.numpy_runner(program)
  calls = {
      "float": lambda: jax.block_until_ready(float_apply({"params": params}, ids, mask)),
      "jax_program": lambda: jax.block_until_ready(program.run(ids)),
      "numpy_runtime": lambda: numpy_run(ids),
  }
  first = {}
  for name, fn in calls.items():  # warm-up: the JAX ones compile here
    t0 = time.perf_counter()
    fn()
    first[name] = time.perf_counter() - t0
  times = {name: [] for name in calls}
  for _ in range(_REPEATS.value):
    for name, fn in calls.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  med = {name: statistics.median(ts) for name, ts in times.items()}
  print(json.dumps({"cpu": _cpu_model(), "cores": len(os.sched_getaffinity(0)),
                    "batch": _BATCH.value, "tokens": _LENGTH, "repeats": _REPEATS.value,
                    "first_call_s": first, "median_s": med,
                    "ratio_to_float": {k: v / med["float"] for k, v in med.items()}}))


if __name__ == "__main__":
  app.run(main)
