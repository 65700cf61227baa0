"""Sweeps: declare a grid of config overrides beside a config, run it, keep the books.

Declaring a sweep. A config file `configs/<recipe>.py` may define, next to
`get_config(arg=None)`, a `get_sweep(arg=None)` returning a list of override dicts keyed
by dotted config keys. The helpers below build such lists:

    from experiments import sweeps

    def get_sweep(arg=None):
      del arg
      return sweeps.product(
          sweeps.chain(
              sweeps.axis("quant.bits", [32]),                        # float baseline
              sweeps.zip_(sweeps.axis("quant.bits", [2, 4, 8]),       # each with its lr
                          sweeps.axis("optimizer.lr", [3e-3, 2e-3, 1e-3]))),
          sweeps.axis("seed", range(3)))

  axis(key, values)   one key over values: [{key: v} for v in values]
  product(*sweeps)    cartesian product, first sweep slowest; keys may not overlap
  zip_(*sweeps)       i-th point of each (equal lengths), merged
  chain(*sweeps)      concatenation
  ref(point)          a value naming an earlier point's run directory, for staged runs:
                      {"init.from_workdir": ref(stage1), ...} starts after stage1

Values are bools, ints, floats, strings, None, or tuples of those; each becomes
`--config.KEY=VALUE` (tuples as `(1,2)`). Points may set different keys (above, the
baseline keeps the config's lr; the report shows such a cell as `—`). Every point runs
in its own directory named from its overrides with keys sorted,
`optimizer.lr=0.002,quant.bits=4,seed=1`; a value with characters unsafe in a path gets
them replaced by `_` and a hash of the overrides appended. Two points with the same
name are an error.

Running it: `python -m experiments.sweep --config=configs/<recipe>.py[:ARG] --workdir=DIR`
(see plan.py for the directory layout, local.py, locks.py, slurm.py and task.py for launching),
then `python -m experiments.report --workdir=DIR`, which writes the sweep report
(report.py: report.md from collect.py's rows, and plots.py's PNG plots; imported on its
own, it needs matplotlib).
"""
from experiments.sweeps.grid import (axis, chain, format_value, point_name, product, ref,
                                    zip_)
from experiments.sweeps.plan import SweepError, SweepPoint, build_points, load_sweep

__all__ = [
    "axis", "product", "zip_", "chain", "ref", "format_value", "point_name",
    "SweepError", "SweepPoint", "build_points", "load_sweep",
]
