r"""Base recipe: the schema's defaults, and the rule builders the other recipes share.

  python -m experiments.train --config=configs/base.py --workdir=/tmp/jq/base
  Expected: float MNIST-1D CNN, test_accuracy 0.874 (short schedule; mnist1d_cnn.py: 0.949)
  Runtime: ~10-20 s on a 2-core CPU (measured, jit compile included)

Every key, its meaning and its default are declared in experiments/training/schema.py
(the trainer validates configs against it); recipes start from `get_config()` here and
override. `standard_rules` is the recipes' shared quantization choice.

Specs have one spelling in configs: `schema.quant_spec(**QuantSpec fields)`.
`weight_spec` and `act_spec` are that call with the recipes' usual defaults filled in
(same field names; any field can be overridden), not a second dialect.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from experiments.training import schema
from experiments.training.schema import quant_rule, quant_spec

# The recipes' weight quantizer: symmetric absmax, one scale per output channel,
# straight-through gradients.
WEIGHT_DEFAULTS = {"format": "int", "symmetric": True, "granularity": "channel",
                   "calibration": "absmax", "ste": "identity"}
# The recipes' activation quantizer: per tensor, asymmetric (a zero point spends no level
# on the empty negative half after a ReLU), clipped STE; 'percentile' (when chosen) clips
# the top 1% of |x|, which low bit widths need.
ACT_DEFAULTS = {"format": "int", "symmetric": False, "granularity": "tensor",
                "calibration": "absmax", "percentile": 99.0, "ste": "clipped"}


def weight_spec(bits: Any, **fields: Any) -> ml_collections.ConfigDict:
  """`quant_spec(bits=bits, **fields)` over WEIGHT_DEFAULTS (QuantSpec field names)."""
  return quant_spec(**{**WEIGHT_DEFAULTS, "bits": bits, **fields})


def act_spec(bits: Any, **fields: Any) -> ml_collections.ConfigDict:
  """`quant_spec(bits=bits, **fields)` over ACT_DEFAULTS (QuantSpec field names)."""
  return quant_spec(**{**ACT_DEFAULTS, "bits": bits, **fields})


def standard_rules(quant: ml_collections.ConfigDict, *, first: str,
                   last: str) -> list[ml_collections.ConfigDict]:
  """First layer `first` and head `last` at W8A8; every other layer follows the sweep.

  The swept layers use LSQ weights (quant.weight_ste, per quant.weight_granularity) and
  99th-percentile activation ranges (quant.act_calibration): on the MNIST-1D CNN at W2A2 that is 0.89 test accuracy against 0.54 for
  absmax ranges with plain straight-through weights (W8A8/W4A4 unchanged, ~0.94).

  Args:
    quant: the config's `quant` section (its header fields are referenced, so
      --config.quant.bits / .format / .act_bits / .mode retarget the third rule).
    first, last: regexes of the first and last layer paths.
  """
  mode = quant.get_ref("mode")
  return [
      quant_rule(first, weight=weight_spec(8), act=act_spec(8, symmetric=True), mode=mode),
      quant_rule(last, weight=weight_spec(8), act=act_spec(8), mode=mode),
      quant_rule(".*", weight=weight_spec(quant.get_ref("bits"), format=quant.get_ref("format"),
                                          ste=quant.get_ref("weight_ste"),
                                          granularity=quant.get_ref("weight_granularity")),
                 act=act_spec(quant.get_ref("act_bits"),
                              calibration=quant.get_ref("act_calibration")),
                 mode=mode),
  ]


def get_config() -> ml_collections.ConfigDict:
  """The schema's defaults: a short float MNIST-1D CNN run."""
  return schema.get_config()
