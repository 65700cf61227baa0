r"""MNIST-1D with the paper's CNN (Greydanus 2020): float baseline and QAT variants.

  python -m experiments.train --config=configs/mnist1d_cnn.py --workdir=/tmp/jq/mnist1d_cnn
  Expected: test_accuracy ~0.945 (paper CNN: ~94%); seeds 0/1/2 gave 0.949/0.945/0.940
  Runtime: ~8-15 s on a 2-core CPU (float; 8 s measured on an idle machine, compile included)

Variants (`--config=configs/mnist1d_cnn.py:ARG`), first conv and head kept at W8A8:
  float (default)  no quantization (quant.bits=32)
  w8a8, w4a4, w2a2 int weights (per channel, LSQ) and activations (per tensor, 99th
                   percentile range) at 8/4/2 bits
  binary           binary weights (sign * scale per channel, straight-through), 8-bit
                   activations
  ptq_w8a8, ptq_w4a4  post-training quantization: train the float model, then
                   calibrate static activation ranges on 8 training batches and round
                   the weights (per channel, absmax) to nearest (ptq.enabled); the same
                   rules as w8a8 / w4a4 without LSQ
Any variant's bits can be swept from the command line: --config.quant.bits=3.

`get_sweep`: seeds 0, 1, 2 of the variant, e.g. on a SLURM cluster, each seed one
2-process run:
  python -m experiments.sweep --config=configs/mnist1d_cnn.py:w8a8 --workdir=runs/w8a8 \
      --launcher=slurm --slurm_ntasks_per_point=2
"""

from configs import base
from experiments import sweeps

VARIANTS = ("float", "w8a8", "w4a4", "w2a2", "binary", "ptq_w8a8", "ptq_w4a4")

# quant header overrides of each variant: (bits, format, act_bits or None = follow bits,
# weight_ste)
_QUANT = {
    "float": (32, "int", None, "lsq"),
    "w8a8": (8, "int", None, "lsq"),
    "w4a4": (4, "int", None, "lsq"),
    "w2a2": (2, "int", None, "lsq"),
    "binary": (1, "binary", 8, "identity"),
    "ptq_w8a8": (8, "int", None, "identity"),
    "ptq_w4a4": (4, "int", None, "identity"),
}


def set_quant(config, variant):
  """Sets the quant header fields of `config` for one of VARIANTS."""
  if variant not in _QUANT:
    raise ValueError(f"unknown variant {variant!r}; choose one of {list(VARIANTS)}")
  bits, fmt, act_bits, weight_ste = _QUANT[variant]
  config.quant.bits = bits
  config.quant.format = fmt
  config.quant.weight_ste = weight_ste
  if act_bits is not None:
    config.quant.act_bits = act_bits
  config.ptq.enabled = variant.startswith("ptq_")
  return config


def get_config(arg=None):
  config = base.get_config()
  config.dataset.name = "mnist1d"
  config.model.name = "cnn1d"  # 3 x conv(25 ch, stride 2) + dense; paths conv_0..2, head
  # Small batches, AdamW decay 0.1 and a cosine schedule: +1-2 points over the paper's
  # constant-lr Adam on 100-example batches at the same ~6k steps.
  config.optimizer.name = "adamw"
  config.optimizer.lr = 1e-2
  config.optimizer.weight_decay = 0.1
  config.optimizer.schedule = "cosine"
  config.batch_size = 32
  config.num_steps = 6000
  config.log_every = 500
  config.eval_every = 2000
  config.checkpoint_every = 2000
  config.quant.rules = base.standard_rules(config.quant, first="conv_0", last="head")
  return set_quant(config, arg or "float")


def get_sweep(arg=None):
  """Seeds 0-2 of the variant ARG (the config's own argument)."""
  del arg
  return sweeps.axis("seed", range(3))
