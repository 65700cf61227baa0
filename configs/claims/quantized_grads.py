r"""Claim 7, quantized gradients: 8-bit gradients train like float ones; at 6 and 4 bits
round-to-nearest stalls while stochastic rounding keeps training.

  Citation: Gupta et al. 2015, "Deep Learning with Limited Numerical Precision" (fixed
    point with stochastic rounding trains, round-to-nearest fails at low widths);
    Zhou et al. 2016, "DoReFa-Net" (low-bit gradients with stochastic quantization).
  Command:
    python -m experiments.sweep --config=configs/claims/quantized_grads.py \
        --workdir=runs/claims/quantized_grads --parallel=2; \
    python -m experiments.report --workdir=runs/claims/quantized_grads --x=config_arg \
        --series=
  Expected: g8 (either rounding) within ~1 point of float grads; g4-stochastic above
    g4-nearest. Not yet measured.
  Runtime (estimate): 21 quantized runs at 2000 steps x ~55 s (the backward dots are
    quantized too) = ~1155 s, ~10 min at --parallel=2 on a 2-core CPU.

Variants (`config_arg`): float_grads (W4A4, backward in float) and gB-ROUNDING for
B in {8, 6, 4} and ROUNDING in {nearest, stochastic}: the swept layers' backward
contractions (d activations and d weights) take the incoming gradient quantized to
B-bit per-tensor integers. First conv and head: W8A8, float gradients. x seeds 0/1/2.
"""

from configs.claims import common
from experiments.training.schema import quant_spec

GRAD_BITS = (8, 6, 4)
ROUNDINGS = ("nearest", "stochastic")
VARIANTS = ("float_grads", *(f"g{b}-{r}" for b in GRAD_BITS for r in ROUNDINGS))


def get_config(arg=None):
  arg = arg or "float_grads"
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r}; choose one of {list(VARIANTS)}")
  grad = None
  if arg != "float_grads":
    bits, rounding = arg[1:].split("-")
    grad = quant_spec(format="int", bits=int(bits), symmetric=True, granularity="tensor",
                      calibration="absmax", rounding=rounding, ste="identity")
  config = common.cnn_config(2000)
  config.quant.rules = [*common.edge_rules(config.quant),
                        common.swept_rule(config.quant, grad=grad)]
  return config


def get_sweep(arg=None):
  del arg
  return common.with_seeds([{"config_arg": v, **common.header(4)} for v in VARIANTS])
