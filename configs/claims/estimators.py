r"""Claim 4, gradient estimators at 2-4 bits: learned ranges (PACT, LSQ) beat the plain
and clipped straight-through estimators, and the gap widens as bits shrink.

  Citation: Bengio et al. 2013 (straight-through estimator); Choi et al. 2018, "PACT"
    (learned activation clip alpha, Fig. 3/Table 1); Esser et al. 2019, "LSQ" (learned
    step with gradient scale 1/sqrt(N*Q_P)).
  Command:
    python -m experiments.sweep --config=configs/claims/estimators.py \
        --workdir=runs/claims/estimators --parallel=2; \
    python -m experiments.report --workdir=runs/claims/estimators --x=bits \
        --series=config_arg
  Expected: at 4 bits all within ~1 point; at 2 bits pact and lsq above identity and
    clipped, and lsq above lsq_noscale (Esser et al. 2019, Table 3: without the
    gradient scale, 2-bit ResNet-18 loses accuracy or fails to converge).
  Runtime (estimate): 54 quantized runs at 1500 steps x ~38 s = ~2050 s, ~17 min at
    --parallel=2 on a 2-core CPU.

Variants (`config_arg`), on the swept layers (first conv and head stay W8A8):
  identity   weights and activations: plain straight-through (gradient 1 everywhere)
  clipped    weights and activations: straight-through, zero outside the clip range
  pact       activations: PACT's learned clip alpha; weights: clipped STE
  lsq        weights: LSQ (learned step, with its gradient scale); activations: clipped
             STE
  lsq_noscale  lsq without the step's gradient scale 1/sqrt(N*Q_P) (lsq_grad_scale=False)
  lsq_both   LSQ on the weights and Esser's unsigned LSQ on the activations (codes
             0 .. 2^b - 1 after the ReLU: symmetric=False with ste='lsq'), the paper's
             full recipe
x W=A bits in {4, 3, 2} x seeds 0/1/2.
"""

from configs.claims import common

# variant -> (weight ste, activation ste)
ESTIMATORS = {"identity": ("identity", "identity"), "clipped": ("clipped", "clipped"),
              "pact": ("clipped", "pact"), "lsq": ("lsq", "clipped"),
              "lsq_noscale": ("lsq", "clipped"), "lsq_both": ("lsq", "lsq")}
LEVELS = (4, 3, 2)


def get_config(arg=None):
  arg = arg or "lsq"
  if arg not in ESTIMATORS:
    raise ValueError(f"unknown variant {arg!r}; choose one of {list(ESTIMATORS)}")
  weight_ste, act_ste = ESTIMATORS[arg]
  config = common.cnn_config(1500)
  swept = common.swept_rule(config.quant, weight_ste=weight_ste, act_ste=act_ste)
  if arg == "lsq_noscale":
    swept.weight.lsq_grad_scale = False
  config.quant.rules = [*common.edge_rules(config.quant), swept]
  return config


def get_sweep(arg=None):
  del arg
  return common.with_seeds([{"config_arg": v, **common.header(b)}
                            for v in ESTIMATORS for b in LEVELS])
