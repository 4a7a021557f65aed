"""The finiteness guard: after every round, one fused on-device reduction tells whether the
loss, the parameters, the model state and the server/method state are all finite.

It is jitted once and its few booleans are fetched with the round's metrics, so the cost is
one pass over the state per round. A diverged round stops the run (`Diverged`) before its
state can be checkpointed; `--allow_nonfinite` keeps going instead.
"""
import math
from typing import Any, Dict, List

import jax
import jax.numpy as jnp

# (ServerState field, how the error line names it)
STATE_GROUPS = (("params", "parameters"), ("model_state", "model state (e.g. BatchNorm "
                "statistics)"), ("opt_state", "server optimizer state"),
                ("algo_state", "method state"))
# Exit status of a diverged run (2 is a bad setting, 130/143 a signal).
DIVERGED_EXIT = 3


class Diverged(RuntimeError):
  """A round produced NaN/inf; the message names the round and the quantities."""
  exit_code = DIVERGED_EXIT


def _all_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return jnp.asarray(True)
  return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]).all()


@jax.jit
def finite_flags(state, train_loss) -> jax.Array:
  """(1 + len(STATE_GROUPS),) bools: train_loss, then each state group, all finite."""
  flags = [jnp.all(jnp.isfinite(train_loss))]
  flags += [_all_finite(getattr(state, name)) for name, _ in STATE_GROUPS]
  return jnp.stack(flags)


def bad_quantities(flags, row: Dict[str, Any]) -> List[str]:
  """Names of the non-finite quantities of a round, from `finite_flags` and the host row."""
  names = ["train_loss"] + [label for _, label in STATE_GROUPS]
  bad = [n for n, ok in zip(names, list(jax.device_get(flags))) if not ok]
  for key in ("test_loss", "test_accuracy"):
    v = row.get(key)
    if isinstance(v, float) and not math.isfinite(v):
      bad.append(key)
  return bad
