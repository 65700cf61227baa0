"""Models we did not write, through the whole public pipeline: quantize, one QAT step,
calibrate, convert, serving == QAT, size and compute reports, export.

Each model is a small version of a flax example, written the way the example writes it
(not the way jaxquant's own models are): the ImageNet ResNet (`functools.partial` conv /
norm, BatchNorm with `use_running_average=not train`, a max-pool stem), the lm1b
Transformer decoder (`nn.SelfAttention`, a shared `nn.Embed` whose `attend` gives the
logits, `deterministic` / `decode` in its config) and the NNX MNIST CNN. The references
are closed forms (MACs, bytes) and the QAT forward itself.
"""
import dataclasses
import functools
import re
from typing import Any, Callable, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jaxquant as jq
from jaxquant.qtensor import QTensor
from tests.test_transform import jit as _jit

ModuleDef = Any
W8 = jq.QuantSpec(bits=8)
A8 = jq.QuantSpec(bits=8, granularity="tensor")
A8S = jq.QuantSpec(bits=8, granularity="tensor", static=True)


def assert_same_forward(y_serve, y_qat):
  """Serving == QAT: the same codes and integer sums; the float epilogue (scale, bias)
  may round differently where XLA fuses it differently (a few ulp of the output)."""
  y_serve, y_qat = np.asarray(y_serve), np.asarray(y_qat)
  np.testing.assert_allclose(y_serve, y_qat, rtol=0, atol=1e-6 * np.abs(y_qat).max())


def _normal(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _kernels(params, prefix=""):
  """'/'-joined paths of every 'kernel' / 'embedding' in a params tree."""
  out = []
  for k, v in params.items():
    p = f"{prefix}/{k}" if prefix else k
    if isinstance(v, dict):
      out += _kernels(v, p)
    elif k in ("kernel", "embedding"):
      out.append(p)
  return out


def _check_reports(size, compute, params, weight_bits=8, act_bits=8):
  """Every kernel stored as int8 codes + one float32 scale per output channel (per row
  of an embedding table); every contraction layer counted at W8A8."""
  for path in _kernels(params):
    shape = np.shape(_at(params, path))
    n = int(np.prod(shape))
    if path.endswith("embedding"):  # [vocab, features]: a scale per row
      contracted = shape[1]
    elif path.endswith("out/kernel"):  # attention's [heads, head_dim, features]
      contracted = shape[0] * shape[1]
    else:  # conv [window..., in, out], dense [in, out], q / k / v [in, heads, head_dim]
      contracted = n // shape[-1] if len(shape) == 4 else shape[0]
    assert size.layer(path).quantized_bytes == n + 4 * (n // contracted), path
  layers = [l for l in compute.layers if "(" not in l.path]  # not attention's q·k, p·v
  assert layers and all((l.weight_bits, l.act_bits) == (weight_bits, act_bits)
                        for l in layers), str(compute)


# Most of these tests' time is XLA compiling programs that run once: the QAT programs
# compile with the backend optimizations off (test_transform's `jit`; serving and export
# keep jax.jit's defaults, as exported programs compile with them); PRNG inits take the
# fast-compiling key.
KEY = jax.random.key(0, impl="unsafe_rbg")


def _export_matches(tmp_path, fn, variables, x):
  path = str(tmp_path / "model.jqx")
  jq.export_serving(fn, variables, x, path)
  np.testing.assert_array_equal(jq.load_exported(path)(x), jax.jit(fn)(variables, x))


# ------------------------------------------------------------------------ ImageNet ResNet

class ResNetBlock(nn.Module):
  """ResNet block (flax examples/imagenet/models.py)."""
  filters: int
  conv: ModuleDef
  norm: ModuleDef
  act: Callable
  strides: Tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class ResNet(nn.Module):
  """ResNetV1 (flax examples/imagenet/models.py; no axis_name: one device, no pmap)."""
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  num_classes: int
  num_filters: int = 64
  dtype: Any = jnp.float32
  act: Callable = nn.relu
  conv: ModuleDef = nn.Conv
  stem_kernel: int = 7  # the example's 7x7 stem; a smaller one for tiny inputs
  named: bool = False  # blocks `block_{i}_{j}` and the head `head` (else flax's names)

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(self.conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype)
    k, pad = self.stem_kernel, self.stem_kernel // 2
    x = conv(self.num_filters, (k, k), (2, 2), padding=[(pad, pad), (pad, pad)],
             name="conv_init")(x)
    x = norm(name="bn_init")(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, block_size in enumerate(self.stage_sizes):
      for j in range(block_size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block_cls(self.num_filters * 2**i, strides=strides, conv=conv, norm=norm,
                           act=self.act, name=f"block_{i}_{j}" if self.named else None)(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="head" if self.named else None)(x)
    return jnp.asarray(x, self.dtype)


TinyResNet = functools.partial(ResNet, stage_sizes=[1, 1], block_cls=ResNetBlock,
                               num_classes=5, num_filters=4)
IMAGES = _normal((2, 16, 16, 3), 0)


def _resnet(act):
  qmodel = jq.quantize_model(TinyResNet(), [jq.Rule(".*", weight=W8, act=act)])
  return qmodel, _jit(functools.partial(qmodel.init, train=False))(KEY, IMAGES)


def _qat_step(qmodel, variables, x, labels, zero_grad="$^", **apply_kwargs):
  """One SGD step on the quantized model's params; returns the new variables. Every
  kernel gets a gradient, except those `zero_grad` (a regex) matches, which get none."""
  def loss(params):
    logits, upd = qmodel.apply({**variables, "params": params}, x, **apply_kwargs,
                               mutable=[c for c in variables if c not in ("params", "quant")])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), upd

  (value, upd), grads = _jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
  assert np.isfinite(value)
  for path in _kernels(grads):
    g = grads
    for part in path.split("/"):
      g = g[part]
    assert np.all(np.isfinite(g)) and (np.any(np.asarray(g) != 0)
                                       != bool(re.fullmatch(zero_grad, path))), path
  params = jax.tree.map(lambda p, g: p - 0.1 * g, variables["params"], grads)
  return {**variables, **upd, "params": params}


def test_resnet_qat_convert_reports_export(tmp_path):
  qmodel, variables = _resnet(A8)
  # A block's last BatchNorm starts with scale 0 (as in the example), so the block's two
  # convs get no gradient in the first step; the projection, stem and head do.
  variables = _qat_step(qmodel, variables, IMAGES, jnp.array([1, 3]),
                        zero_grad=r"ResNetBlock_\d/Conv_[01]/kernel", train=True)
  serving, svars = jq.convert(qmodel, variables)
  kernels = _kernels(variables["params"])
  assert len(kernels) == 1 + 2 + 3 + 1  # stem, block 0, block 1 with its projection, head
  assert all(isinstance(_at(svars["params"], p), QTensor) for p in kernels)
  y_qat = _jit(functools.partial(qmodel.apply, train=False))(variables, IMAGES)
  fn = lambda v, x: serving.apply(v, x, train=False)
  assert_same_forward(jax.jit(fn)(svars, IMAGES), y_qat)
  compute = jq.compute_report(qmodel, variables, IMAGES, train=False)
  # The stem: 2 images x 8 x 8 outputs x 4 channels, each a 7x7x3 window.
  assert compute.layer("conv_init").macs == 2 * 8 * 8 * 4 * 7 * 7 * 3
  _check_reports(jq.size_report(svars), compute, variables["params"])
  _export_matches(tmp_path, fn, svars, IMAGES)


# Slow: calibrate(..., train=False) and convert(..., train=False) on this ResNet are the
# default run's test_model_flags.py::test_calibrate_and_convert_take_model_flags (the
# same example block, static activation ranges, serving == QAT).
@pytest.mark.slow
def test_resnet_calibrate_with_train_flag():
  qmodel, variables = _resnet(A8S)
  variables = jq.calibrate(qmodel, variables, [IMAGES], train=False)
  assert _at(variables["quant_stats"], "ResNetBlock_1/conv_proj")["act_hi"] > 0
  serving, svars = jq.convert(qmodel, variables, IMAGES, train=False)
  assert_same_forward(serving.apply(svars, IMAGES, train=False),
                      qmodel.apply(variables, IMAGES, train=False))


def _at(tree, path):
  for part in path.split("/"):
    tree = tree[part]
  return tree


# ----------------------------------------------------------------- lm1b Transformer (decoder)

@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Global hyperparameters (flax examples/lm1b/models.py)."""
  vocab_size: int = 32
  output_vocab_size: int = 32
  logits_via_embedding: bool = True
  dtype: Any = jnp.float32
  emb_dim: int = 16
  num_heads: int = 2
  num_layers: int = 1
  qkv_dim: int = 16
  mlp_dim: int = 32
  max_len: int = 16
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  deterministic: bool = False
  decode: bool = False
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.normal(stddev=1e-6)


def shift_right(x, axis=1):
  pad_widths = [(0, 0)] * len(x.shape)
  pad_widths[axis] = (1, 0)
  padded = jnp.pad(x, pad_widths, mode="constant", constant_values=x.dtype.type(0))
  return jax.lax.dynamic_slice_in_dim(padded, 0, padded.shape[axis] - 1, axis)


def sinusoidal_init(max_len, min_scale=1.0, max_scale=10000.0):
  def init(key, shape, dtype=np.float32):
    del key, dtype
    d_feature = shape[-1]
    pe = np.zeros((max_len, d_feature), dtype=np.float32)
    position = np.arange(0, max_len)[:, np.newaxis]
    scale_factor = -np.log(max_scale / min_scale) / (d_feature // 2 - 1)
    div_term = min_scale * np.exp(np.arange(0, d_feature // 2) * scale_factor)
    pe[:, :d_feature // 2] = np.sin(position * div_term)
    pe[:, d_feature // 2: 2 * (d_feature // 2)] = np.cos(position * div_term)
    return jnp.array(pe[np.newaxis, :, :])
  return init


class AddPositionEmbs(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, inputs):
    config = self.config
    pos_emb_shape = (1, config.max_len, inputs.shape[-1])
    pos_embedding = sinusoidal_init(max_len=config.max_len)(None, pos_emb_shape, None)
    return inputs + pos_embedding[:, :inputs.shape[1], :]


class MlpBlock(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, inputs):
    config = self.config
    x = nn.Dense(config.mlp_dim, dtype=config.dtype, kernel_init=config.kernel_init,
                 bias_init=config.bias_init)(inputs)
    x = nn.relu(x)
    x = nn.Dropout(rate=config.dropout_rate)(x, deterministic=config.deterministic)
    output = nn.Dense(inputs.shape[-1], dtype=config.dtype, kernel_init=config.kernel_init,
                      bias_init=config.bias_init)(x)
    return nn.Dropout(rate=config.dropout_rate)(output, deterministic=config.deterministic)


class EncoderDecoder1DBlock(nn.Module):
  config: TransformerConfig

  @nn.compact
  def __call__(self, inputs, decoder_mask=None):
    config = self.config
    x = nn.LayerNorm(dtype=config.dtype)(inputs)
    x = nn.SelfAttention(num_heads=config.num_heads, dtype=config.dtype,
                         qkv_features=config.qkv_dim, kernel_init=config.kernel_init,
                         bias_init=config.bias_init, use_bias=False, broadcast_dropout=False,
                         dropout_rate=config.attention_dropout_rate,
                         deterministic=config.deterministic, decode=config.decode)(
                             x, mask=decoder_mask)
    x = nn.Dropout(rate=config.dropout_rate)(x, deterministic=config.deterministic)
    x = x + inputs
    z = nn.LayerNorm(dtype=config.dtype)(x)
    z = MlpBlock(config=config)(z)
    return x + z


class Decoder(nn.Module):
  config: TransformerConfig
  shared_embedding: Any = None

  @nn.compact
  def __call__(self, inputs, decoder_mask=None):
    config = self.config
    output_embed = self.shared_embedding or nn.Embed(
        num_embeddings=config.output_vocab_size, features=config.emb_dim,
        embedding_init=nn.initializers.normal(stddev=1.0))
    y = inputs.astype("int32")
    if not config.decode:
      y = shift_right(y)
    y = output_embed(y)
    y = AddPositionEmbs(config=config, name="posembed_output")(y)
    y = nn.Dropout(rate=config.dropout_rate)(y, deterministic=config.deterministic)
    y = y.astype(config.dtype)
    for lyr in range(config.num_layers):
      y = EncoderDecoder1DBlock(config=config, name=f"encoderdecoderblock_{lyr}")(
          y, decoder_mask=decoder_mask)
    y = nn.LayerNorm(dtype=config.dtype, name="encoderdecoder_norm")(y)
    if config.logits_via_embedding:
      logits = output_embed.attend(y.astype(jnp.float32))
      logits = logits / jnp.sqrt(y.shape[-1])
    else:
      logits = nn.Dense(config.output_vocab_size, dtype=config.dtype,
                        kernel_init=config.kernel_init, bias_init=config.bias_init,
                        name="logitdense")(y)
    return logits


class TransformerLM(nn.Module):
  """The lm1b decoder-only language model."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, inputs):
    config = self.config
    decoder_mask = nn.combine_masks(nn.make_attention_mask(inputs > 0, inputs > 0,
                                                           dtype=config.dtype),
                                    nn.make_causal_mask(inputs, dtype=config.dtype))
    return Decoder(config=config, shared_embedding=None, name="decoder")(
        inputs, decoder_mask=decoder_mask)


TOKENS = jnp.asarray(np.random.default_rng(3).integers(1, 32, size=(2, 8)), jnp.int32)
LM_RULES = [jq.Rule(".*", weight=W8, act=A8S)]


def test_lm1b_transformer_whole_pipeline(tmp_path):
  train_model = jq.quantize_model(TransformerLM(TransformerConfig()), LM_RULES)
  eval_model = jq.quantize_model(TransformerLM(TransformerConfig(deterministic=True)),
                                 LM_RULES)
  variables = _jit(eval_model.init)(KEY, TOKENS)
  variables = _qat_step(train_model, variables, TOKENS, TOKENS,
                        rngs={"dropout": jax.random.key(1, impl="unsafe_rbg")})
  variables = jq.calibrate(eval_model, variables, [TOKENS])
  stats = variables["quant_stats"]["decoder"]
  assert stats["Embed_0"]["act_hi"] > 0  # attend's input (the tied logits) has a range
  assert stats["encoderdecoderblock_0"]["SelfAttention_0"]["query"]["act_hi"] > 0
  serving, svars = jq.convert(eval_model, variables)
  embedding = svars["params"]["decoder"]["Embed_0"]["embedding"]
  assert isinstance(embedding, QTensor) and embedding.spec.bits == 8  # the shared table
  fn = lambda v, x: serving.apply(v, x)
  assert_same_forward(jax.jit(fn)(svars, TOKENS), _jit(eval_model.apply)(variables, TOKENS))
  compute = jq.compute_report(eval_model, variables, TOKENS)
  # The tied logits: 2 x 8 tokens x 32 vocabulary entries, each a 16-wide dot.
  assert compute.layer("decoder/Embed_0").macs == 2 * 8 * 32 * 16
  _check_reports(jq.size_report(svars), compute, variables["params"])
  _export_matches(tmp_path, fn, svars, TOKENS)


# ------------------------------------------------------------------------ NNX MNIST CNN

class NNXCNN(nnx.Module):
  """The CNN of the flax NNX MNIST tutorial, narrow and for 8x8 images."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)
    self.conv2 = nnx.Conv(4, 8, kernel_size=(3, 3), rngs=rngs)
    self.avg_pool = functools.partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    self.linear1 = nnx.Linear(8 * 2 * 2, 16, rngs=rngs)
    self.linear2 = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = self.avg_pool(nnx.relu(self.conv1(x)))
    x = self.avg_pool(nnx.relu(self.conv2(x)))
    x = x.reshape(x.shape[0], -1)
    return self.linear2(nnx.relu(self.linear1(x)))



def test_nnx_mnist_cnn_whole_pipeline(tmp_path):
  model = jq.quantize_model(NNXCNN(rngs=nnx.Rngs(KEY)), [jq.Rule(".*", weight=W8, act=A8S)])
  x, labels = _normal((4, 8, 8, 1), 1), jnp.array([0, 1, 2, 3])
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  before = model.linear1.kernel[...]

  @nnx.jit
  def train_step(model, optimizer, x, labels):  # as the flax NNX MNIST tutorial
    def loss_fn(model):
      logits = model(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  nnx.update(model, jq.calibrate(model, nnx.state(model), [x]))
  assert np.isfinite(train_step(model, optimizer, x, labels))
  assert np.any(model.linear1.kernel[...] != before)
  serving, sstate = jq.convert(model, nnx.state(model))
  assert isinstance(serving.conv2.kernel.get_value(), QTensor)
  forward = nnx.jit(lambda m, x: m(x))
  assert_same_forward(forward(serving, x), forward(model, x))
  compute = jq.compute_report(model, nnx.state(model), x)
  assert compute.total_macs == 4 * (8 * 8 * 4 * 9 + 4 * 4 * 8 * 36 + 32 * 16 + 16 * 10)
  _check_reports(jq.size_report(sstate), compute, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  graphdef = nnx.graphdef(serving)
  _export_matches(tmp_path, lambda st, x: nnx.merge(graphdef, st)(x), sstate, x)
