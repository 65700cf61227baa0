"""Tests for experiments.models: shapes, parameter layout, purity, causality, gradients."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from experiments.models import MODEL_NAMES, SelfAttention, get_model, model_fields

# name -> (num_classes, example input, expected output shape)
CASES = {
    "mlp": (10, jnp.ones((3, 40, 1), jnp.float32), (3, 10)),
    "cnn1d": (10, jnp.ones((3, 40, 1), jnp.float32), (3, 10)),
    "resnet": (10, jnp.ones((3, 8, 8, 1), jnp.float32), (3, 10)),
    "gpt": (256, jnp.arange(3 * 16, dtype=jnp.int32).reshape(3, 16) % 256, (3, 16, 256)),
    "bert": (5, jnp.arange(3 * 16, dtype=jnp.int32).reshape(3, 16) % 256, (3, 5)),
}

# Layers that own weights; quantization intercepts exactly these.
STANDARD_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Embed, nn.LayerNorm, nn.GroupNorm)


def _fill(path, shape_dtype):
    """Deterministic stand-in for an initializer, scaled like the real ones."""
    leaf = path[-1].key
    shape = shape_dtype.shape
    if leaf == "scale":
        return jnp.ones(shape, shape_dtype.dtype)
    rng = np.random.default_rng(abs(hash(jax.tree_util.keystr(path))) % 2**32)
    std = 0.02 if leaf in ("bias", "embedding") else 1.0 / np.sqrt(np.prod(shape[:-1]))
    return jnp.asarray(rng.normal(0.0, std, shape), shape_dtype.dtype)


@functools.lru_cache(maxsize=None)
def _init_cached(name, kwargs_items):
    num_classes, x, _ = CASES[name]
    model = get_model(name, num_classes=num_classes, **dict(kwargs_items))
    # Compiling model.init (threefry for every parameter) costs seconds per model on
    # CPU; tracing it with eval_shape and filling numpy values exercises the same
    # module code and keeps the suite fast. test_real_init runs a true init.
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    variables = jax.tree_util.tree_map_with_path(_fill, shapes)
    return model, variables, x


def _init(name, **kwargs):
    return _init_cached(name, tuple(sorted(kwargs.items())))


def _param_paths(params):
    return {"/".join(k[:-1]) for k in traverse_util.flatten_dict(params)}


def _num_params(params):
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def test_model_names():
    assert MODEL_NAMES == ("mlp", "cnn1d", "resnet", "gpt", "bert")
    assert set(CASES) == set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_shapes_pure_params_jit_and_finite_grads(name):
    model, variables, x = _init(name)
    assert set(variables) == {"params"}  # no batch stats, no other mutable state
    params = variables["params"]

    def loss_fn(p):
        out = model.apply({"params": p}, x)
        return jnp.mean(jax.nn.log_softmax(out)[..., 0]), out

    # One compiled function gives both the logits and the gradients.
    (_, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    assert logits.shape == CASES[name][2] and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))
    if name in ("mlp", "cnn1d"):  # eager apply is slow for the deeper models
        eager = model.apply({"params": params}, x)
        np.testing.assert_allclose(logits, eager, rtol=1e-5, atol=1e-5)
    leaves = [np.asarray(g) for g in jax.tree.leaves(grads)]  # numpy: no compile per shape
    assert all(np.all(np.isfinite(g)) for g in leaves)
    assert any(np.abs(g).max() > 0 for g in leaves)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_weight_lives_in_a_standard_layer(name):
    model, variables, x = _init(name)
    seen = set()

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, STANDARD_LAYERS):
            seen.add("/".join(context.module.scope.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(model.apply, variables, x)  # tracing alone runs the interceptor
    assert _param_paths(variables["params"]) <= seen


def test_real_init():
    model = get_model("cnn1d", num_classes=10)
    x = CASES["cnn1d"][1]
    variables = jax.jit(model.init)(jax.random.key(0), x)
    shapes = jax.tree.map(jnp.shape, _init("cnn1d")[1])
    assert jax.tree.map(jnp.shape, variables) == shapes
    assert all(np.all(np.isfinite(np.asarray(v))) for v in jax.tree.leaves(variables))


def test_param_counts():
    assert _num_params(_init("cnn1d")[1]) == 5210  # 150 + 1900 + 1900 + 1260
    assert _num_params(_init("mlp")[1]) == 40 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    # 2 blocks x (4*64*64 + 4*64 attention, 2*64*256 + 256 + 64 mlp, 2*2*64 norms),
    # embeddings 256*64 + 256*64, final norm, head 64*256 + 256.
    block = 4 * (64 * 64 + 64) + 2 * 64 * 256 + 256 + 64 + 4 * 64
    expected = 2 * block + 2 * 256 * 64 + 2 * 64 + 64 * 256 + 256
    assert _num_params(_init("gpt")[1]) == expected
    assert 5_000 < _num_params(_init("resnet")[1]) < 100_000


def test_readable_module_paths():
    gpt_paths = _param_paths(_init("gpt")[1]["params"])
    for path in ("token_embed", "pos_embed", "block_0/attn/query", "block_0/attn/key",
                 "block_0/attn/value", "block_1/attn/out", "block_0/mlp/fc1",
                 "block_1/mlp/fc2", "block_0/ln_1", "ln_f", "head"):
        assert path in gpt_paths
    assert "classifier" in _param_paths(_init("bert")[1]["params"])
    resnet_paths = _param_paths(_init("resnet", blocks_per_stage=2)[1]["params"])
    assert {"stem", "stage_0/block_1/conv2", "stage_1/block_0/proj", "head"} <= resnet_paths
    assert "stage_0/block_0/proj" not in resnet_paths  # identity shortcut


def test_gpt_is_causal():
    model, variables, tokens = _init("gpt")
    changed = tokens.at[:, 9].set((tokens[:, 9] + 1) % 256)
    apply = jax.jit(model.apply)
    before, after = apply(variables, tokens), apply(variables, changed)
    np.testing.assert_array_equal(before[:, :9], after[:, :9])
    assert not np.allclose(before[:, 9:], after[:, 9:])


def _filled_params(module, x):
    """`module`'s variables for input `x`, filled deterministically by `_fill`."""
    return jax.tree_util.tree_map_with_path(
        _fill, jax.eval_shape(module.init, jax.random.key(2), x)
    )


@pytest.mark.parametrize("causal", [True, False])
def test_attention_sees_the_future_only_when_bidirectional(causal):
    attn = SelfAttention(num_heads=2, causal=causal)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 8)), jnp.float32)
    params = _filled_params(attn, x)
    apply = jax.jit(attn.apply)
    out, out_changed = apply(params, x), apply(params, x.at[:, -1].add(1.0))
    first_changed = not np.allclose(out[:, 0], out_changed[:, 0])
    assert first_changed == (not causal)


def test_attention_matches_reference():
    attn = SelfAttention(num_heads=2, causal=True)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 5, 4)), jnp.float32)
    shapes = jax.eval_shape(attn.init, jax.random.key(2), x)
    p = jax.tree_util.tree_map_with_path(_fill, shapes)["params"]
    x, p = np.asarray(x, np.float64), jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    q = np.einsum("btd,dhk->bthk", x, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("btd,dhk->bthk", x, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("btd,dhk->bthk", x, p["value"]["kernel"]) + p["value"]["bias"]
    out = np.zeros((1, 5, 2, 2))
    for h in range(2):
        for t in range(5):
            s = np.array([q[0, t, h] @ k[0, j, h] / np.sqrt(2.0) for j in range(t + 1)])
            w = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            out[0, t, h] = w @ v[0, : t + 1, h]
    expected = np.einsum("bthk,hkd->btd", out, p["out"]["kernel"]) + p["out"]["bias"]
    np.testing.assert_allclose(jax.jit(attn.apply)({"params": p}, x), expected, rtol=1e-4, atol=1e-5)


def test_gpt_rejects_sequences_past_max_len():
    model = get_model("gpt", num_classes=256, max_len=8)
    with pytest.raises(ValueError, match="max_len"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 9), jnp.int32))


def test_cnn1d_accepts_unbatched_channel_axis():
    model, variables, x = _init("cnn1d")
    apply = jax.jit(model.apply)
    np.testing.assert_allclose(apply(variables, x[..., 0]), apply(variables, x), rtol=1e-6)


def test_resnet_other_image_sizes_and_group_check():
    model = get_model("resnet", num_classes=3, widths=[8, 16, 32], norm_groups=2)
    assert model.widths == (8, 16, 32)  # lists from configs become tuples
    x = jnp.ones((2, 16, 16, 3))
    key = jax.random.key(0)
    # eval_shape traces without compiling: shapes and trace-time checks only.
    assert jax.eval_shape(lambda: model.apply(model.init(key, x), x)).shape == (2, 3)
    with pytest.raises(ValueError, match="norm_groups"):
        jax.eval_shape(get_model("resnet", num_classes=3, widths=(6,)).init, key, x)


def test_get_model_errors():
    with pytest.raises(ValueError, match="mlp.*cnn1d.*resnet.*gpt.*bert"):
        get_model("vit", num_classes=10)
    with pytest.raises(TypeError, match="hidden_units"):
        get_model("mlp", num_classes=10, hidden_units=(4,))
    with pytest.raises(TypeError, match="vocab_size"):
        get_model("gpt", num_classes=256, vocab_size=128)  # gpt's vocab is num_classes
    assert "d_model" in model_fields("bert") and "num_classes" in model_fields("gpt")


@pytest.mark.parametrize("causal", [True, False])
def test_attention_padding_mask_equals_the_unpadded_sequence(causal):
    attn = SelfAttention(num_heads=2, causal=causal)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(1, 6, 8)), jnp.float32)
    params = _filled_params(attn, x)
    mask = jnp.asarray([[1, 1, 1, 1, 0, 0]])
    apply = jax.jit(attn.apply)  # one compile per shape, not one per op
    padded = apply(params, x.at[:, 4:].set(100.0), mask)  # padding content is ignored
    np.testing.assert_allclose(padded[:, :4], apply(params, x[:, :4]), rtol=1e-5, atol=1e-6)


def test_mlp_layer_norm_and_identity_activation():
  x = jax.random.normal(jax.random.key(0), (4, 6))
  model = get_model("mlp", num_classes=3, features=(5,), layer_norm=True, activation="identity")
  variables = jax.jit(model.init)(jax.random.key(1), x)  # one compile, not one per op
  assert set(variables["params"]) == {"dense_0", "norm_0", "head"}
  # identity activation: the whole network is affine in the LayerNorm's output.
  p = variables["params"]
  h = x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"][None]
  h = (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-6)
  h = h * p["norm_0"]["scale"][None] + p["norm_0"]["bias"][None]
  expected = h @ p["head"]["kernel"] + p["head"]["bias"][None]
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x), expected, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="activation 'tanh'"):
    get_model("mlp", num_classes=3, activation="tanh").init(jax.random.key(1), x)
