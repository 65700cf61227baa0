r"""Byte-level GPT on the pytext corpus (standard-library Python sources); float default.

  python -m experiments.train --config=configs/pytext_gpt.py --workdir=/tmp/jq/pytext_gpt
  Expected: test_bits_per_byte 2.23 (seed 0; token accuracy 0.60)
  Runtime: ~90 s on a 2-core CPU (jit compile included)

Quantized variants as in mnist1d_cnn.py: `--config=configs/pytext_gpt.py:w8a8`
(block_0's q/k/v projections and the head stay at W8A8; every other Dense follows
quant.bits; embeddings stay float). Quantized variants are not timed yet: a 20-step
w8a8 run took 63 s, mostly compilation.
"""

from configs import base, mnist1d_cnn


def get_config(arg=None):
  config = base.get_config()
  config.dataset.name = "pytext"
  config.dataset.seq_len = 64
  config.model.name = "gpt"
  config.model.kwargs.d_model = 64
  config.model.kwargs.num_heads = 4
  config.model.kwargs.num_layers = 2
  config.model.kwargs.max_len = 64
  config.optimizer.lr = 3e-3
  config.optimizer.weight_decay = 0.1
  config.optimizer.b2 = 0.98
  config.optimizer.warmup_steps = 100
  config.optimizer.grad_clip_norm = 1.0
  config.batch_size = 32
  config.num_steps = 1000
  config.log_every = 100
  config.eval_every = 500
  config.checkpoint_every = 500
  # Embeddings are lookups (no rule applies); the first contraction reading them is
  # block_0's attention projections.
  config.quant.rules = base.standard_rules(config.quant, first="block_0/attn/(query|key|value)",
                                           last="head")
  return mnist1d_cnn.set_quant(config, arg or "float")
