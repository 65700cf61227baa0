r"""Claim 2, the four ways to quantize: weight-only keeps accuracy longest, activations
are the harder operand, both together cost the sum, binary weights depend on the
activation width.

  Citation: Krishnamoorthi 2018, "Quantizing deep convolutional networks for efficient
    inference: A whitepaper", sec. 3-4 (weight-only vs weight+activation; activations at
    low bits are the sensitive operand); Rastegari et al. 2016 (XNOR-Net) for binary
    weights with wider activations.
  Command:
    python -m experiments.sweep --config=configs/claims/four_ways.py \
        --workdir=runs/claims/four_ways --parallel=2; \
    python -m experiments.report --workdir=runs/claims/four_ways \
        --x=quant.act_bits --series=config_arg
  Expected: at 8 bits all four within ~1 point of float; at 2 bits weight-only best,
    both worst among int; binary weights with A8 above binary with A2. Not yet measured.
  Runtime (estimate): 39 runs at 2000 steps: 36 quantized x ~45 s + 3 float x ~15 s
    = ~1665 s, ~14 min at --parallel=2 on a 2-core CPU.

Variants (`--config=configs/claims/four_ways.py:ARG`, the sweep's `config_arg`):
  both            W=A=b on the swept layers, first conv and head at W8A8
  weight_only     Wb, activations float everywhere (first/head W8 only)
  act_only        Ab, weights float everywhere (first/head A8 only)
  binary          binary weights (sign x per-channel scale, straight-through) with
                  activations at b; first/head W8A8
b in {8, 4, 2} is `quant.act_bits` in every variant (the plot's x), plus a float
baseline (`quant.bits=32`), x seeds 0/1/2.
"""

from configs.claims import common

VARIANTS = ("both", "weight_only", "act_only", "binary")
LEVELS = (8, 4, 2)


def get_config(arg=None):
  arg = arg or "both"
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r}; choose one of {list(VARIANTS)}")
  config = common.cnn_config(2000)
  weight, act = arg != "act_only", arg != "weight_only"
  config.quant.rules = [*common.edge_rules(config.quant, weight=weight, act=act),
                        common.swept_rule(config.quant, weight=weight, act=act)]
  return config


def _header(variant, b):
  if variant == "binary":
    return common.header(1, act_bits=b, fmt="binary")
  return common.header(b)  # weight_only / act_only ignore the other operand's bits


def get_sweep(arg=None):
  del arg
  settings = [{"config_arg": "both", **common.FLOAT}]
  settings += [{"config_arg": v, **_header(v, b)} for v in VARIANTS for b in LEVELS]
  return common.with_seeds(settings)
