"""Independent numpy references shared by the engine tests (not the library's code)."""
import numpy as np


def np_quant(x, spec, reduce_axes):
  """Dequantized x for an 'int' (absmax) or binary spec, in numpy float32."""
  x = np.asarray(x, np.float32)
  red = tuple(a % x.ndim for a in reduce_axes)
  if spec.granularity == "tensor":
    xb, red, restore = x, tuple(range(x.ndim)), x.shape
  elif spec.granularity == "channel":
    xb, restore = x, x.shape
  else:
    (a,) = red
    g = spec.group_size
    xb = x.reshape(x.shape[:a] + (x.shape[a] // g, g) + x.shape[a + 1:])
    red, restore = (a + 1,), x.shape
  if spec.format == "binary":
    alpha = np.mean(np.abs(xb), axis=red, keepdims=True)
    return (np.where(xb < 0, -1.0, 1.0) * alpha).astype(np.float32).reshape(restore)
  b = spec.bits
  if spec.symmetric and getattr(spec, "full_range", False):
    qmin, qmax = -(2 ** (b - 1)), 2 ** (b - 1) - 1  # every code, absmax at qmax + 1/2
    s = np.max(np.abs(xb), axis=red, keepdims=True) / np.float32(qmax + 0.5)
    zp = np.zeros_like(s)
  elif spec.symmetric:
    qmin, qmax = -(2 ** (b - 1) - 1), 2 ** (b - 1) - 1
    s = np.max(np.abs(xb), axis=red, keepdims=True) / np.float32(qmax)
    zp = np.zeros_like(s)
  else:
    qmin, qmax = -(2 ** (b - 1)), 2 ** (b - 1) - 1
    lo = np.minimum(np.min(xb, axis=red, keepdims=True), 0)
    hi = np.maximum(np.max(xb, axis=red, keepdims=True), 0)
    s = (hi - lo) / np.float32(qmax - qmin)
    zp = np.clip(np.round(qmin - lo / s), qmin, qmax)
  codes = np.round(np.clip(xb / s + zp, qmin, qmax))
  return ((codes - zp) * s).astype(np.float32).reshape(restore)


def np_quant_keep(x, spec, keep_axis):
  """Dequantized x with one scale per index of `keep_axis` ('channel') or per tensor."""
  x = np.asarray(x)
  return np_quant(x, spec, tuple(a for a in range(x.ndim) if a != keep_axis))
