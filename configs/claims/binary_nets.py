r"""Claim 6, binary networks: BinaryConnect's binary weights cost little on a small MLP
(deterministic vs stochastic binarization), and XNOR-Net's scale α matters against
plain sign.

  Citation: Courbariaux, Bengio & David 2015, "BinaryConnect" (Table 2: MNIST MLP test
    error 1.29% deterministic, 1.18% stochastic vs 1.30% float without regularizer);
    Rastegari et al. 2016, "XNOR-Net" (Table 1/2: BWN with α vs BinaryConnect's plain
    sign on ImageNet, 56.8% vs 35.4% top-1); Hubara et al. 2016, "Binarized Neural
    Networks" (binary weights and activations).
  Command:
    python -m experiments.sweep --config=configs/claims/binary_nets.py \
        --workdir=runs/claims/binary_nets --parallel=2; \
    python -m experiments.report --workdir=runs/claims/binary_nets --x=config_arg \
        --series=model.name
  Expected: mlp_bc_det and mlp_bc_stoch within ~1 point of mlp_float (the paper's
    MNIST gap is 0.1 points); cnn_xnor above cnn_sign; ln_bnn within ~1 point of
    ln_bw_a8 (BNN Table 1: MNIST 0.96% error with binary weights and activations, vs
    BinaryConnect's 1.29% with binary weights only).
  Runtime (estimate): 27 runs: 18 digits-MLP runs x ~15-40 s + 9 CNN runs x ~45 s
    (2000 steps) = ~900 s, ~8 min at --parallel=2 on a 2-core CPU.

Variants (`config_arg`):
  mlp_float      the MLP (64 -> 256 -> 256 -> 10) on the 8x8 digits, float
  mlp_bc_det     every Dense's weights binarized (BinaryConnect deterministic: sign),
                 clipped straight-through; activations float
  mlp_bc_stoch   the same with stochastic binarization: +1 with probability
                 clip((w/α + 1)/2, 0, 1) (BinaryConnect stochastic); its QAT model
                 (test_accuracy) draws at evaluation too, the serving model
                 (serving_test_accuracy) uses the deterministic sign
                 Both keep a per-output-channel scale α = mean|w|: BinaryConnect's MLP
                 has batch norm after every layer, which absorbs any such constant;
                 ours has none, and with plain ±1 weights the stochastic variant
                 diverged in a trial run (loss ~190, test accuracy 0.13; deterministic
                 0.975), so α stands in for the missing normalization.
  cnn_float      the quickstart MNIST-1D CNN, float, 2000 steps
  cnn_xnor       binary weights times α = mean|w| per output channel (XNOR-Net's BWN) on
                 the middle convs, 8-bit activations; first conv and head at W8A8
  cnn_sign       the same weights without α (plain sign)
  ln_float       the digits MLP with a LayerNorm after each hidden Dense, float
  ln_bw_a8       that MLP with binary weights (α per channel, as mlp_bc_det) and 8-bit
                 activations after the ReLU on dense_1 and the head; dense_0 sees float
                 pixels
  ln_bnn         BNN (Hubara et al. 2016): the same binary weights, and the inputs of
                 dense_1 and the head binarized to ±1 (sign, unscaled) in place of the
                 ReLU (model activation 'identity'); the LayerNorm keeps the
                 pre-activations near unit scale, where the clipped straight-through
                 gradient (|x| <= 1, the paper's Htanh) passes. BNN uses batch norm; this
                 model has LayerNorm, which needs no running statistics.
x seeds 0/1/2.
"""

from configs import base
from configs.claims import common
from experiments.training.schema import quant_rule, quant_spec

VARIANTS = ("mlp_float", "mlp_bc_det", "mlp_bc_stoch", "cnn_float", "cnn_xnor", "cnn_sign",
            "ln_float", "ln_bw_a8", "ln_bnn")
MLP_STEPS, CNN_STEPS = 3000, 2000


def _binary(scaled=True, rounding="nearest", granularity="channel"):
  return quant_spec(format="binary", scaled=scaled, rounding=rounding,
                    granularity=granularity, ste="clipped")


def _mlp_config():
  config = base.get_config()
  config.dataset.name = "digits"
  config.model.name = "mlp"
  config.model.kwargs.features = (256, 256)
  config.optimizer.lr = 1e-3
  config.batch_size = 64
  config.num_steps = MLP_STEPS
  config.log_every = 500
  return config


def _bnn_config(arg):
  """The digits MLP with a LayerNorm after each hidden Dense: float, binary weights with
  8-bit activations after ReLU, or BNN (binary weights, sign activations)."""
  config = _mlp_config()
  config.model.kwargs.layer_norm = True
  if arg == "ln_bnn":
    config.model.kwargs.activation = "identity"  # sign() of the next layer is the nonlinearity
  mode = config.quant.get_ref("mode")
  if arg == "ln_bw_a8":
    act = base.act_spec(8, calibration="percentile")
  elif arg == "ln_bnn":
    act = quant_spec(format="binary", scaled=False, ste="clipped", granularity="tensor")
  if arg != "ln_float":  # the first layer sees the pixels: binary weights, float inputs
    config.quant.rules = [quant_rule("dense_0", weight=_binary(), mode=mode),
                          quant_rule(".*", weight=_binary(), act=act, mode=mode)]
  return config


def get_config(arg=None):
  arg = arg or "cnn_xnor"
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r}; choose one of {list(VARIANTS)}")
  if arg.startswith("ln_"):
    config = _bnn_config(arg)
  elif arg.startswith("mlp"):
    config = _mlp_config()
    if arg != "mlp_float":
      rounding = "stochastic" if arg == "mlp_bc_stoch" else "nearest"
      config.quant.rules = [quant_rule(".*", weight=_binary(rounding=rounding),
                                       mode=config.quant.get_ref("mode"))]
  else:
    config = common.cnn_config(CNN_STEPS)
    q = config.quant
    act = base.act_spec(8, calibration="percentile")
    config.quant.rules = [*common.edge_rules(q),
                          quant_rule(".*", weight=_binary(scaled=arg != "cnn_sign"), act=act,
                                     mode=q.get_ref("mode"))]
  if not arg.endswith("float"):  # the header only switches the literal rules on
    config.quant.bits, config.quant.format, config.quant.act_bits = 1, "binary", 8
    config.quant.weight_ste = "clipped"
  return config


def get_sweep(arg=None):
  del arg
  return common.with_seeds([{"config_arg": v} for v in VARIANTS])
