"""Where a training run's metrics go: metrics.jsonl (append-only), TensorBoard events,
a tqdm progress bar.

`MetricsLogger` writes them (only process 0 writes files; every process may call its
methods); `MetricsWindow` averages the per-step train metrics between two log points.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

import jax
import tensorboardX
import tqdm

from experiments.training.results import append_jsonl


class MetricsWindow:
  """Running means of per-step train metrics between two log points."""

  def __init__(self):
    self.reset()

  def reset(self) -> None:
    self._sums: dict[str, float] = {}
    self._count = 0
    self._start_time = time.perf_counter()

  def add(self, metrics: dict[str, float]) -> None:
    for k, v in metrics.items():
      self._sums[k] = self._sums.get(k, 0.0) + float(v)
    self._count += 1

  def means(self) -> dict[str, float]:
    elapsed = max(time.perf_counter() - self._start_time, 1e-9)
    out = {k: v / max(self._count, 1) for k, v in self._sums.items()}
    out["steps_per_sec"] = self._count / elapsed
    return out


class MetricsLogger:
  """Writes metric records to `workdir/metrics.jsonl` and `workdir/tensorboard/`."""

  def __init__(self, workdir: str, *, total_steps: int, initial_step: int, progress: bool):
    self._is_writer = jax.process_index() == 0
    self._jsonl = os.path.join(workdir, "metrics.jsonl")
    self._start = time.time()
    self._tb = None
    if self._is_writer:
      self._tb = tensorboardX.SummaryWriter(logdir=os.path.join(workdir, "tensorboard"))
    self._bar = None
    if self._is_writer and progress and sys.stderr.isatty():
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, file=sys.stderr,
                            unit="step", dynamic_ncols=True, smoothing=0.1)

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    """One record {step, split, time_s, **metrics}; NaN/Inf are kept (as JSON NaN)."""
    if not self._is_writer:
      return
    clean = {k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "dtype") else v)
             for k, v in metrics.items()}
    record = {"step": int(step), "split": split,
              "time_s": round(time.time() - self._start, 3), **clean}
    append_jsonl(self._jsonl, record)
    for k, v in clean.items():
      if isinstance(v, float) and math.isfinite(v):
        self._tb.add_scalar(f"{split}/{k}", v, int(step))

  def event(self, step: int, event: str, message: str) -> None:
    if self._is_writer:
      append_jsonl(self._jsonl, {"step": int(step), "event": event, "message": message,
                                 "time_s": round(time.time() - self._start, 3)})

  def advance(self, steps: int = 1) -> None:
    if self._bar is not None:
      self._bar.update(steps)

  def postfix(self, **values: float) -> None:
    if self._bar is not None:
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
      self._tb = None
