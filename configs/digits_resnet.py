r"""8x8 scikit-learn digits with a small GroupNorm ResNet (float by default).

  python -m experiments.train --config=configs/digits_resnet.py --workdir=/tmp/jq/digits_resnet
  Expected: test_accuracy 0.989 (seed 0)
  Runtime: ~20-30 s on a 2-core CPU (jit compile included)

Quantized variants as in mnist1d_cnn.py: `--config=configs/digits_resnet.py:w4a4`
(stem and head stay at W8A8; every other conv follows quant.bits). Quantized variants
are not timed yet (a 20-step w4a4 run: 24 s, mostly compilation).
"""

from configs import base, mnist1d_cnn


def get_config(arg=None):
  config = base.get_config()
  config.dataset.name = "digits"
  config.model.name = "resnet"
  config.model.kwargs.widths = (16, 32)
  config.model.kwargs.blocks_per_stage = 1
  config.model.kwargs.norm_groups = 4
  config.optimizer.lr = 3e-3
  config.optimizer.weight_decay = 0.05
  config.optimizer.warmup_steps = 50
  config.batch_size = 64
  config.num_steps = 1500
  config.log_every = 100
  config.eval_every = 500
  config.checkpoint_every = 500
  config.quant.rules = base.standard_rules(config.quant, first="stem", last="head")
  return mnist1d_cnn.set_quant(config, arg or "float")
