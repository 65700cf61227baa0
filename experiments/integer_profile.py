r"""Where the MiniLM integer program's compile and run time go (a profile, one process).

    python -m experiments.integer_profile [--layers=2] [--sentences=8] [--calibration=64]
        [--fences=true] [--per_op=false]

all-MiniLM-L6-v2 truncated to its first `layers` blocks, built as
`configs/minilm_ptq.py:integer_only` builds it (`minilm_integer.build`, 48 tokens,
`residual_bits=16`; ranges from the first `calibration` calibration sentences), on the
first `sentences` evaluation sentences. Printed: the XLA compile of the JAX program
(`program.run`; seconds, optimized HLO lines and those of its largest fused
computation, the most frequent opcodes, the dots' operand types) and of the float
forward `jax.jit(model.apply)`, their run times (interleaved, median of 5 after two
warm-up calls each), and the process's peak resident memory. `--fences=false` runs the
program without kernels.py's fusion fences (the output is checked equal to the fenced
one). `--per_op` also times each program op jitted alone (XLA fuses nothing across ops
there; the sum includes one dispatch per op), summed per op kind.
"""
from __future__ import annotations

import collections
import dataclasses
import re
import resource
import time

from absl import app, flags
import jax
import numpy as np

from experiments.benchmark import host_cpu
from experiments.benchmark_rows import _time
from jaxquant.integer_only import graph as g
from jaxquant.integer_only import kernels

FLAGS = flags.FLAGS
flags.DEFINE_integer("layers", 2, "Encoder blocks kept (all-MiniLM-L6-v2 has 6).")
flags.DEFINE_integer("sentences", 8, "Evaluation sentences per call (the batch).")
flags.DEFINE_integer("calibration", 64, "Calibration sentences (the config uses 256).")
flags.DEFINE_bool("fences", True, "Run the program with kernels.py's fusion fences.")
flags.DEFINE_bool("per_op", False, "Also time each op alone, summed per op kind.")

_OPCODE = re.compile(r"= \S+ ([a-z][\w-]*)\(")


def truncated(layers: int):
  """(model, params, tokenizer) of all-MiniLM-L6-v2's first `layers` blocks."""
  from experiments.pretrained import minilm  # pylint: disable=import-outside-toplevel
  model, params, tok = minilm.load()
  if not 1 <= layers <= model.config.num_layers:
    raise ValueError(f"--layers={layers}: the model has {model.config.num_layers} blocks")
  config = dataclasses.replace(model.config, num_layers=layers)
  kept = {k: v for k, v in params.items()
          if not k.startswith("block_") or int(k.split("_")[1]) < layers}
  return minilm.MiniLM(config), kept, tok


def hlo_summary(text: str):
  """(lines, Counter of opcodes, Counter of the dots' operand types, lines of the largest
  fused computation) of optimized HLO text."""
  lines = text.splitlines()
  largest = max((len(block.strip().splitlines()) for block in text.split("\n\n")
                 if block.strip().startswith("%fused")), default=0)
  ops = collections.Counter(m.group(1) for m in map(_OPCODE.search, lines) if m)
  types = {}
  for line in lines:  # name -> element type, for the dots' operands
    m = re.match(r"\s*(?:ROOT )?%(\S+) = ([a-z]+\d*)\[", line)
    if m:
      types[m.group(1)] = m.group(2)
  dots = []
  for line in lines:
    m = re.search(r" dot\(%([^,]+), %([^)]+)\)", line)
    if m:
      dots.append(f"{types.get(m.group(1), '?')}x{types.get(m.group(2), '?')}")
  return len(lines), ops, collections.Counter(dots), largest


def per_op_times(program, ids):
  """{op kind: seconds} of each op jitted alone (min of 5 calls), summed per kind."""
  arrays = program._arrays  # pylint: disable=protected-access
  env, total = {"input": ids}, collections.Counter()
  for op in program.graph.ops:
    def one_op(arrs, *ins, op=op):
      arr = lambda o, field: None if o.get(field) is None else arrs[o[field]]
      out = kernels.KERNELS[op["op"]](op, arr, *ins)
      if op["op"] in g.CORE_OPS:
        sign, bias = arr(op, "sign"), arr(op, "bias")
        out = out if sign is None else out * sign
        out = out if bias is None else out + bias
      return out
    ins = [env[name] for name in op["in"]]
    fn = jax.jit(one_op)
    env[op["out"]] = jax.block_until_ready(fn(arrays, *ins))
    times = []
    for _ in range(5):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(arrays, *ins))
      times.append(time.perf_counter() - t0)
    kind = op["op"] + (f"/{op['dtype']}" if op["op"] == "requant" else "")
    total[kind] += min(times)
  return total


def main(argv):
  del argv
  from experiments.pretrained import minilm_integer, sentences  # pylint: disable=import-outside-toplevel
  model, params, tok = truncated(FLAGS.layers)
  t0 = time.perf_counter()
  program = minilm_integer.build(model, params, tok, sentences.calibration(FLAGS.calibration),
                                 length=48, residual_bits=16)
  print(f"cpu: {host_cpu()}; layers={FLAGS.layers} sentences={FLAGS.sentences} "
        f"fences={FLAGS.fences}; program built in {time.perf_counter() - t0:.1f} s "
        f"({len(program.graph.ops)} ops)")
  ids = minilm_integer.pad_to(tok, sentences.evaluation(FLAGS.sentences), 48)
  arrays = program._arrays  # pylint: disable=protected-access
  one = program._one if FLAGS.fences else None  # pylint: disable=protected-access
  run = jax.jit(lambda a, o, x: kernels.run_graph(program.graph, x, a, o))
  t0 = time.perf_counter()
  compiled = run.lower(arrays, one, ids).compile()
  t_compile = time.perf_counter() - t0
  lines, ops, dots, largest = hlo_summary(compiled.as_text())
  print(f"integer program: compile {t_compile:.1f} s, optimized HLO {lines} lines "
        f"(largest fused computation {largest})")
  print("  opcodes: " + ", ".join(f"{k} {v}" for k, v in ops.most_common(12)))
  print("  dots (operand types): " + ", ".join(f"{k} {v}" for k, v in sorted(dots.items())))
  mask = (ids != tok.pad_id).astype(ids.dtype)
  float_fn = jax.jit(model.apply)
  t0 = time.perf_counter()
  float_fn.lower({"params": params}, ids, mask).compile()
  print(f"float forward: compile {time.perf_counter() - t0:.1f} s")
  y = np.asarray(compiled(arrays, one, ids))
  if not FLAGS.fences:
    np.testing.assert_array_equal(y, np.asarray(program.run(ids)))
    print("  output equal to the fenced program's")
  t_int, t_float = _time([(lambda x: compiled(arrays, one, x), (ids,)),
                          (float_fn, ({"params": params}, ids, mask))], 5)
  print(f"run: integer {1e3 * t_int:.2f} ms, float {1e3 * t_float:.2f} ms, "
        f"ratio {t_int / t_float:.2f}")
  if FLAGS.per_op:
    total = per_op_times(program, ids)
    s = sum(total.values())
    print(f"ops alone: {1e3 * s:.1f} ms in all")
    for kind, t in total.most_common():
      print(f"  {kind:<16} {1e3 * t:8.2f} ms {100 * t / s:5.1f}%")
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
  print(f"peak resident memory {rss:.2f} GiB")


if __name__ == "__main__":
  app.run(main)
