"""Orbax checkpoints of the server state, keyed by round, verified on restore.

The state is stored as a flat mapping from readable key paths ('params/fc1/kernel', ...) to
arrays, so NamedTuples and empty subtrees (a stateless algorithm's `()`) round-trip exactly:
restoring unflattens into the structure of a freshly initialised state.

Each step holds two orbax items: `state` (the arrays) and `meta` (JSON: the sha256 of every
array's bytes, dtype and shape, plus the run's cumulative counters, which `metrics.jsonl`
cannot be trusted to rebuild). After a save completes, `files.sha256` (size and sha256 of every file
orbax wrote) is added to the step. `restore` first checks those files, so a truncated file,
an empty `_METADATA` or a flipped bit is found before orbax reads it (orbax reading a damaged
file leaves asyncio tasks that print tracebacks later); then it checks every array checksum.
A step that fails any check is moved to `<checkpoints>_damaged/` with one warning line and
the next older step is tried — damaged bytes are never trained on.
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

from sparsefl_jax import distributed
from sparsefl_jax.config import ConfigError
from sparsefl_jax.types import PyTree

META_FORMAT = 1
FILE_MANIFEST = "files.sha256"   # "<sha256>  <size>  <relative path>" per line


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


def _step_files(step_dir: str) -> List[str]:
  out = []
  for root, _, files in os.walk(step_dir):
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != FILE_MANIFEST:
        out.append(rel)
  return sorted(out)


def _file_digest(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def write_file_manifest(step_dir: str) -> None:
  """Records size and sha256 of every file in a finished step (written atomically)."""
  lines = [f"{_file_digest(os.path.join(step_dir, rel))}  "
           f"{os.path.getsize(os.path.join(step_dir, rel))}  {rel}\n"
           for rel in _step_files(step_dir)]
  tmp = os.path.join(step_dir, FILE_MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    f.writelines(lines)
  os.replace(tmp, os.path.join(step_dir, FILE_MANIFEST))


def check_file_manifest(step_dir: str) -> None:
  """Raises ValueError naming the first file that is missing, cut short or altered.

  A step without a manifest (saved before manifests existed, or killed between orbax's
  finalize and the manifest write) passes; its arrays are still checksummed after loading.
  """
  path = os.path.join(step_dir, FILE_MANIFEST)
  if not os.path.exists(path):
    return
  with open(path) as f:
    for line in f:
      digest, size, rel = line.rstrip("\n").split("  ", 2)
      full = os.path.join(step_dir, rel)
      if not os.path.exists(full):
        raise ValueError(f"file {rel} is missing")
      got = os.path.getsize(full)
      if got != int(size):
        raise ValueError(f"file {rel} has {got} bytes, {size} were written")
      if _file_digest(full) != digest:
        raise ValueError(f"file {rel} differs from what was written (sha256)")


_SILENCED = False


def _silence_closed_loop_callbacks() -> None:
  """A failed orbax read leaves tensorstore callbacks and tasks that later hit orbax's closed
  asyncio loop and print 'Event loop is closed' / 'Task exception was never retrieved'
  tracebacks; the failure itself is reported as one warning, so those (and only those) are
  dropped."""
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
  logging.getLogger("asyncio").addFilter(_drop_unretrieved_tensorstore_errors)
  _SILENCED = True


def _drop_unretrieved_tensorstore_errors(record: logging.LogRecord) -> bool:
  """asyncio's 'Task exception was never retrieved' for an orbax read that already failed."""
  text = record.getMessage()
  return not (text.startswith("Task exception was never retrieved") and "tensorstore" in text)


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
    if jax.process_index() == 0:   # several processes share the folder: one writes
      write_file_manifest(os.path.join(self.directory, str(round_index)))
    distributed.barrier(f"sparsefl_checkpoint_{round_index}")

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
      error = None
      try:
        check_file_manifest(os.path.join(self.directory, str(step)))
      except Exception as e:
        error = e
      # Several processes: every decision is agreed on, so all load (orbax restores
      # collectively) or all skip the same step.
      if not distributed.any_process(error is not None):
        try:
          _silence_closed_loop_callbacks()   # before orbax reads: its failures print late
          state, counters = self._load(target, step)
        except Exception as e:  # orbax/tensorstore raise many types; all mean "unreadable"
          error = e
        if distributed.any_process(error is not None) and error is None:
          error = ValueError("damaged as read by another process")
      elif error is None:
        error = ValueError("damaged as checked by another process")
      if error is not None:
        e = error
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
    if jax.process_index() == 0 and os.path.exists(src):   # one process moves it
      shutil.move(src, dst)
    distributed.barrier(f"sparsefl_quarantine_{step}")
    self._manager.reload()   # forget the moved step
    return dst

  def close(self) -> None:
    self._manager.close()
