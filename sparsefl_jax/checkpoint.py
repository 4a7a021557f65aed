"""Orbax checkpoints of the server state, keyed by round, for bit-exact resume.

The state is stored as a flat mapping from readable key paths ('params/fc1/kernel', ...) to
arrays, so NamedTuples and empty subtrees (a stateless algorithm's `()`) round-trip exactly:
restoring unflattens into the structure of a freshly initialised state.
"""
import os
from typing import Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from sparsefl_jax.types import PyTree


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


class Checkpointer:
  """Saves the server state every `every` rounds (and on demand); keeps the newest `keep`."""

  def __init__(self, directory: str, keep: int = 3):
    if keep < 1:
      raise ValueError(f"keep_checkpoints={keep} must be >= 1")
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

  def save(self, round_index: int, state: PyTree) -> None:
    flat = {k: np.asarray(v) for k, v in _flat(state).items()}
    self._manager.save(round_index, args=ocp.args.StandardSave(flat), force=True)
    self._manager.wait_until_finished()

  def latest_round(self) -> Optional[int]:
    return self._manager.latest_step()

  def restore(self, target: PyTree, round_index: Optional[int] = None
              ) -> Tuple[Optional[PyTree], Optional[int]]:
    """Restores into the structure of `target`; (None, None) when there is no checkpoint."""
    step = self.latest_round() if round_index is None else round_index
    if step is None:
      return None, None
    flat_target = _flat(target)
    abstract = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype)
                for k, v in flat_target.items()}
    restored = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    missing = set(flat_target) - set(restored)
    if missing:
      raise ValueError(f"checkpoint at round {step} lacks state entries {sorted(missing)[:5]}")
    treedef = jax.tree.structure(target)
    leaves = [restored[k] for k in flat_target]
    return jax.tree.unflatten(treedef, leaves), step

  def close(self) -> None:
    self._manager.close()
