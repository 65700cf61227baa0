r"""Claim 3, PTQ against QAT: post-training quantization with one scale per tensor
collapses at low bit widths, one scale per output channel rescues much of it, and
quantization-aware training is best; crossed with the activation range estimator.

  Citation: Krishnamoorthi 2018, "Quantizing deep convolutional networks for efficient
    inference: A whitepaper", sec. 3.1-3.2 and Tables 2-5 (per-layer PTQ of weights
    fails at 4 bits on several nets, per-channel recovers most of it, QAT closes the
    rest); calibration by min/max, percentile or MSE clipping as in sec. 3.4 / Migacz
    2017 (TensorRT's entropy / percentile calibration).
  Command:
    python -m experiments.sweep --config=configs/claims/ptq_vs_qat.py \
        --workdir=runs/claims/ptq_vs_qat --parallel=2; \
    python -m experiments.report --workdir=runs/claims/ptq_vs_qat \
        --metric=serving_test_accuracy --x=bits \
        --series=config_arg,quant.weight_granularity,quant.act_calibration
  Expected (the paper's shape): at 8 bits every PTQ setting within ~1 point of float;
    at 4 bits per-tensor PTQ well below per-channel PTQ; QAT above both; at 2 bits PTQ
    near chance and QAT far above it.
  Runtime (estimate): 69 runs at 1000 steps: 54 PTQ x ~25 s (float training ~10 s +
    calibrate / convert / evaluate) + 12 QAT x ~32 s + 3 float x ~15 s = ~1800 s,
    ~15 min at --parallel=2 on a 2-core CPU.

Variants (`--config=configs/claims/ptq_vs_qat.py:ARG`, the sweep's `config_arg`):
  ptq   train float for the schedule, then calibrate static activation ranges on 8
        training batches and round the weights to nearest (ptq.enabled); weights use
        plain absmax scales (no learned step)
  qat   quantization-aware training with LSQ weights and 99th-percentile activations
First conv and head stay at W8A8 in both. Swept: W=A=b bits (quant.bits) x weight
scales per tensor or per channel (quant.weight_granularity) x activation calibration
(quant.act_calibration: absmax, percentile, mse; PTQ only), x seeds 0/1/2; float
baseline. The metric is the converted serving model's test accuracy.
"""

from configs.claims import common

VARIANTS = ("ptq", "qat")
PTQ_BITS = (8, 4, 2)
QAT_BITS = (4, 2)  # QAT at 8 bits is float-level (claims/bit_ladder.py); not repeated
GRANULARITIES = ("tensor", "channel")
CALIBRATIONS = ("absmax", "percentile", "mse")
NUM_STEPS = 1000


def get_config(arg=None):
  arg = arg or "ptq"
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r}; choose one of {list(VARIANTS)}")
  config = common.cnn_config(NUM_STEPS)
  config.quant.rules = [*common.edge_rules(config.quant), common.swept_rule(config.quant)]
  if arg == "ptq":
    config.ptq.enabled = True
    config.quant.weight_ste = "identity"  # PTQ learns nothing
  return config


def get_sweep(arg=None):
  del arg
  settings = [{"config_arg": "ptq", **common.FLOAT}]
  settings += [{"config_arg": "ptq", **common.header(b, weight_ste="identity"),
                "quant.weight_granularity": g, "quant.act_calibration": c}
               for b in PTQ_BITS for g in GRANULARITIES for c in CALIBRATIONS]
  settings += [{"config_arg": "qat", **common.header(b), "quant.weight_granularity": g}
               for b in QAT_BITS for g in GRANULARITIES]
  return common.with_seeds(settings)
