"""Per-layer PTQ statistics of a float Flax model, and weight-only PTQ applied to its params.

A stand-in for the transform's observer slot, good enough to measure the algorithms:
`layer_stats` runs the float model on calibration batches under
`flax.linen.intercept_methods` and accumulates `jaxquant.ptq.stats` of every matched
Dense / DenseGeneral layer's input (real tokens only: padding rows are masked out).
`quantize_params` replaces each matched kernel by its fake-quantized version (RTN, GPTQ
or AWQ), so the float model computes with exactly the weights the method chose; AWQ's
weight there is diag(1/s)·Q(diag(s)·W), the same product as an explicit input scale.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jaxquant as jq
from jaxquant.ptq import awq, gptq, stats

METHODS = ("rtn", "gptq", "gptq_act_order", "awq", "awq_clip", "awq_gptq")


def _contracting(module) -> int:
  """Number of leading kernel axes that contract with the input."""
  if isinstance(module, nn.DenseGeneral):
    axis = module.axis if isinstance(module.axis, tuple) else (module.axis,)
    return len(axis)
  return 1


def layer_stats(apply_fn: Callable, variables, batches: Iterable, pattern: str) -> Dict[str, stats.Stats]:
  """{layer path: Stats of its inputs} over `batches` of (ids, mask), for the Dense /
  DenseGeneral layers whose path fully matches `pattern`. Runs eagerly (not jitted)."""
  out: Dict[str, stats.Stats] = {}
  current = {}

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name == "__call__" and isinstance(m, (nn.Dense, nn.DenseGeneral)):
      path = "/".join(m.path)
      if re.fullmatch(pattern, path):
        x = args[0]
        mask = current["mask"]
        x = x.reshape(mask.shape + (-1,))  # [B, T, H, Dh] -> [B, T, H·Dh]
        st = out.get(path, stats.init(x.shape[-1]))
        out[path] = stats.update(st, x, mask)
    return next_fun(*args, **kwargs)

  for ids, mask in batches:
    current["mask"] = jnp.asarray(mask)
    with nn.intercept_methods(interceptor):
      apply_fn(variables, ids, mask)
  if not out:
    raise ValueError(f"pattern={pattern!r} matched no Dense/DenseGeneral layer")
  return out


def _get(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def quantize_kernel(kernel, n_contracting: int, spec: jq.QuantSpec, method: str,
                    st: Optional[stats.Stats], *, percdamp: float = 0.01):
  """(fake-quantized kernel in its own shape, info dict) by `method` (see METHODS)."""
  w = gptq.as_matrix(kernel, n_contracting)
  info = {}
  if method == "rtn":
    w_hat = jq.dequantize(jq.quantize(w, spec, reduce_axes=(0,)))
  elif method in ("gptq", "gptq_act_order"):
    res = gptq.gptq(w, stats.hessian(st), spec, percdamp=percdamp,
                    act_order=method == "gptq_act_order")
    w_hat = res.weight
  elif method in ("awq", "awq_clip", "awq_gptq"):
    res = awq.awq_search(w, st.xtx, stats.mean_abs(st), spec, clip=method == "awq_clip")
    info["alpha"] = res.alpha
    w_hat = res.weight
    if method == "awq_gptq":  # GPTQ on diag(s) W, whose input is x / s: H' = S⁻¹ H S⁻¹
      s = res.scale
      h = stats.hessian(st) / s[:, None] / s[None, :]
      g = gptq.gptq(w * s[:, None], h, spec, percdamp=percdamp, act_order=True)
      w_hat = g.weight / s[:, None]
  else:
    raise ValueError(f"method={method!r} is not one of {METHODS}")
  if st is not None:
    info["err"] = float(stats.output_error(st.xtx, w, w_hat))
  return jnp.reshape(w_hat, kernel.shape).astype(kernel.dtype), info


def quantize_params(model_fn_modules: Dict[str, int], params, layer_st: Dict[str, stats.Stats],
                    spec: jq.QuantSpec, method: str, **kw):
  """A copy of `params` with every kernel in `model_fn_modules` ({path: n_contracting})
  replaced by `quantize_kernel`'s; returns (params, {path: info})."""
  params = jax.tree_util.tree_map(lambda a: a, params)  # a new tree of the same leaves
  infos = {}
  for path, n_contracting in sorted(model_fn_modules.items()):
    layer = _get(params, path)
    layer["kernel"], infos[path] = quantize_kernel(layer["kernel"], n_contracting, spec,
                                                   method, layer_st.get(path), **kw)
  return params, infos


def dense_layers(apply_fn: Callable, variables, ids, mask, pattern: str) -> Dict[str, int]:
  """{path: number of contracting kernel axes} of the matched Dense/DenseGeneral layers."""
  found = {}

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name == "__call__" and isinstance(m, (nn.Dense, nn.DenseGeneral)):
      path = "/".join(m.path)
      if re.fullmatch(pattern, path):
        found[path] = _contracting(m)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v: apply_fn(v, ids, mask), variables)
  return found


def token_count(masks: Iterable[np.ndarray]) -> int:
  return int(sum(np.sum(m) for m in masks))
