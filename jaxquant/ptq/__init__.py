"""Post-training quantization algorithms on plain arrays: GPTQ, AWQ, SmoothQuant.

Each takes a layer's weight [K, N] (rows = input features) and calibration statistics of
its inputs (`stats`: XᵀX, per-channel mean and max |x|) and returns arrays: no Flax here.

  gptq.gptq(w, H, spec)                     -> GPTQResult (codes on the spec's grid)
  awq.awq_search(w, XᵀX, mean|x|, spec)     -> AWQResult (input scale s, codes of diag(s) W)
  smoothquant.smoothquant_scales(max|x|, w) -> s
  fold.{scale_rows, into_layernorm, into_columns}: where s and 1/s go
  stats.{init, update, hessian, mean_abs, output_error}: the statistics themselves
"""
from jaxquant.ptq import awq, fold, gptq, smoothquant, stats
