"""`jq.to_integer` and `jq.IntegerProgram`: integer-only inference (Jacob et al. 2018).

    program = jq.to_integer(qmodel, variables, calibration_batches)
    logits_i32 = program(x)                    # = program.run(program.quantize_input(x))
    logits = program.output_scale * logits_i32   # ≈ the QAT model's logits
    program.save("model_int/")                 # graph.json + arrays.npz
    # anywhere with numpy: python numpy_runtime.py model_int/ x.npy logits.npy

`quantize_input` is the one float → int step (at the boundary); `run` takes int8 codes
and returns int32 logits with integer operations only: int8 activations between layers
(int16 on the residual paths into normalizations with residual_bits=16),
int8 × int8 contractions summed in int32, biases at scale s_in·s_w, fixed-point requantization
(fixed_point.py), ReLU / ReLU6 as the requantization clamp, BatchNorm (inference mode)
folded into the multiplier and bias, integer residual adds, sums / means, max and
average pooling, grouped / depthwise and transposed convolutions, GroupNorm /
LayerNorm as an integer normalization (integer mean, variance and square root),
products of two activations (attention), softmax and the erf GELU (I-BERT's i-softmax /
i-GELU), and, for programs of int32 token ids, nn.Embed lookups and key padding masks;
each op is one module of ops/. The tanh GELU, causal-mask selects and other float
functions are refused with the layers named. The
file format: graph.py. How a model becomes a program: lower.py (and trace.py for what is
refused).
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxquant.integer_only import graph as g
from jaxquant.integer_only import kernels
from jaxquant.integer_only import lower


class IntegerProgram:
  """An integer-only program: int8 codes in, int32 logits out.

  Attributes:
    graph: the `graph.Graph` (ops, integer arrays, input grid, output scale).
    output_scale: float; `output_scale * run(x_q)` ≈ the QAT model's logits.
    input_scale, input_zero_point: the input grid; codes = round(x / scale) + zp.
  """

  def __init__(self, graph: g.Graph):
    g.validate(graph)
    self.graph = graph
    # The arrays are jit arguments, not constants: XLA would otherwise constant-fold
    # every weight-derived expression (zp·Σw, ...) at compile time, minutes for a BERT.
    self._arrays = {k: jnp.asarray(v) for k, v in g.integer_arrays(graph).items()}
    # `one` (1 at run time) fences the fusions of the tensors kernels.fenced_tensors
    # names: without it XLA recomputes the residual stream in every layer (kernels.py).
    self._one = jnp.int32(1)
    self._jit = jax.jit(lambda arrays, one, x_q: kernels.run_graph(graph, x_q, arrays, one))
    self._run = lambda x_q: self._jit(self._arrays, self._one, x_q)
    spec = graph.input
    self.takes_ids = spec.get("dtype") == "int32"  # token ids in, no input quantization
    self._inv_scale = None if self.takes_ids else np.float32(spec["inv_scale"])
    self._quantize = jax.jit(self._quantize_impl)

  @property
  def output_scale(self) -> float:
    return float(self.graph.output["scale"])

  @property
  def input_scale(self) -> float:
    return float(self.graph.input["scale"])

  @property
  def input_zero_point(self) -> int:
    return int(self.graph.input["zp"])

  @property
  def input_shape(self):
    """The input's shape without the batch axis."""
    return tuple(self.graph.input["shape"])

  def _quantize_impl(self, x):
    spec = self.graph.input
    y = jnp.round(x.astype(jnp.float32) * self._inv_scale)
    y = jnp.where(jnp.isnan(y), 0.0, y)
    y = jnp.clip(y, spec["qmin"] - spec["zp"], spec["qmax"] - spec["zp"]) + spec["zp"]
    return y.astype(jnp.int8)

  def _check_shape(self, x, what: str):
    if tuple(np.shape(x)[1:]) != self.input_shape:
      raise ValueError(f"{what} has shape {tuple(np.shape(x))}; the program takes "
                       f"(batch,) + {self.input_shape}")

  def quantize_input(self, x) -> jax.Array:
    """int8 codes of float inputs: clip(round_half_even(x·(1/scale)) + zp, qmin, qmax),
    the float32 product with the stored float32 reciprocal (graph.py); NaN → zp. A
    program of token ids takes integer ids as they are (as int32)."""
    self._check_shape(x, "x")
    if self.takes_ids:
      if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.integer):
        raise ValueError(f"this program takes integer token ids, got {jnp.asarray(x).dtype}")
      return jnp.asarray(x, jnp.int32)
    if not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
      raise ValueError(f"quantize_input takes float inputs, got {jnp.asarray(x).dtype}")
    return self._quantize(jnp.asarray(x))

  def run(self, x_q) -> jax.Array:
    """int32 logits of int8 input codes; integer operations only (jittable)."""
    if jnp.asarray(x_q).dtype != (jnp.int32 if self.takes_ids else jnp.int8):
      raise ValueError(f"run takes int8 codes, got {jnp.asarray(x_q).dtype}; use "
                       "program(x) or program.quantize_input(x) for float inputs")
    self._check_shape(x_q, "x_q")
    return self._run(x_q)

  def __call__(self, x) -> jax.Array:
    return self.run(self.quantize_input(x))

  def predict(self, x_q) -> jax.Array:
    """Class indices (int32): argmax of the int32 logits, no float involved."""
    return jnp.argmax(self.run(x_q), axis=-1).astype(jnp.int32)

  def save(self, directory: str) -> None:
    """Writes `graph.json` + `arrays.npz` (int8 / int32 arrays) into `directory`; run it
    with jaxquant/deploy/numpy_runtime.py or `IntegerProgram.load`."""
    g.save(self.graph, directory)

  @classmethod
  def load(cls, directory: str) -> "IntegerProgram":
    return cls(g.load(directory))

  def summary(self) -> str:
    """One line per op: output, op, layer, inputs."""
    rows = [f"input {self.input_shape} int32 ids" if self.takes_ids else
            f"input {self.input_shape} scale={self.input_scale:.4g} zp={self.input_zero_point}"]
    for op in self.graph.ops:
      rows.append(f"{op['out']:>5} = {op['op']:<9} {op.get('layer', '') or '-':<28} "
                  f"{', '.join(op['in'])}")
    rows.append(f"output {self.graph.output['tensor']} scale={self.output_scale:.4g}")
    return "\n".join(rows)


def to_integer(qmodel, variables, calibration_batches, *, example: Optional[Any] = None,
               apply_kwargs: Optional[Dict[str, Any]] = None,
               residual_bits: int = 8) -> IntegerProgram:
  """An integer-only program computing `qmodel`'s forward pass (Jacob et al. 2018).

  Args:
    qmodel: a `jq.quantize_model` result (its rules give each layer's weight and
      activation specs) or a plain float model (every layer W8A8, calibrated); Linen or
      NNX (an NNX model gives the program of the same model written in Linen with the
      same layer names: its layers are traced as their Linen twins, nnx_float.py).
    variables: its variables (an NNX model: its `nnx.State`): 'params' (+ 'batch_stats'
      etc.), and 'quant' / 'quant_stats' for learned steps and activation ranges
      (jq.calibrate's static range, else the training EMA).
    calibration_batches: an iterable of input batches (arrays, (x, ...) tuples or
      {'x': ...} dicts). They fix the input shape (any batch size runs later) and give
      the ranges QAT has none for: residual sums, normalization outputs, pooled features,
      layers without activation ranges. None is allowed with `example=` when the
      variables hold every range.
    example: an input batch, used only for its shape when there are no batches.
    apply_kwargs: extra keyword arguments of `model.apply` (e.g. {'train': False}); of
      the call, for an NNX model (which is traced in eval mode: `model.eval()` on a copy).
    residual_bits: 8 (default) or 16. With 16, every GroupNorm / LayerNorm input and
      the residual adds feeding it (their inputs and sums, recursively: a transformer's
      residual stream) are held as int16 codes on the int16 grid of their measured
      range; contractions still read int8 (each such tensor is requantized once per
      grid from its accumulator). For models whose residual sums have outlier channels
      (BERT-style encoders), where an int8 grid rounds the other channels to 0 / ±1. With
      8 the program is the int8 one, byte for byte.

  Raises:
    IntegerOnlyError (a ValueError): an op with no integer lowering (softmax, GELU,
      embeddings, products of activations...; every one is listed with its layer path),
      a weight or activation format without integer codes, a missing range, or an
      accumulator that could overflow int32; the message names the layer.
  """
  graph, _ = lower.build_graph(qmodel, variables, calibration_batches, example=example,
                               apply_kwargs=apply_kwargs, residual_bits=residual_bits)
  return IntegerProgram(graph)
