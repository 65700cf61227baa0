r"""Claim 11, a byte-level GPT on Python standard-library source: W8A8 matches float
in bits per byte; W4A4 costs a little.

  Citation: Dettmers et al. 2022, "LLM.int8()" and Xiao et al. 2023, "SmoothQuant"
    (8-bit weights and activations keep language-model quality; 4-bit activations are
    where it breaks down, because of outlier features).
  Command:
    python -m experiments.sweep --config=configs/claims/gpt_bytes.py \
        --workdir=runs/claims/gpt_bytes --parallel=2; \
    python -m experiments.report --workdir=runs/claims/gpt_bytes --x=bits
  Expected: test_bits_per_byte (lower is better): W8A8 within ~0.02 of float (float
    seed 0 measured 2.23 at this schedule); W4A4 above both. Not yet measured.
  Runtime (estimate): 9 runs at 1000 steps: 3 float x ~90 s (measured) + 6 quantized x
    ~180 s (unmeasured: a 20-step W8A8 run took 63 s, mostly compile) = ~1350 s,
    ~11 min at --parallel=2 on a 2-core CPU.

Grid: float, W8A8, W4A4 (configs/pytext_gpt.py: block_0's q/k/v projections and the
head at W8A8, every other Dense at the sweep's bits, LSQ weights) x seeds 0/1/2.
"""

from configs import pytext_gpt
from configs.claims import common


def get_config(arg=None):
  del arg
  config = pytext_gpt.get_config()
  config.eval_every = 0
  config.checkpoint_every = 0
  config.progress = False
  return config


def get_sweep(arg=None):
  del arg
  return common.with_seeds([common.FLOAT, common.header(8), common.header(4)])
