r"""Claim 1, the bit ladder: with learned step sizes, W/A at 8 and 4 bits match float,
3 bits is close, 2 bits loses a few points, binary weights lose more.

  Citation: Esser et al. 2019, "Learned Step Size Quantization" (ICLR 2020), Table 1:
    ResNet-18 on ImageNet, W=A at 2/3/4/8 bits within a few points of (4 and 8 bits:
    at or above) the float baseline, first and last layer at 8 bits.
  Command:
    python -m experiments.sweep --config=configs/claims/bit_ladder.py \
        --workdir=runs/claims/bit_ladder --parallel=2; \
    python -m experiments.report --workdir=runs/claims/bit_ladder --x=bits
  Expected (the claim, transferred to MNIST-1D): W8A8, W6A6, W4A4 within ~1 point of
    float; W3A3 within ~2; W2A2 a few points below; binary W1A8 below W4A4. Not yet
    measured here; the quickstart (same schedule) measured float 0.942, W8A8 0.947,
    W4A4 0.949, W2A2 0.883, binary W1A8 0.913.
  Runtime (estimate): 21 runs, 4000 steps: 3 float x ~23 s + 18 quantized x ~70 s
    = ~1330 s of runs, ~11 min at --parallel=2 on a 2-core CPU.

Grid: W=A in {float, 8, 6, 4, 3, 2} plus binary weights with 8-bit activations
(W1A8), x seeds 0/1/2. Swept layers: LSQ weights, 99th-percentile activations; first
conv and head at W8A8 (as in the paper).
"""

from configs.claims import common

LEVELS = (8, 6, 4, 3, 2)


def get_config(arg=None):
  del arg
  return common.cnn_config(4000)


def get_sweep(arg=None):
  del arg
  settings = [common.FLOAT, *(common.header(b) for b in LEVELS),
              common.header(1, act_bits=8, fmt="binary")]
  return common.with_seeds(settings)
