"""Regression: serving uses the learned activation clip (PACT α) / step (LSQ) of QAT."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

import jaxquant as jq


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3,), name="conv")(x)).reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(16, name="fc")(x))
    x = nn.Einsum((16, 8), "bi,io->bo", name="ein")(x)
    return nn.Dense(4, name="head")(x)


_ACTS = {
    "pact": jq.QuantSpec(bits=2, ste="pact", symmetric=False, granularity="tensor"),
    "lsq": jq.QuantSpec(bits=3, ste="lsq", granularity="tensor"),
    "lsq_unsigned": jq.QuantSpec(bits=4, ste="lsq", symmetric=False, granularity="tensor"),
}


def _cases():
  """act × mode; the default run keeps every act once with the mode alternating (both
  modes reached), the other mode of each is slow."""
  for i, (name, act) in enumerate(_ACTS.items()):
    for j, mode in enumerate(["int", "fake"]):
      yield pytest.param(mode, act, id=f"{name}-{mode}",
                         marks=() if i % 2 == j else pytest.mark.slow)


@pytest.mark.parametrize("mode, act", list(_cases()))
def test_serving_forward_uses_learned_activation_scale(mode, act):
  x = jax.random.normal(jax.random.key(0, impl="unsafe_rbg"), (4, 10, 1))  # fast compile
  rules = [jq.Rule(".*", weight=jq.QuantSpec(bits=2, ste="lsq"), act=act, mode=mode)]
  qmodel = jq.quantize_model(_Net(), rules)
  variables = qmodel.init(jax.random.key(1, impl="unsafe_rbg"), x)
  # Move the learned quantities away from their data-derived init, so a serving path
  # that ignored them (recalibrating dynamically) would give different outputs.
  variables = {**variables, "quant": jax.tree.map(lambda a: a * 0.5, variables["quant"])}
  assert "act_" + act.ste in variables["quant"]["fc"]
  y = qmodel.apply(variables, x)
  serving_model, serving_vars = jq.convert(qmodel, variables)
  assert jnp.array_equal(serving_model.apply(serving_vars, x), y)
