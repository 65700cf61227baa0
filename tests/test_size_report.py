"""size_report counts what it is handed or refuses it: a Linen variables dict, its
'params' alone, an nnx.State or nnx.Module; never a silent 0 bytes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxquant as jq


def _bytes(tree):
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def test_variables_and_their_params_count_the_same():
  model = nn.Sequential([nn.Dense(5), nn.BatchNorm(use_running_average=True)])
  v = model.init(jax.random.key(0), jnp.ones((2, 3)))
  expected = _bytes(v["params"])  # batch_stats are not parameters
  assert jq.size_report(v).total_float_bytes == expected
  assert jq.size_report(v["params"]).total_float_bytes == expected
  qmodel = jq.quantize_model(nn.Dense(5), [jq.Rule(".*", weight=jq.QuantSpec(bits=8))])
  _, served = jq.convert(qmodel, qmodel.init(jax.random.key(0), jnp.ones((2, 3))))
  row = jq.size_report(served["params"]).layer("kernel")
  assert (row.float_bytes, row.quantized_bytes) == (3 * 5 * 4, 3 * 5 + 5 * 4)  # codes, scales


class NnxNet(nnx.Module):
  def __init__(self):
    self.linear = nnx.Linear(4, 3, rngs=nnx.Rngs(0))
    self.norm = nnx.BatchNorm(3, rngs=nnx.Rngs(0))
    self.drop = nnx.Dropout(0.1, rngs=nnx.Rngs(1))  # holds a PRNG key: not a parameter


def test_nnx_state_counts_its_params():
  net = NnxNet()
  expected = 4 * (4 * 3 + 3 + 3 + 3)  # kernel, bias, BatchNorm scale and bias
  assert jq.size_report(nnx.state(net)).total_float_bytes == expected
  assert jq.size_report(net).total_float_bytes == expected


@pytest.mark.parametrize("bad, match", [
    ({"batch_stats": {"mean": jnp.ones(3)}}, "no 'params'"),
    ({"params": {}}, "no parameter"),
    (jnp.ones(3), "got ArrayImpl"),
    ({"params": {"w": "1.0"}}, "'w' is a str"),
])
def test_what_it_does_not_understand_is_refused(bad, match):
  with pytest.raises(ValueError, match=match):
    jq.size_report(bad)
