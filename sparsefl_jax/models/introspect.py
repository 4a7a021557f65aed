"""Facts about a model that only a trace reveals, e.g. the order weight layers are called in."""
from typing import Tuple

import jax

from sparsefl_jax.models.layers import dense_op
from sparsefl_jax.tree_paths import module_path


class _Recorder:
  """A LinearOp that behaves like `dense_op` and records each caller's module path."""

  def __init__(self):
    self.paths = []

  def __call__(self, module, contract, x, kernel):
    path = module_path(module)
    if path not in self.paths:
      self.paths.append(path)
    return dense_op(module, contract, x, kernel)


def weight_layer_order(model, variables, x) -> Tuple[str, ...]:
  """Module paths of the model's weight layers in call order (first layer … classifier).

  Parameter dicts are sorted by name, so only a trace tells which layer is first or last.
  Uses `jax.eval_shape`, so nothing is computed.
  """
  recorder = _Recorder()
  traced = model.clone(op=recorder)
  jax.eval_shape(lambda v, x: traced.apply(v, x, train=False), variables, x)
  return tuple(recorder.paths)
