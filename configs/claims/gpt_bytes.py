r"""Claim 11, a byte-level GPT on Python standard-library source: W8A8 matches float
in bits per byte; W4A4 costs a little. And post-training, weight-only: round to nearest
degrades sharply at 3 bits where GPTQ holds.

  Citation: Dettmers et al. 2022, "LLM.int8()" and Xiao et al. 2023, "SmoothQuant"
    (8-bit weights and activations keep language-model quality; 4-bit activations are
    where it breaks down, because of outlier features); Frantar et al. 2023, "GPTQ"
    (ICLR; Table 3: on OPT / BLOOM, per-row RTN at 4 bits loses a little perplexity and
    at 3 bits a lot, while GPTQ stays close to float at 4 bits and loses far less at 3).
  Command:
    python -m experiments.sweep --config=configs/claims/gpt_bytes.py \
        --workdir=runs/claims/gpt_bytes --parallel=2; \
    python -m experiments.report --workdir=runs/claims/gpt_bytes --x=bits \
        --metric=test_bits_per_byte --series=ptq.method
  Expected: test_bits_per_byte (lower is better): W8A8 within ~0.02 of float (float
    seed 0 measured 2.23 at this schedule); W4A4 above both. PTQ of the float runs,
    weights only: RTN W4 a little above float and W3 well above it; GPTQ below RTN at
    both, by more at 3 bits.
  Runtime: 9 training runs at 1000 steps (measured 105 s float, ~250 s quantized at
    --parallel=2) ~17 min, plus 12 PTQ runs (no training: calibrate on 8 batches,
    GPTQ, convert, evaluate; ~30-60 s each) ~5 min, on a 2-core CPU.

Variants (`--config=configs/claims/gpt_bytes.py:ARG`, the sweep's `config_arg`):
  qat   (default) configs/pytext_gpt.py: block_0's q/k/v projections and the head at
        W8A8, every other Dense at the sweep's bits, LSQ weights.
  ptq   post-training, weight-only: every Dense inside the blocks at quant.bits per
        output channel (embeddings and head float, as in the GPTQ paper), from the
        float run of the same seed (ptq.from_workdir = sweeps.ref(float point)),
        calibrated on 8 training batches; ptq.method 'rtn' (round to nearest) or 'gptq'.
Grid: float, W8A8, W4A4 (qat) x seeds 0/1/2; W4 / W3 weight-only x {RTN, GPTQ} (ptq)
x seeds 0/1/2.
"""

from configs import pytext_gpt
from configs.claims import common
from experiments import sweeps


VARIANTS = ("qat", "ptq")
PTQ_BITS = (4, 3)
PTQ_METHODS = ("rtn", "gptq")  # rtn: round to nearest


def get_config(arg=None):
  arg = arg or "qat"
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r}; choose one of {list(VARIANTS)}")
  config = pytext_gpt.get_config()
  config.eval_every = 0
  config.checkpoint_every = 0
  config.progress = False
  if arg == "ptq":
    config.ptq.enabled = True
    config.quant.rules = [common.swept_rule(config.quant, r"block_\d+/.*", act=False,
                                            weight_ste="identity")]
  return config


def get_sweep(arg=None):
  del arg
  points = common.with_seeds([common.FLOAT, common.header(8), common.header(4)])
  for seed in common.SEEDS:
    float_point = {**common.FLOAT, "seed": seed}
    for bits in PTQ_BITS:
      for method in PTQ_METHODS:
        points.append({"config_arg": "ptq", **common.header(bits, weight_ste="identity"),
                       "ptq.method": method, "ptq.from_workdir": sweeps.ref(float_point),
                       "seed": seed})
  return points
