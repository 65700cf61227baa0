"""Optimizer and learning-rate schedule from the `optimizer` config section."""

from __future__ import annotations

import jax
import ml_collections
import optax

OPTIMIZERS = ("adamw", "sgd")
SCHEDULES = ("cosine", "constant")


def learning_rate_schedule(opt_cfg: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `lr`, then cosine decay to 0 at `num_steps` (or constant)."""
  lr, warmup = float(opt_cfg.lr), int(opt_cfg.warmup_steps)
  if opt_cfg.schedule == "cosine":
    decay_steps = max(num_steps - warmup, 1)
    main = optax.cosine_decay_schedule(lr, decay_steps)
  elif opt_cfg.schedule == "constant":
    main = optax.constant_schedule(lr)
  else:
    raise ValueError(f"optimizer.schedule={opt_cfg.schedule!r}; choose one of {list(SCHEDULES)}")
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def decay_mask(trainable):
  """Weight decay only on kernels: 'params' leaves with ndim >= 2 (not biases/norms/scales)."""
  def is_decayed(path, leaf):
    return bool(path) and getattr(path[0], "key", None) == "params" and leaf.ndim >= 2
  return jax.tree_util.tree_map_with_path(is_decayed, trainable)


def build_optimizer(opt_cfg: ml_collections.ConfigDict,
                    num_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns `(tx, schedule)`: optional global-norm clipping, then AdamW or SGD-momentum.

  The update acts on the whole trainable tree ({'params', and 'quant' when the model
  learns quantization scales}), so learned scales are optimized with the weights.
  """
  schedule = learning_rate_schedule(opt_cfg, num_steps)
  if opt_cfg.name == "adamw":
    tx = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2,
                     weight_decay=opt_cfg.weight_decay, mask=decay_mask)
  elif opt_cfg.name == "sgd":
    parts = []
    if opt_cfg.weight_decay > 0:
      parts.append(optax.add_decayed_weights(opt_cfg.weight_decay, mask=decay_mask))
    parts.append(optax.sgd(schedule, momentum=opt_cfg.momentum or None))
    tx = optax.chain(*parts)
  else:
    raise ValueError(f"optimizer.name={opt_cfg.name!r}; choose one of {list(OPTIMIZERS)}")
  if opt_cfg.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip_norm), tx)
  return tx, schedule
