"""The experiment harness around the jaxquant library.

Layering: this package imports `jaxquant` (and `configs` recipes import this package's
schema); `jaxquant` never imports anything from here. Launchers run as
`python -m experiments.{train,sweep,report,benchmark}`; the libraries behind them are
`data`, `models`, `training` and `sweeps` (with `sweeps.report`, the sweep report).
Install the harness's dependencies with `pip install -e ".[experiments]"`.
"""
