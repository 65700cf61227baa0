r"""Runs a saved jaxquant integer program with numpy alone (no JAX, no jaxquant).

    python numpy_runtime.py DIR INPUT.npy OUTPUT.npy

DIR is a directory written by `IntegerProgram.save` (graph.json + arrays.npz). INPUT
holds float inputs, batch first (an int8 INPUT is taken as input codes as they are);
OUTPUT receives the int32 logits (times graph.json's output scale ≈ the trained model's
logits). This file imports only numpy and the standard library (and, for the softmax and GELU
ops, ibert_numpy.py beside it, also numpy only): copy both onto any machine with
Python and numpy, or load this one by path.

Written from the equations (Jacob et al. 2018, "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference", §2.2 and gemmlowp's rounding
rules), in int64 numpy so no intermediate can wrap. Every op of the format, with
x = q − zp the centered input codes:
  requantize  y = x·M0·2^(e−31):  e ≤ 0: RDBPOT(SRDHM(x, M0), −e);  e > 0:
              SRDHM(clamp_int32(x·2^e), M0), where
              SRDHM(a, b) = floor(a·b/2^31 + 1/2), and 2^31 − 1 for a = b = −2^31;
              RDBPOT(x, n) = x/2^n rounded to nearest, ties away from zero.
  requant     codes = zp + clamp(RDBPOT(SRDHM(clamp_int32(acc·2^left) + offset, M0),
              right), lo − zp, hi − zp) as `dtype` (int8, int16 on a wide residual
              path, or int32)   (multiplier M0·2^(left − right − 31), offset: a bias
              in units of 2^-left of acc, 0 when absent)
  dot / conv  Σ (q − zp)·w, a conv's input padded with real zeros (x = 0), optionally
              input-dilated with real zeros (lhs_dilation) and in feature groups;
  add         Σ_i requantize((q_i − zp_i)·sign_i·2^L, M_i);  sum: Σ x;  identity: x
  norm        graph.py's integer normalization (see `norm` below; `var_shift` k, 0 when
              absent, rounds the centered values by 2^k before they are squared).
  max_pool    the largest code per window (padding ignored);  window_sum: Σ x per window
              (padding: x = 0).
Core ops are followed by acc = sign·raw + bias when those arrays are present.
"""
import json
import math
import os
import sys

import numpy as np

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


def srdhm(a, b):
  """round(a·b / 2^31), ties toward +inf; the single overflow a = b = −2^31 saturates."""
  a = np.asarray(a, np.int64)
  b = np.asarray(b, np.int64)
  out = np.floor_divide(a * b + 2 ** 30, 2 ** 31)
  return np.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, out)


def rdbpot(x, n):
  """x / 2^n rounded to nearest, ties away from zero."""
  x = np.asarray(x, np.int64)
  p = np.left_shift(np.int64(1), np.asarray(n, np.int64))
  mag = np.floor_divide(2 * np.abs(x) + p, 2 * p)
  return np.where(x < 0, -mag, mag)


def requantize(x, m0, e):
  """x · m0 · 2^(e − 31), the fixed-point multiplier of the module docstring."""
  x = np.asarray(x, np.int64)
  e = np.asarray(e, np.int64)
  shifted = np.clip(x * np.left_shift(np.int64(1), np.maximum(e, 0)), INT32_MIN, INT32_MAX)
  return rdbpot(srdhm(shifted, m0), np.maximum(-e, 0))


def rdiv(a, d):
  """a / d (d > 0) rounded to nearest, ties away from zero."""
  a = np.asarray(a, np.int64)
  mag = np.floor_divide(2 * np.abs(a) + d, 2 * d)
  return np.where(a < 0, -mag, mag)


def isqrt(v):
  """Exact floor square root, elementwise."""
  v = np.asarray(v, np.int64)
  return np.array([math.isqrt(int(t)) for t in v.reshape(-1)], np.int64).reshape(v.shape)


def dot(op, arrays, q):
  x = q.astype(np.int64) - op["zp"]
  w = arrays[op["w"]].astype(np.int64)
  return np.tensordot(x, w, axes=(op["contract_lhs"], op["contract_rhs"]))


def conv(op, arrays, q):
  lhs, rhs, out_spec = op["lhs_spec"], op["rhs_spec"], op["out_spec"]
  nd = len(lhs) - 2
  groups = op.get("feature_group_count", 1)
  # Canonical layouts: x (B, spatial..., Cin), w (spatial..., Cin / groups, Cout).
  x = np.transpose(q.astype(np.int64) - op["zp"], [lhs[0]] + lhs[2:] + [lhs[1]])
  w = np.transpose(arrays[op["w"]].astype(np.int64), rhs[2:] + [rhs[1], rhs[0]])
  lhs_dil = op.get("lhs_dilation", [1] * nd)
  if any(d != 1 for d in lhs_dil):  # real zeros between the input's elements
    sizes = [(n - 1) * d + 1 for n, d in zip(x.shape[1:-1], lhs_dil)]
    dilated = np.zeros((x.shape[0], *sizes, x.shape[-1]), np.int64)
    dilated[(slice(None),) + tuple(slice(None, None, d) for d in lhs_dil)] = x
    x = dilated
  x = np.pad(x, [(0, 0)] + [tuple(p) for p in op["padding"]] + [(0, 0)])  # real zeros
  ksize, strides, dil = w.shape[:nd], op["strides"], op["rhs_dilation"]
  out_sizes = [(x.shape[1 + i] - dil[i] * (ksize[i] - 1) - 1) // strides[i] + 1
               for i in range(nd)]
  cin, cout = w.shape[-2], w.shape[-1] // groups  # per group
  out = np.zeros((x.shape[0], *out_sizes, w.shape[-1]), np.int64)
  for tap in np.ndindex(*ksize):
    window = tuple(slice(t * d, t * d + s * (o - 1) + 1, s)
                   for t, d, s, o in zip(tap, dil, strides, out_sizes))
    xs = x[(slice(None),) + window]
    for g in range(groups):
      out[..., g * cout:(g + 1) * cout] += np.tensordot(
          xs[..., g * cin:(g + 1) * cin], w[tap][:, g * cout:(g + 1) * cout],
          axes=([nd + 1], [0]))
  canon = [out_spec[0]] + out_spec[2:] + [out_spec[1]]  # output axis of each canonical axis
  return np.transpose(out, np.argsort(canon))


def add(op, arrays, qa, qb):
  total = 0
  for q, s in ((qa, "a"), (qb, "b")):
    x = (q.astype(np.int64) - op["zp_" + s]) * op["sign_" + s] * 2 ** op["left_shift"]
    total = total + requantize(x, op["m0_" + s], op["e_" + s])
  return total


def reduce_sum(op, arrays, q):
  return np.sum(q.astype(np.int64) - op["zp"], axis=tuple(op["axes"]))


def identity(op, arrays, q):
  return q.astype(np.int64) - op["zp"]


def norm(op, arrays, q):
  """Integer group / layer normalization: t ≈ 2^T·(x − mean)/sqrt(var + eps)."""
  p, f, a = op["sigma_bits"], op["mean_bits"], op["pre_shift"]
  groups, axes = op["groups"], tuple(op["reduce"])
  x = q.astype(np.int64) - op["zp"]
  x = x.reshape(q.shape[:-1] + (groups, q.shape[-1] // groups))
  n = int(np.prod([x.shape[ax] for ax in axes]))
  k = op.get("var_shift", 0)  # int16 codes: the centered values shifted before squaring
  s1 = np.sum(x, axis=axes, keepdims=True)
  mean = rdiv(s1, n)
  s2 = np.sum(rdbpot(x - mean, k) ** 2, axis=axes, keepdims=True)
  r = s1 - n * mean
  v = np.maximum(s2 - rdiv(rdbpot(r * r, 2 * k), n), 0)  # n · variance / 4^k, in codes²
  var = (v // n) * 2 ** (2 * p) + rdiv((v % n) * 2 ** (2 * p), n)
  sigma = np.maximum(isqrt(var + op["eps"]), 1)  # σ · 2^P
  inv = (2 ** 30) // sigma
  x_f = x * 2 ** f - rdiv(s1 * 2 ** f, n)
  return srdhm(x_f * 2 ** a, inv).reshape(q.shape)


def requant(op, arrays, acc):
  left = arrays[op["left"]].astype(np.int64)
  shifted = np.clip(np.asarray(acc, np.int64) * np.left_shift(np.int64(1), left), INT32_MIN,
                    INT32_MAX)
  if op.get("offset") is not None:
    shifted = shifted + arrays[op["offset"]].astype(np.int64)
    if np.any(shifted < INT32_MIN) or np.any(shifted > INT32_MAX):
      raise OverflowError(f"requant {op['out']} (layer {op.get('layer')!r}) leaves int32")
  y = rdbpot(srdhm(shifted, arrays[op["m0"]]), arrays[op["right"]])
  y = np.clip(y, op["lo"] - op["zp"], op["hi"] - op["zp"]) + op["zp"]
  return y.astype({"int8": np.int8, "int16": np.int16}.get(op["dtype"], np.int32))


def _window_taps(x, op, fill):
  """x padded with `fill` by op's padding, then one strided view per window tap."""
  x = np.pad(x, [tuple(p) for p in op["padding"]], constant_values=fill)
  window, strides = op["window"], op["strides"]
  sizes = [(x.shape[d] - window[d]) // strides[d] + 1 for d in range(x.ndim)]
  for tap in np.ndindex(*window):
    yield x[tuple(slice(t, t + s * (n - 1) + 1, s) for t, s, n in zip(tap, strides, sizes))]


def max_pool(op, arrays, q):
  """The largest code of each window; padding taps hold the dtype's minimum."""
  out = None
  for view in _window_taps(q, op, np.iinfo(q.dtype).min):
    out = view.copy() if out is None else np.maximum(out, view)
  return out


def window_sum(op, arrays, q):
  """Σ (q − zp) over each window; padding taps are real zeros."""
  out = 0
  for view in _window_taps(q.astype(np.int64) - op["zp"], op, 0):
    out = out + view
  return out


def reshape(op, arrays, q):
  return q.reshape((q.shape[0],) + tuple(op["shape"]))


def transpose(op, arrays, q):
  return np.transpose(q, op["perm"])


def matmul(op, arrays, qa, qb):
  """dot_general of two centered activations (batch axes first, then a's and b's free)."""
  a = qa.astype(np.int64) - op["zp_a"]
  b = qb.astype(np.int64) - op["zp_b"]
  letters = iter("abcdefghijklmnopqrstuvwxyz")
  la = [next(letters) for _ in range(a.ndim)]
  lb = [None] * b.ndim
  for i, j in zip(op["batch_lhs"] + op["contract_lhs"], op["batch_rhs"] + op["contract_rhs"]):
    lb[j] = la[i]
  lb = [c or next(letters) for c in lb]
  taken_a, taken_b = op["batch_lhs"] + op["contract_lhs"], op["batch_rhs"] + op["contract_rhs"]
  out = ([la[i] for i in op["batch_lhs"]] + [la[i] for i in range(a.ndim) if i not in taken_a]
         + [lb[j] for j in range(b.ndim) if j not in taken_b])
  return np.einsum(f"{''.join(la)},{''.join(lb)}->{''.join(out)}", a, b)


def embed(op, arrays, ids):
  """Rows of the int8 table at the ids (clipped to the table), as accumulators."""
  table = arrays[op["table"]]
  return table[np.clip(ids, 0, table.shape[0] - 1)].astype(np.int64)


def masked_sum(op, arrays, q, ids):
  """Σ over `axes` of (q − zp)·[ids ≠ pad], the ids at the activation's `mask_axes`."""
  shape = [1] * q.ndim
  shape[op["mask_axes"][0]], shape[op["mask_axes"][1]] = ids.shape
  keep = (ids != op["pad"]).reshape(shape)
  return np.sum((q.astype(np.int64) - op["zp"]) * keep, axis=tuple(op["axes"]))


def masked_softmax(op, arrays, q, ids):
  """`softmax` with the key padding mask [ids ≠ pad] over the last axis."""
  keep = (ids != op["pad"]).reshape((ids.shape[0],) + (1,) * (q.ndim - 2) + (ids.shape[1],))
  exp = {k: op["exp_" + k] for k in ("shift_in", "in_floor", "q_ln2", "q_b", "q_c",
                                     "out_shift")}
  plan = {"exp": exp, "n": op["n"], "out_bits": op["out_bits"]}
  return _ibert().i_softmax(q, plan, keep).astype(np.int64)


def _ibert():
  """The I-BERT kernels' numpy twin, ibert_numpy.py beside this file (numpy only)."""
  if "jaxquant_ibert_numpy" not in sys.modules:
    import importlib.util  # pylint: disable=import-outside-toplevel
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ibert_numpy.py")
    spec = importlib.util.spec_from_file_location("jaxquant_ibert_numpy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["jaxquant_ibert_numpy"] = module
  return sys.modules["jaxquant_ibert_numpy"]


def softmax(op, arrays, q):
  """I-BERT's i-softmax of int32 scores over the last axis (ibert_numpy.i_softmax)."""
  exp = {k: op["exp_" + k] for k in ("shift_in", "in_floor", "q_ln2", "q_b", "q_c",
                                     "out_shift")}
  plan = {"exp": exp, "n": op["n"], "out_bits": op["out_bits"]}
  return _ibert().i_softmax(q, plan).astype(np.int64)


def gelu(op, arrays, q):
  """I-BERT's i-GELU accumulator of symmetric int8 codes (ibert_numpy.i_gelu_acc)."""
  plan = {k: op[k] for k in ("in_clamp", "shift_in", "q_clip", "q_b", "q_c", "q_one")}
  return _ibert().i_gelu_acc(q, plan).astype(np.int64)


# The kernel of every op of the format, by name: adding an op to jaxquant's integer_only
# registry adds its kernel here. Core ops (those yielding an accumulator) return int64
# arrays, checked against int32 after their epilogue; the others return codes.
OPS = {"dot": dot, "conv": conv, "add": add, "sum": reduce_sum, "identity": identity,
       "norm": norm, "requant": requant, "reshape": reshape, "transpose": transpose,
       "matmul": matmul, "softmax": softmax, "gelu": gelu,
       "max_pool": max_pool, "window_sum": window_sum, "embed": embed,
       "masked_sum": masked_sum, "masked_softmax": masked_softmax}


def load(directory):
  """{'graph': the JSON document, 'arrays': {name: ndarray}} of a saved program."""
  with open(os.path.join(directory, "graph.json")) as fh:
    graph = json.load(fh)
  if graph.get("format") != "jaxquant.integer_program" or graph.get("version") != 1:
    raise ValueError(f"{directory} does not hold a jaxquant.integer_program v1")
  with np.load(os.path.join(directory, "arrays.npz")) as npz:
    arrays = {k: npz[k] for k in npz.files}
  return {"graph": graph, "arrays": arrays}


def quantize_input(program, x):
  """int8 codes of float inputs: clip(round_half_even(x·inv_scale) + zp, qmin, qmax)."""
  spec = program["graph"]["input"]
  x = np.asarray(x, np.float32)
  y = np.rint(x * np.float32(spec["inv_scale"]))
  y = np.where(np.isnan(y), np.float32(0), y)
  y = np.clip(y, spec["qmin"] - spec["zp"], spec["qmax"] - spec["zp"]) + spec["zp"]
  return y.astype(np.int8)


def run(program, codes):
  """int32 logits of int8 input codes (batch first)."""
  graph, arrays = program["graph"], program["arrays"]
  codes = np.asarray(codes)
  want = np.int32 if graph["input"].get("dtype") == "int32" else np.int8  # token ids: int32
  if codes.dtype != want:
    raise ValueError(f"run takes {np.dtype(want).name} input codes, got {codes.dtype}; use "
                     "quantize_input")
  env = {"input": codes}
  for op in graph["ops"]:
    if op["op"] not in OPS:
      raise ValueError(f"op {op['out']}: unknown op {op['op']!r}; this runtime knows "
                       f"{sorted(OPS)}")
    out = OPS[op["op"]](op, arrays, *(env[name] for name in op["in"]))
    if out.dtype == np.int64:  # an accumulator: its epilogue, then the int32 check
      if op.get("sign") is not None:
        out = out * arrays[op["sign"]].astype(np.int64)
      if op.get("bias") is not None:
        out = out + arrays[op["bias"]].astype(np.int64)
      if np.any(out < INT32_MIN) or np.any(out > INT32_MAX):
        raise OverflowError(f"op {op['out']} (layer {op.get('layer')!r}) leaves int32")
    env[op["out"]] = out
  return env[graph["output"]["tensor"]].astype(np.int32)


def main(argv):
  if len(argv) != 4:
    print("usage: python numpy_runtime.py DIR INPUT.npy OUTPUT.npy", file=sys.stderr)
    return 2
  program = load(argv[1])
  x = np.load(argv[2])
  if program["graph"]["input"].get("dtype") == "int32":  # token ids
    codes = x.astype(np.int32)
  else:
    codes = x if x.dtype == np.int8 else quantize_input(program, x)
  np.save(argv[3], run(program, codes))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
