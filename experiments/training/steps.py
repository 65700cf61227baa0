"""Pure train / eval step functions (jitted with shardings by the loop).

The train state is a plain dict, so orbax saves it as an ordinary pytree:
  step       int32 scalar, optimizer updates done so far.
  trainable  the trainable collections: 'params' and, for quantized models with learned
             scales, 'quant'.
  state      every other variable collection (e.g. 'quant_stats' activation-range
             EMAs), updated by the forward pass, never by the optimizer.
  opt_state  the optax state of `trainable`.
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxquant import state as jq_state

TRAINABLE_COLLECTIONS = ("params", jq_state.QUANT)
LN2 = 0.6931471805599453
EVAL_KEY_FOLD = 2**32 - 1


def split_variables(variables: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """(trainable collections, other collections)."""
  trainable = {k: v for k, v in variables.items() if k in TRAINABLE_COLLECTIONS}
  other = {k: v for k, v in variables.items() if k not in TRAINABLE_COLLECTIONS}
  return trainable, other


def leaf_paths(tree: Any) -> list[str]:
  """'/'-joined key paths of the leaves, in tree_leaves order."""
  def name(k):
    return str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
  return ["/".join(name(k) for k in path)
          for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _nonfinite_flags(tree: Any) -> jax.Array:
  """bool [num_leaves]: True where a leaf holds a NaN or Inf."""
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    return jnp.zeros((0,), bool)
  return jnp.stack([~jnp.all(jnp.isfinite(x)) for x in leaves])


def _per_token_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def make_init_fn(model: nn.Module, quantized: bool) -> Callable:
  """`init(rng, x, tx) -> state`; `tx` is closed over by the caller."""
  def init(rng: jax.Array, x: jax.Array, tx: optax.GradientTransformation):
    params_key, quant_key = jax.random.split(rng)
    rngs = {"params": params_key}
    if quantized:
      rngs[jq_state.RNG] = quant_key
    variables = model.init(rngs, x)
    variables = dict(variables)
    trainable, other = split_variables(variables)
    return {"step": jnp.zeros((), jnp.int32), "trainable": trainable, "state": other,
            "opt_state": tx.init(trainable)}
  return init


def distillation_loss(student_logits: jax.Array, teacher_logits: jax.Array,
                      temperature: float) -> jax.Array:
  """Per-example T² · KL(softmax(teacher/T) ‖ softmax(student/T)) (Hinton et al. 2015;
  the T² keeps its gradient, T·(p_s − p_t) per logit, on the scale of the label loss)."""
  t = jnp.float32(temperature)
  log_ps = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  log_pt = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / t,
                              axis=-1)
  return t * t * jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, quantized: bool, seed: int,
                    nan_at_step: int, distill: tuple[float, float] | None = None
                    ) -> Callable:
  """`train_step(state, batch) -> (state, metrics)`.

  The step key is `fold_in(key(seed), step)`, built inside the jitted step so no key
  array has to be placed on the mesh; quantized models get it as the 'quant' rng
  (stochastic rounding). Metrics include per-leaf non-finite flags for the gradients
  and the updated trainables so the host can name the first bad layer. With
  `distill=(temperature, weight)` the batch carries 'teacher_logits' and the loss is
  (1 − weight)·CE + weight·`distillation_loss` (metric 'distill_loss').
  """
  def train_step(state, batch):
    step = state["step"]
    step_key = jax.random.fold_in(jax.random.key(seed), step)
    rngs = {jq_state.RNG: step_key} if quantized else {}
    mutable = sorted(state["state"].keys())
    x, y = batch["x"], batch["y"]

    def loss_fn(trainable):
      variables = {**trainable, **state["state"]}
      if mutable:
        logits, new_state = model.apply(variables, x, rngs=rngs, mutable=mutable)
      else:
        logits, new_state = model.apply(variables, x, rngs=rngs), {}
      chex.assert_shape(logits, (*y.shape, None))
      per_token = _per_token_loss(logits, y)
      loss = jnp.mean(per_token)
      aux = {}
      if distill is not None:
        temperature, weight = distill
        kd = jnp.mean(distillation_loss(logits, batch["teacher_logits"], temperature))
        loss = (1.0 - weight) * loss + weight * kd
        aux["distill_loss"] = kd
      if nan_at_step >= 0:  # debugging aid: debug.nan_at_step (1-based)
        loss = loss * jnp.where(step + 1 == nan_at_step, jnp.nan, 1.0)
      accuracy = jnp.mean((jnp.argmax(logits, -1) == y).astype(jnp.float32))
      return loss, (accuracy, dict(new_state), aux)

    (loss, (accuracy, new_state, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["trainable"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["trainable"])
    trainable = optax.apply_updates(state["trainable"], updates)
    new_state = {**state["state"], **new_state}
    metrics = {
        "loss": loss,
        "accuracy": accuracy,
        **aux,
        "grad_norm": optax.tree.norm(grads),
        "lr": jnp.asarray(schedule(step), jnp.float32),
        "grads_nonfinite": _nonfinite_flags(grads),
        "trainable_nonfinite": _nonfinite_flags(trainable),
    }
    return {"step": step + 1, "trainable": trainable, "state": new_state,
            "opt_state": opt_state}, metrics

  return train_step


def make_eval_step(apply_fn: Callable, *, quantized: bool, lm: bool, seed: int) -> Callable:
  """`eval_step(variables, batch, mask) -> sums` of loss, correct and count.

  `mask` [B] zeroes the padding examples of the last (short) batch; for 'lm' every
  token of a real window counts.
  """
  def eval_step(variables, batch, mask):
    # A fixed key outside the training steps' fold_in range (steps are >= 0).
    eval_key = jax.random.fold_in(jax.random.key(seed), jnp.uint32(EVAL_KEY_FOLD))
    rngs = {jq_state.RNG: eval_key} if quantized else {}
    logits = apply_fn(variables, batch["x"], rngs=rngs)
    y = batch["y"]
    per_token = _per_token_loss(logits, y)
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    weights = mask.astype(jnp.float32)
    if lm:
      weights = jnp.broadcast_to(weights[:, None], y.shape)
    return {"loss_sum": jnp.sum(per_token * weights),
            "correct_sum": jnp.sum(correct * weights),
            "count": jnp.sum(weights)}
  return eval_step


def summarize_eval(sums: dict[str, float], *, lm: bool) -> dict[str, float]:
  count = max(float(sums["count"]), 1.0)
  loss = float(sums["loss_sum"]) / count
  out = {"loss": loss, "accuracy": float(sums["correct_sum"]) / count}
  if lm:
    out["bits_per_byte"] = loss / LN2
  return out
