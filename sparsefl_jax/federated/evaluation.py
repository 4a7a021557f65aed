"""Jitted, batched evaluation of the global model on a held-out split."""
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

from sparsefl_jax.algorithms.base import Algorithm
from sparsefl_jax.federated.client import BatchFn, cross_entropy
from sparsefl_jax.types import AlgoState, ModelState, Params


def pad_eval_split(x: np.ndarray, y: np.ndarray, batch_size: int):
  """Pads a split to whole batches: (B_count, batch, ...) arrays plus a 0/1 weight array."""
  if batch_size < 1:
    raise ValueError(f"eval batch_size={batch_size} must be >= 1")
  n = len(y)
  nb = -(-n // batch_size)
  pad = nb * batch_size - n
  xp = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
  yp = np.concatenate([y, np.zeros((pad,), y.dtype)]) if pad else y
  w = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  shape = (nb, batch_size)
  return (jnp.asarray(xp.reshape(shape + x.shape[1:])), jnp.asarray(yp.reshape(shape)),
          jnp.asarray(w.reshape(shape)))


def make_eval_fn(algorithm: Algorithm, model, batch_fn: BatchFn
                 ) -> Callable[..., Dict[str, jax.Array]]:
  """Returns jit(f)(params, model_state, algo_state, xb, yb, wb) -> {'loss', 'accuracy'}."""

  @jax.jit
  def evaluate(params: Params, model_state: ModelState, algo_state: AlgoState, xb, yb, wb):
    eval_params = algorithm.eval_params(params, algo_state)

    def one_batch(batch):
      x, y, w = batch
      logits, _, _ = algorithm.forward(model, eval_params, model_state,
                                    batch_fn(x, jax.random.PRNGKey(0), False), train=False,
                                    example_mask=None, rngs=None, client_state=())
      correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
      return jnp.sum(cross_entropy(logits, y) * w), jnp.sum(correct * w)

    losses, corrects = jax.lax.map(one_batch, (xb, yb, wb))
    total = jnp.sum(wb)
    return {"loss": jnp.sum(losses) / total, "accuracy": jnp.sum(corrects) / total}

  return evaluate
