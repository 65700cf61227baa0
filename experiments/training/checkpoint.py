"""Orbax checkpoints of the train state plus JSON metadata (data-iterator position).

A checkpoint at step `s` holds the state after `s` optimizer updates and the iterator
positioned at batch `s`, so resuming replays exactly the batches an uninterrupted run
would see. Restoring walks back from the newest step: an unreadable (truncated,
corrupt) checkpoint is reported with a warning, moved aside to `corrupt/`, and the
previous one is tried. Damaged array data can still decompress (zstd chunks carry no
checksum), so the meta item also holds a CRC-32 per state leaf, compared after restore
(single-process runs; skipped where the state is sharded over several processes).
"""

from __future__ import annotations

import os
import shutil
import zlib
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

STATE_ITEM, META_ITEM = "state", "meta"
DIGEST_KEY = "state_crc32"  # in the meta item: CRC-32 of each state leaf's bytes


class NoReadableCheckpointError(RuntimeError):
  """Checkpoints exist but none of them can be restored."""


class Checkpointer:
  """A CheckpointManager for `{state: pytree of arrays, meta: JSON dict}` items."""

  def __init__(self, directory: str, *, max_to_keep: int):
    self.directory = os.path.abspath(directory)
    self._quarantine = os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        # Synchronous: the state buffers are donated to the next step, and a save must
        # be complete before the run reports it (the NaN guard keeps 'last good' exact).
        enable_async_checkpointing=False,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(STATE_ITEM, META_ITEM))

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    if step in self._manager.all_steps():
      return  # e.g. a resumed run that was already complete
    digest = _state_digest(state)
    if digest is not None:
      meta = {**meta, DIGEST_KEY: digest}
    self._manager.save(step, args=ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}))
    self._manager.wait_until_finished()

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
    """Returns `(step, state, meta)` of the newest readable checkpoint, or None if none.

    `abstract_state` carries shapes, dtypes and shardings (jax.ShapeDtypeStruct with
    sharding) so restored arrays land directly where the jitted step expects them.

    Raises:
      NoReadableCheckpointError: checkpoints exist but none can be read.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    failures: list[tuple[int, Exception]] = []
    for step in steps:
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardRestore(abstract_state),
               META_ITEM: ocp.args.JsonRestore()}))
        state, meta = restored[STATE_ITEM], restored[META_ITEM]
        _check_restored(abstract_state, state)
        _check_digest(state, meta)
      except Exception as e:  # pylint: disable=broad-except
        # Orbax/tensorstore raise many error types for damaged files; any of them means
        # "this step is unusable". Decide what to do once an older one is tried.
        failures.append((step, e))
        continue
      # An older checkpoint of the same structure restores, so the newer failures are
      # damage (not a changed config): set them aside so training can rewrite them.
      for bad_step, error in failures:
        self._set_aside(bad_step, error, fallback=step)
      return step, state, meta
    step, error = failures[0]
    raise NoReadableCheckpointError(
        f"none of the checkpoints in {self.directory} (steps {steps}) can be restored "
        f"for this config; the newest failed with {type(error).__name__}: "
        f"{_first_line(error)}. If the model, quantization or optimizer changed, use a "
        "new --workdir; if the files are damaged, delete that directory to start over.")

  def _set_aside(self, step: int, error: Exception, fallback: int) -> None:
    _warn(f"checkpoint at step {step} in {self.directory} is unreadable "
          f"({type(error).__name__}: {_first_line(error)}); falling back to step "
          f"{fallback}. Moving it to {self._quarantine}/")
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      if os.path.isdir(src):
        os.makedirs(self._quarantine, exist_ok=True)
        dst = os.path.join(self._quarantine, str(step))
        suffix = 0
        while os.path.exists(dst):
          suffix += 1
          dst = os.path.join(self._quarantine, f"{step}.{suffix}")
        shutil.move(src, dst)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jaxquant_ckpt_set_aside_{step}")
    self._manager.reload()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _check_restored(abstract_state: Any, state: Any) -> None:
  want = jax.tree_util.tree_structure(abstract_state)
  got = jax.tree_util.tree_structure(state)
  if want != got:
    raise ValueError(f"restored tree structure {got} differs from the expected {want}")
  for a, b in zip(jax.tree_util.tree_leaves(abstract_state), jax.tree_util.tree_leaves(state)):
    if a.shape != b.shape or a.dtype != b.dtype:
      raise ValueError(f"restored leaf {b.shape} {b.dtype} differs from {a.shape} {a.dtype}")


def _state_digest(state: Any) -> list[int] | None:
  """CRC-32 of every leaf's bytes; None when a leaf is not entirely on this process."""
  leaves = jax.tree_util.tree_leaves(state)
  if not all(getattr(x, "is_fully_addressable", True) for x in leaves):
    return None
  leaves = [jax.random.key_data(x) if jax.dtypes.issubdtype(getattr(x, "dtype", None),
                                                             jax.dtypes.prng_key) else x
            for x in leaves]
  return [zlib.crc32(np.ascontiguousarray(x).tobytes()) for x in jax.device_get(leaves)]


def _check_digest(state: Any, meta: Any) -> None:
  """Raises ValueError when the restored arrays differ from the checksums saved with them
  (and drops the checksums from `meta`); checkpoints saved without them pass."""
  expected = meta.pop(DIGEST_KEY, None) if isinstance(meta, dict) else None
  got = _state_digest(state) if expected is not None else None
  if got is None or got == expected:
    return
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
  bad = [p for p, a, b in zip(paths, got, expected) if a != b] or ["(leaf count)"]
  raise ValueError(f"array data does not match the CRC-32 saved with it: {len(bad)} "
                   f"leaf/leaves differ, first {bad[0]}")


def _first_line(error: Exception, limit: int = 160) -> str:
  text = str(error).strip()
  line = text.splitlines()[0] if text else ""
  return line if len(line) <= limit else line[:limit] + "..."


def _warn(message: str) -> None:
  logging.warning("%s", message)
