"""Post-training quantization algorithms on plain arrays: GPTQ, AWQ, SmoothQuant.

Each takes a layer's weight [K, N] (rows = input features) and calibration statistics of
its inputs (`stats`: XᵀX, per-channel mean and max |x|) and returns arrays: no Flax here.
"""
from jaxquant.ptq import gptq, stats
