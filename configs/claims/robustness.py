r"""Claim 9, robustness: is a quantized model more fragile than float under input noise
or weight perturbations at evaluation, or less?

  Citation: the overview this toolkit starts from claims robustness matters for
    quantized models; Lin, Gan & Han 2019 ("Defensive Quantization", ICLR) report that
    quantization can amplify input perturbations at low bit widths, and weight noise
    injection is the usual probe of how flat a quantized model's solution is.
  Commands (two sweeps: input noise, then weight noise):
    python -m experiments.sweep --config=configs/claims/robustness.py:input \
        --workdir=runs/claims/robustness_input --parallel=2; \
    python -m experiments.report --workdir=runs/claims/robustness_input \
        --metric=noisy_test_accuracy --x=input_noise_std --series=label
    python -m experiments.sweep --config=configs/claims/robustness.py:weight \
        --workdir=runs/claims/robustness_weight --parallel=2; \
    python -m experiments.report --workdir=runs/claims/robustness_weight \
        --metric=noisy_test_accuracy --x=weight_noise_std --series=label
  Expected: without noise W8A8 ≈ W4A4 ≈ float, W2A2 a few points lower. Under noise
    the open question is the slope: a quantized model whose activations are clipped to a
    calibrated range may absorb input noise better than float, while low-bit weights sit
    near decision thresholds of the rounding grid and may amplify weight noise.
  Runtime (estimate): input: 48 runs at 1000 steps (12 float x ~15 s, 36 quantized x
    ~32 s) = ~1330 s, ~11 min at --parallel=2; weight: 36 runs, ~8 min.

Every point trains the quickstart CNN (first conv and head at W8A8, LSQ weights,
99th-percentile activations) at W=A=b ∈ {float, 8, 4, 2} and evaluates it at the end
under the point's noise (`eval.input_noise_std`: Gaussian noise of σ times the training
inputs' std; `eval.weight_noise_std`: every kernel times 1 + σ·N(0, 1), applied before
its quantization), x seeds 0/1/2. Training is the same at every noise level of a
precision and seed (same seed, same steps); only the final evaluation differs.
"""

from configs.claims import common

SWEEPS = ("input", "weight")
PRECISIONS = (32, 8, 4, 2)
INPUT_NOISE = (0.0, 0.1, 0.25, 0.5)
WEIGHT_NOISE = (0.0, 0.1, 0.25)
NUM_STEPS = 1000


def get_config(arg=None):
  del arg  # one config; the sweeps differ in which noise they vary
  config = common.cnn_config(NUM_STEPS)
  config.quant.rules = [*common.edge_rules(config.quant), common.swept_rule(config.quant)]
  return config


def get_sweep(arg=None):
  arg = arg or "input"
  if arg not in SWEEPS:
    raise ValueError(f"unknown sweep {arg!r}; choose one of {list(SWEEPS)}")
  key, levels = (("eval.input_noise_std", INPUT_NOISE) if arg == "input"
                 else ("eval.weight_noise_std", WEIGHT_NOISE))
  settings = [{**common.header(b), key: s} for b in PRECISIONS for s in levels]
  return common.with_seeds(settings)
