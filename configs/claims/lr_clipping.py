r"""Claim 8, learning rate and clipping in low-bit QAT: low-bit training wants a smaller
peak LR and a warmup + cosine schedule; global-norm clipping helps most at 2 bits.

  Citation: Esser et al. 2019 ("LSQ", cosine schedule, lower LR when fine-tuning at low
    bits); McKinstry et al. 2019, "Discovering Low-Precision Networks Close to
    Full-Precision Networks for Efficient Inference" (smaller LR, longer schedule for
    low-bit fine-tuning); Pascanu et al. 2013 (global-norm gradient clipping).
  Command:
    python -m experiments.sweep --config=configs/claims/lr_clipping.py \
        --workdir=runs/claims/lr_clipping --parallel=2; \
    python -m experiments.report --workdir=runs/claims/lr_clipping --x=lr \
        --series=quant.bits,schedule,grad_clip_norm
  Expected: warmup+cosine at or above constant at each LR; the best LR at 2 bits no
    larger than at 4 bits; clipping changes 4 bits little and 2 bits more. Not yet
    measured.
  Runtime (estimate): 54 quantized runs at 1000 steps x ~32 s = ~1730 s, ~14.5 min at
    --parallel=2 on a 2-core CPU.

Grid: W4A4 and W2A2 x {constant (no warmup), warmup 100 + cosine} x peak LR
{0.1, 0.3, 1, 3} x 1e-2, clipping off; plus clipping at global norm 1.0 with
warmup + cosine at LR 1e-2 for each bits; x seeds 0/1/2. 1000 steps (a quarter of the
quickstart's) so that the 54 runs fit.
"""

from configs.claims import common
from experiments import sweeps

BASE_LR = 1e-2
LR_SCALES = (0.1, 0.3, 1.0, 3.0)
SCHEDULES = ({"optimizer.schedule": "constant", "optimizer.warmup_steps": 0},
             {"optimizer.schedule": "cosine", "optimizer.warmup_steps": 100})


def get_config(arg=None):
  del arg
  return common.cnn_config(1000)


def get_sweep(arg=None):
  del arg
  bits = [common.header(b) for b in (4, 2)]
  lrs = sweeps.axis("optimizer.lr", [BASE_LR * s for s in LR_SCALES])
  no_clip = sweeps.axis("optimizer.grad_clip_norm", [0.0])
  grid = sweeps.product(bits, list(SCHEDULES), lrs, no_clip)
  clipped = sweeps.product(bits, [SCHEDULES[1]], sweeps.axis("optimizer.lr", [BASE_LR]),
                           sweeps.axis("optimizer.grad_clip_norm", [1.0]))
  return common.with_seeds(grid + clipped)
