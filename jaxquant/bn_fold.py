"""BatchNorm folded into the preceding conv / dense layer, trained with folded weights.

Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", §3.2 and Fig. C.8: at inference a BatchNorm after a
layer is folded into the layer's weights and bias,
    w_fold = w · γ / sqrt(σ² + ε)              (per output channel),
    b_fold = β − γ · μ / sqrt(σ² + ε),
so the quantized model must be *trained* with the quantized w_fold, not with a quantized
w followed by a float BatchNorm. During training each step therefore
  1. runs the layer with float weights to get the batch statistics μ_B, σ²_B per output
     channel (gradients flow through them, as through BatchNorm),
  2. folds w_fold = w · γ / sqrt(σ²_B + ε), quantizes it and runs the quantized layer,
  3. adds b_fold = β − γ · μ_B / sqrt(σ²_B + ε),
and updates the moving averages of μ and σ² as `nn.BatchNorm` does
(m ← momentum · m + (1 − momentum) · stat). In eval mode (`use_running_average=True`) the
moving averages replace the batch statistics in the fold, so eval is exactly
quantize(w_fold) ⊛ x + b_fold: one contraction and one per-channel bias.

Late-training correction (the simple form of the paper's switch from batch to moving
statistics, Fig. C.8): pass `use_running_average=True` while still training. The fold
then uses the (now frozen) moving averages, so the quantized weights stop jittering with
each batch's σ_B and training sees exactly the eval-mode computation; γ, β and the kernel
still get gradients. We do not implement the σ_B/σ correction factor variant.

    class Net(nn.Module):
      @nn.compact
      def __call__(self, x, train: bool):
        x = jq.FoldedConvBN(16, (3,))(x, use_running_average=not train)
        x = nn.relu(x)
        return jq.FoldedDenseBN(10)(x.reshape(x.shape[0], -1), use_running_average=not train)

The layers are `nn.Conv` / `nn.Dense` subclasses, so they are quantized like any other
layer: by `jq.quantize_model` rules matching their path (the rule's spec quantizes w_fold
and the input; observers and learned steps live at the layer's path), or directly with
`conv_general_dilated=jq.make_conv(spec)` / `dot_general=jq.make_dot_general(spec)`. With
neither they are float Conv / Dense + BatchNorm. Variables: 'params' {kernel, scale (γ),
bias (β)}, 'batch_stats' {mean, var} (make 'batch_stats' mutable when training, as for
BatchNorm). `jq.to_integer` converts them (the eval-mode forward is a contraction with a
constant folded weight plus a per-channel bias). `jq.convert` (serving QTensors) does not
know the fold: such a layer refuses a stored QTensor kernel.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from flax.linen.linear import canonicalize_padding

from jaxquant.qtensor import QTensor


def _merge(field: Optional[bool], arg: Optional[bool], path: str) -> bool:
  value = nn.merge_param("use_running_average", field, arg)
  if not isinstance(value, bool):
    raise ValueError(f"layer {path!r}: use_running_average={value!r} must be a bool")
  return value


def _float_kernel(m, kernel_shape) -> jax.Array:
  if m.has_variable("params", "kernel") and isinstance(m.get_variable("params", "kernel"),
                                                         QTensor):
    raise ValueError(f"layer {'/'.join(m.path)!r}: a folded conv/dense+BatchNorm cannot run on "
                     "a stored QTensor kernel (jq.convert quantizes the unfolded kernel); "
                     "use jq.to_integer, or apply the QAT model in eval mode")
  return m.param("kernel", m.kernel_init, kernel_shape, m.param_dtype)


def fold_batch_norm(m, features: int, float_out: Callable[[], jax.Array],
                    use_running_average: bool):
  """(γ/sqrt(σ²+ε), β − γ·μ/sqrt(σ²+ε)), each [features], for the module `m` (which owns
  'params' scale / bias and 'batch_stats' mean / var). `float_out()` gives the float
  layer output [..., features] whose batch statistics are used in training."""
  ra_mean = m.variable("batch_stats", "mean", lambda: jnp.zeros((features,), jnp.float32))
  ra_var = m.variable("batch_stats", "var", lambda: jnp.ones((features,), jnp.float32))
  gamma = m.param("scale", m.scale_init, (features,), m.param_dtype)
  beta = m.param("bias", m.bias_init, (features,), m.param_dtype)
  if use_running_average:
    mean, var = ra_mean.value, ra_var.value
  else:
    y = float_out().astype(jnp.float32)
    axes = tuple(range(y.ndim - 1))  # every axis but the channels (batch and spatial)
    mean = jnp.mean(y, axes)
    var = jnp.mean(jnp.square(y - mean.reshape((1,) * len(axes) + (features,))), axes)  # biased
    if not m.is_initializing():
      # The moving averages see the statistics, not their gradients.
      mom = m.momentum
      ra_mean.value = mom * ra_mean.value + (1 - mom) * lax.stop_gradient(mean)
      ra_var.value = mom * ra_var.value + (1 - mom) * lax.stop_gradient(var)
  inv_N = gamma * lax.rsqrt(var + m.epsilon)
  return inv_N, beta - mean * inv_N


def _per_channel(v_N, ndim: int, dtype):
  """[N] → [1, ..., 1, N] (channels last), explicit: no implicit rank promotion."""
  return v_N.astype(dtype).reshape((1,) * (ndim - 1) + v_N.shape)


def _conv_dimension_numbers(ndim: int) -> lax.ConvDimensionNumbers:
  """Flax's channels-last layout: x [N, spatial..., C], kernel [spatial..., I, O]."""
  spatial = tuple(range(1, ndim - 1))
  return lax.ConvDimensionNumbers((0, ndim - 1) + spatial,
                                  (ndim - 1, ndim - 2) + tuple(range(ndim - 2)),
                                  (0, ndim - 1) + spatial)


class FoldedConvBN(nn.Conv):
  """`nn.Conv` followed by `nn.BatchNorm`, trained and run with BatchNorm folded into the
  kernel (module docstring). Takes nn.Conv's fields (`use_bias` is ignored: β is the
  bias) plus BatchNorm's `use_running_average`, `momentum`, `epsilon`, `scale_init`.
  Inputs have exactly one batch axis: [N, spatial..., C]. Not supported: `mask`,
  `shared_weights=False`, `conv_general_dilated_cls`, CIRCULAR / REFLECT / CAUSAL padding.
  """
  use_running_average: Optional[bool] = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  scale_init: Callable[..., Any] = nn.initializers.ones

  @nn.compact
  def __call__(self, inputs, use_running_average: Optional[bool] = None):  # pylint: disable=arguments-differ
    path = "/".join(self.path)
    use_ra = _merge(self.use_running_average, use_running_average, path)
    kernel_size = ((self.kernel_size,) if isinstance(self.kernel_size, int)
                   else tuple(self.kernel_size))
    if self.mask is not None or not self.shared_weights or self.conv_general_dilated_cls:
      raise ValueError(f"layer {path!r}: FoldedConvBN supports neither mask, unshared "
                       "weights nor conv_general_dilated_cls")
    if inputs.ndim != len(kernel_size) + 2:
      raise ValueError(f"layer {path!r}: input of shape {inputs.shape} must be "
                       f"[batch, {len(kernel_size)} spatial axes, channels]")
    padding = canonicalize_padding(self.padding, len(kernel_size))
    if padding in ("CIRCULAR", "REFLECT", "CAUSAL"):
      raise ValueError(f"layer {path!r}: padding={self.padding!r} is not supported")
    bcast = lambda v: (1,) * len(kernel_size) if v is None else (
        (v,) * len(kernel_size) if isinstance(v, int) else tuple(v))
    in_features = inputs.shape[-1]
    if in_features % self.feature_group_count:
      raise ValueError(f"layer {path!r}: {in_features} input channels are not divisible "
                       f"by feature_group_count={self.feature_group_count}")
    kernel = _float_kernel(self, kernel_size + (in_features // self.feature_group_count,
                                                self.features))
    inputs, kernel = self.promote_dtype(inputs, kernel, dtype=self.dtype)
    args = (bcast(self.strides), padding)
    kwargs = dict(lhs_dilation=bcast(self.input_dilation),
                  rhs_dilation=bcast(self.kernel_dilation),
                  dimension_numbers=_conv_dimension_numbers(inputs.ndim),
                  feature_group_count=self.feature_group_count, precision=self.precision)
    inv_N, bias_N = fold_batch_norm(
        self, self.features, lambda: lax.conv_general_dilated(inputs, kernel, *args, **kwargs),
        use_ra)
    conv = self.conv_general_dilated or lax.conv_general_dilated  # quantized, or float
    y = conv(inputs, kernel * _per_channel(inv_N, kernel.ndim, kernel.dtype), *args, **kwargs)
    return y + _per_channel(bias_N, y.ndim, y.dtype)


class FoldedDenseBN(nn.Dense):
  """`nn.Dense` followed by `nn.BatchNorm` (over every axis but the features), trained
  and run with BatchNorm folded into the kernel (module docstring). Takes nn.Dense's
  fields (`use_bias` is ignored) plus `use_running_average`, `momentum`, `epsilon`,
  `scale_init`; not supported: `dot_general_cls`."""
  use_running_average: Optional[bool] = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  scale_init: Callable[..., Any] = nn.initializers.ones

  @nn.compact
  def __call__(self, inputs, use_running_average: Optional[bool] = None):  # pylint: disable=arguments-differ
    path = "/".join(self.path)
    use_ra = _merge(self.use_running_average, use_running_average, path)
    if self.dot_general_cls is not None:
      raise ValueError(f"layer {path!r}: FoldedDenseBN does not support dot_general_cls")
    kernel = _float_kernel(self, (inputs.shape[-1], self.features))
    inputs, kernel = self.promote_dtype(inputs, kernel, dtype=self.dtype)
    dims = (((inputs.ndim - 1,), (0,)), ((), ()))
    inv_N, bias_N = fold_batch_norm(
        self, self.features,
        lambda: lax.dot_general(inputs, kernel, dims, precision=self.precision), use_ra)
    dot = self.dot_general or lax.dot_general  # quantized, or float
    y = dot(inputs, kernel * _per_channel(inv_N, 2, kernel.dtype), dims,
            precision=self.precision)
    return y + _per_channel(bias_N, y.ndim, y.dtype)
