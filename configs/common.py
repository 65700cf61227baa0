"""Quantization-spec presets that the pretrained-model recipes (configs/minilm_ptq.py,
configs/smollm2.py) share, in the config schema's dialect."""
from experiments.training.schema import quant_spec


def w8():
  """int8 per-channel symmetric absmax weights (QuantSpec defaults)."""
  return quant_spec(bits=8)


def a_token(bits=8):
  """`bits`-bit activations, one dynamic scale per token."""
  return quant_spec(bits=bits, granularity="channel", static=False)


def a8_token():
  """int8 activations, one dynamic scale per token."""
  return a_token(8)


def a8_static():
  """int8 activations, one calibrated static (absmax) range per tensor."""
  return quant_spec(bits=8, granularity="tensor", static=True)
