"""Orbax checkpoints of the server state, keyed by round, verified on restore.

The state is stored as a flat mapping from readable key paths ('params/fc1/kernel', ...) to
arrays, so NamedTuples and empty subtrees (a stateless algorithm's `()`) round-trip exactly:
restoring unflattens into the structure of a freshly initialised state.

Each step holds two orbax items: `state` (the arrays) and `meta` (JSON: the sha256 of every
array's bytes, dtype and shape, plus the run's cumulative counters, which `metrics.jsonl`
cannot be trusted to rebuild). `restore` checks every checksum; a step that fails to load or
to verify is moved to `<checkpoints>_damaged/` with a warning, and the next older step is
tried — a truncated file, an empty `_METADATA` or a flipped bit is never trained on.
"""
import hashlib
import logging
import os
import shutil
import sys
from typing import Any, Dict, List, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from sparsefl_jax.config import ConfigError
from sparsefl_jax.types import PyTree

META_FORMAT = 1


class CheckpointError(ConfigError):
  """No intact checkpoint is left to restore from; the message names what was damaged."""


def _flat(tree: PyTree) -> dict:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for path, leaf in leaves:
    name = "/".join(_key_name(k) for k in path)
    if name in out:
      raise ValueError(f"two state leaves share the checkpoint name {name!r}")
    out[name] = leaf
  return out


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def array_digest(value: np.ndarray) -> str:
  """sha256 over dtype, shape and the C-order bytes of one array."""
  arr = np.ascontiguousarray(value)
  h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
  h.update(arr.tobytes())
  return h.hexdigest()


_SILENCED = False


def _silence_closed_loop_callbacks() -> None:
  """A failed orbax read leaves tensorstore callbacks that later hit orbax's closed asyncio
  loop and print 'Event loop is closed' tracebacks; the failure itself is already reported,
  so those (and only those) are dropped."""
  global _SILENCED
  if _SILENCED:
    return
  previous = sys.unraisablehook

  def hook(unraisable) -> None:
    exc = unraisable.exc_value
    if isinstance(exc, RuntimeError) and "Event loop is closed" in str(exc):
      return
    previous(unraisable)

  sys.unraisablehook = hook
  _SILENCED = True


class Checkpointer:
  """Saves the server state every `every` rounds (and on demand); keeps the newest `keep`."""

  def __init__(self, directory: str, keep: int = 3):
    if keep < 1:
      raise ValueError(f"keep_checkpoints={keep} must be >= 1")
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory, item_names=("state", "meta"),
        options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=True))

  def save(self, round_index: int, state: PyTree,
           counters: Optional[Dict[str, Any]] = None) -> None:
    """Writes the state and its checksums (+ `counters`, e.g. cumulative bytes) at a round."""
    flat = {k: np.asarray(v) for k, v in _flat(state).items()}
    meta = {"format": META_FORMAT, "round": int(round_index),
            "sha256": {k: array_digest(v) for k, v in flat.items()},
            "counters": dict(counters or {})}
    self._manager.save(round_index, args=ocp.args.Composite(
        state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)), force=True)
    self._manager.wait_until_finished()

  def all_rounds(self) -> List[int]:
    return sorted(self._manager.all_steps())

  def latest_round(self) -> Optional[int]:
    return self._manager.latest_step()

  def restore(self, target: PyTree, round_index: Optional[int] = None
              ) -> Tuple[Optional[PyTree], Optional[int]]:
    """Restores into the structure of `target`; (None, None) when there is no checkpoint."""
    state, step, _ = self.restore_verified(target, round_index)
    return state, step

  def restore_verified(self, target: PyTree, round_index: Optional[int] = None
                       ) -> Tuple[Optional[PyTree], Optional[int], Dict[str, Any]]:
    """(state, round, counters) from the newest intact checkpoint (or exactly `round_index`).

    Damaged steps are quarantined with a warning and the next older one is tried; raises
    CheckpointError when checkpoints exist but none is intact.
    """
    steps = self.all_rounds()
    if round_index is not None:
      steps = [s for s in steps if s == round_index]
    if not steps:
      return None, None, {}
    damaged = []
    for step in reversed(steps):
      try:
        state, counters = self._load(target, step)
      except Exception as e:  # orbax/tensorstore raise many types; all mean "unreadable"
        _silence_closed_loop_callbacks()
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        where = os.path.join(self.directory, str(step))
        damaged.append(f"round {step} ({reason})")
        moved = self._quarantine(step)
        logging.warning("checkpoint %s is damaged (%s); moved to %s, trying an older one",
                        where, reason, moved)
        continue
      if damaged:
        logging.warning("restored the intact checkpoint of round %d instead", step)
      return state, step, counters
    raise CheckpointError(f"no intact checkpoint in {self.directory}: damaged "
                          f"{'; '.join(damaged)}; start a new --workdir")

  def _load(self, target: PyTree, step: int) -> Tuple[PyTree, Dict[str, Any]]:
    flat_target = _flat(target)
    abstract = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype)
                for k, v in flat_target.items()}
    legacy = os.path.join(self.directory, str(step), "default")
    if os.path.isdir(legacy) and not os.path.isdir(os.path.join(self.directory, str(step),
                                                                "meta")):
      return self._load_legacy(target, flat_target, abstract, legacy, step)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    arrays, meta = restored["state"], restored["meta"]
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
      raise ValueError("meta item missing or of an unknown format")
    missing = set(flat_target) - set(arrays)
    if missing:
      raise ValueError(f"lacks state entries {sorted(missing)[:5]}")
    sums = meta.get("sha256", {})
    for k in flat_target:
      if sums.get(k) != array_digest(np.asarray(arrays[k])):
        raise ValueError(f"checksum mismatch in {k!r}")
    treedef = jax.tree.structure(target)
    leaves = [arrays[k] for k in flat_target]
    return jax.tree.unflatten(treedef, leaves), dict(meta.get("counters", {}))

  def _load_legacy(self, target, flat_target, abstract, path: str, step: int):
    """A checkpoint written before checksums existed (one 'default' item): restored
    unverified, with a warning; its counters are unknown (the caller rebuilds them)."""
    with ocp.StandardCheckpointer() as reader:
      arrays = reader.restore(path, abstract)
    missing = set(flat_target) - set(arrays)
    if missing:
      raise ValueError(f"lacks state entries {sorted(missing)[:5]}")
    logging.warning("checkpoint %s predates checksums: restored unverified", path)
    leaves = [arrays[k] for k in flat_target]
    return jax.tree.unflatten(jax.tree.structure(target), leaves), {"legacy": True}

  def _quarantine(self, step: int) -> str:
    """Moves a damaged step out of orbax's sight (kept for inspection)."""
    src = os.path.join(self.directory, str(step))
    dst_root = self.directory.rstrip("/") + "_damaged"
    os.makedirs(dst_root, exist_ok=True)
    dst = os.path.join(dst_root, str(step))
    n = 1
    while os.path.exists(dst):
      dst = os.path.join(dst_root, f"{step}.{n}")
      n += 1
    if os.path.exists(src):
      shutil.move(src, dst)
    self._manager.reload()   # forget the moved step
    return dst

  def close(self) -> None:
    self._manager.close()
