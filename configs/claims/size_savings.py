r"""Claim 10, size savings: serving weights shrink by ~32/b for b-bit weights (minus
the per-channel scales and the first/last layer kept at 8 bits), at the accuracy the
other claims measure.

  Citation: Han et al. 2016, "Deep Compression" (storage vs bits); Krishnamoorthi 2018
    (4x smaller int8 weights).
  Command:
    python -m experiments.sweep --config=configs/claims/size_savings.py \
        --workdir=runs/claims/size_savings --parallel=2; \
    python -m experiments.report --workdir=runs/claims/size_savings --x=bits \
        --series=config_arg
  Expected: the report's "quantized bytes" and "float/quantized" columns: W8 ~4x, W4
    ~8x, W2 ~16x, binary ~32x on the swept layers, less for the whole model (first conv
    and head at 8 bits, scales, float biases). The byte counts are exact
    (summary.json param_bytes of the packed serving weights); compute savings (bit
    operations) are not counted yet (README.md).
  Runtime (estimate): 21 runs at 2000 steps: 18 quantized x ~45 s + 3 float x ~15 s =
    ~855 s, ~7 min at --parallel=2 on a 2-core CPU.

Settings: float, W8A8, W4A4, W2A2, binary W1A8 (config_arg both) and W4, W2
weight-only (config_arg weight_only; configs/claims/four_ways.py builds both), x seeds
0/1/2.
"""

from configs.claims import common, four_ways


def get_config(arg=None):
  return four_ways.get_config(arg)


def get_sweep(arg=None):
  del arg
  settings = [{"config_arg": "both", **h} for h in (
      common.FLOAT, common.header(8), common.header(4), common.header(2),
      common.header(1, act_bits=8, fmt="binary"))]
  settings += [{"config_arg": "weight_only", **common.header(b)} for b in (4, 2)]
  return common.with_seeds(settings)
