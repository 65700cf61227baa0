"""What the claim recipes share: seeds, the MNIST-1D CNN base, and rules by kind.

Every claim runs >= 3 seeds (SEEDS). The base is the quickstart's MNIST-1D CNN
(configs/quickstart.py: first conv and head at W8A8 unless a claim says otherwise)
with a claim-chosen number of steps, so that each sweep fits ~15 min at --parallel=2
on a 2-core CPU. Estimates use the quickstart's measured times at 4000 steps (float
~23 s, quantized ~70 s per run, compile included) scaled as ~20 s of compile plus the
steps: quantized ~45 s at 2000 steps, ~32 s at 1000; float ~15 s at 2000.
"""

from configs import base, quickstart
from experiments import sweeps
from experiments.training.schema import quant_rule

SEEDS = (0, 1, 2)
FIRST, LAST = "conv_0", "head"


def cnn_config(num_steps: int):
  """The quickstart config (float) with `num_steps` steps."""
  config = quickstart.get_config()
  config.num_steps = num_steps
  return config


def swept_rule(quant, pattern=".*", *, weight=True, act=True, act_symmetric=False,
               weight_ste=None, act_ste="clipped", grad=None):
  """A rule following the quant header: weights quant.bits / .format / .weight_ste,
  activations quant.act_bits (99th-percentile range); weight=False / act=False keep
  that operand float."""
  w = base.weight_spec(quant.get_ref("bits"), format=quant.get_ref("format"),
                       ste=weight_ste or quant.get_ref("weight_ste"),
                       granularity=quant.get_ref("weight_granularity")) if weight else None
  a = None
  if act:
    a = base.act_spec(quant.get_ref("act_bits"), symmetric=act_symmetric,
                      calibration=quant.get_ref("act_calibration"), ste=act_ste)
  return quant_rule(pattern, weight=w, act=a, grad=grad, mode=quant.get_ref("mode"))


def edge_rules(quant, *, weight=True, act=True):
  """First conv and head at 8 bits on the operands the claim quantizes."""
  w8 = base.weight_spec(8) if weight else None
  return [quant_rule(FIRST, weight=w8, act=base.act_spec(8, symmetric=True) if act else None,
                     mode=quant.get_ref("mode")),
          quant_rule(LAST, weight=w8, act=base.act_spec(8) if act else None,
                     mode=quant.get_ref("mode"))]


def header(bits, *, act_bits=None, fmt="int", weight_ste="lsq"):
  """Overrides of the quant header: int weights at `bits` (LSQ), activations at
  `act_bits` (default: `bits`); binary weights use the identity STE (LSQ is int-only)."""
  if fmt == "binary":
    weight_ste = "identity"
  return {"quant.bits": bits, "quant.format": fmt,
          "quant.act_bits": bits if act_bits is None else act_bits,
          "quant.weight_ste": weight_ste}


FLOAT = header(32)


def with_seeds(settings):
  """Each setting (a dict of overrides) at every seed."""
  return sweeps.product(list(settings), sweeps.axis("seed", SEEDS))
