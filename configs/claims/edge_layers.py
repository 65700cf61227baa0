r"""Claim 5, first and last layer: keeping them at 8 bits recovers much of the low-bit
loss; quantizing them like the rest costs the most at 2 bits and binary.

  Citation: Zhou et al. 2016, "DoReFa-Net" sec. 2.6 and Rastegari et al. 2016,
    "XNOR-Net" (first and last layer kept in higher precision); Esser et al. 2019
    ("LSQ", first and last layer at 8 bits).
  Command:
    python -m experiments.sweep --config=configs/claims/edge_layers.py \
        --workdir=runs/claims/edge_layers --parallel=2; \
    python -m experiments.report --workdir=runs/claims/edge_layers --x=bits \
        --series=config_arg
  Expected: edges8 above same at W2A2 and at binary W1A8. Measured (RESULTS.md): W2A2
    0.895 vs 0.578, binary W1A8 0.911 vs 0.751.
  Runtime (estimate): 12 quantized runs at 4000 steps x ~70 s = ~840 s, ~7 min at
    --parallel=2 on a 2-core CPU.

Variants (`config_arg`): edges8 (first conv and head at W8A8, the rest at the sweep's
bits) and same (first conv and head quantized like the rest; the first conv's
activations symmetric, as its input is signed). Levels: W2A2 (LSQ) and binary
W1A8, x seeds 0/1/2.
"""

from configs.claims import common

VARIANTS = ("edges8", "same")


def get_config(arg=None):
  arg = arg or "edges8"
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r}; choose one of {list(VARIANTS)}")
  config = common.cnn_config(4000)
  q = config.quant
  if arg == "edges8":
    config.quant.rules = [*common.edge_rules(q), common.swept_rule(q)]
  else:
    config.quant.rules = [common.swept_rule(q, common.FIRST, act_symmetric=True),
                          common.swept_rule(q)]
  return config


def get_sweep(arg=None):
  del arg
  levels = [common.header(2), common.header(1, act_bits=8, fmt="binary")]
  return common.with_seeds([{"config_arg": v, **h} for v in VARIANTS for h in levels])
