r"""Quickstart: accuracy vs bits on MNIST-1D, 5 settings x 3 seeds in ~8 minutes.

  python -m experiments.sweep --config=configs/quickstart.py --workdir=/tmp/jq/quickstart --parallel=2
  python -m experiments.report --workdir=/tmp/jq/quickstart
  Expected (test_accuracy, mean of seeds 0/1/2; serving model identical):
    float 0.942, W8A8 0.947, W4A4 0.949, W2A2 0.883, binary (W1A8) 0.913
  Runtime: 486 s for the 15 runs with --parallel=2 on a 2-core CPU that other jobs
    shared (load ~6); float runs ~32 s and quantized ~55-90 s each there. Alone on an
    idle machine a float run takes ~8 s.

One point alone:
  python -m experiments.train --config=configs/quickstart.py --workdir=/tmp/jq/qs/w4a4_s0 \
      --config.quant.bits=4 --config.seed=0

`get_sweep()` is the grid: (float, W8A8, W4A4, W2A2, binary) x seeds (0, 1, 2), as
override dicts. Reports read `config.quant.bits` from summary.json as the x axis
(binary is 1 bit; its activations stay at 8 bits through quant.act_bits).
"""

from configs import mnist1d_cnn

SEEDS = (0, 1, 2)


def _setting(bits, fmt, act_bits, weight_ste):
  return {"quant.bits": bits, "quant.format": fmt, "quant.act_bits": act_bits,
          "quant.weight_ste": weight_ste}


# variant -> quant header overrides, every field spelled out so each point is explicit.
SETTINGS = {
    "float": _setting(32, "int", 32, "lsq"),
    "w8a8": _setting(8, "int", 8, "lsq"),
    "w4a4": _setting(4, "int", 4, "lsq"),
    "w2a2": _setting(2, "int", 2, "lsq"),
    "binary": _setting(1, "binary", 8, "identity"),  # LSQ is int-only
}


def get_config():
  config = mnist1d_cnn.get_config("float")
  config.num_steps = 4000  # ~0.5 points below mnist1d_cnn's 6000 steps, 2/3 of the time
  config.eval_every = 0
  config.checkpoint_every = 0
  config.progress = False  # many runs in parallel: keep their stderr quiet
  return config


def get_sweep():
  """The 15 points, each a dict of `--config.<key>=<value>` overrides."""
  return [{**overrides, "seed": seed}
          for overrides in SETTINGS.values() for seed in SEEDS]
