"""Per-round sparsity metrics of the global model (jittable): per-layer density, mask IoU."""
from typing import Dict

import jax
import jax.numpy as jnp

from sparsefl_jax.sparsity import masks
from sparsefl_jax.tree_paths import kernels
from sparsefl_jax.types import Params


def kernel_densities(params: Params) -> Dict[str, jax.Array]:
  """{'density/<layer>': non-zero fraction} for every conv/dense kernel (ZeroFL Fig. 2)."""
  return {"density/" + layer: jnp.mean((leaf != 0).astype(jnp.float32))
          for layer, leaf in kernels(params)}


def global_mask_metrics(old_params: Params, new_params: Params) -> Dict[str, jax.Array]:
  """IoU of consecutive global masks (non-zero patterns) plus per-layer kernel densities."""
  return {"mask_iou": masks.mask_iou(masks.mask_of(old_params), masks.mask_of(new_params)),
          **kernel_densities(new_params)}


def regrowth_metrics(global_params: Params, uploaded_model: Params) -> Dict[str, jax.Array]:
  """SparsyFed's per-client regrowth: entries zero in the received global model and non-zero
  in the model the client uploads (and the reverse, 'deactivation'), over all parameters."""
  return {"regrowth": masks.regrowth(global_params, uploaded_model).astype(jnp.float32),
          "deactivation": masks.deactivation(global_params, uploaded_model
                                             ).astype(jnp.float32)}
