"""Sparsity primitives: top-K, magnitude pruning, schedules, distributions.

Conventions: mask trees mirror the parameter tree with all-True masks for
unselected leaves; distributions return ``None`` for dense leaves; filters
are ``filter_fn(path: str, leaf) -> bool`` with '/'-joined key paths.
"""

from sparsefl_jax.sparsity import distributions
from sparsefl_jax.sparsity import masks
from sparsefl_jax.sparsity import schedules
from sparsefl_jax.sparsity import topk
from sparsefl_jax.sparsity.distributions import erk
from sparsefl_jax.sparsity.distributions import to_densities
from sparsefl_jax.sparsity.distributions import uniform
from sparsefl_jax.sparsity.masks import apply_masks
from sparsefl_jax.sparsity.masks import deactivation
from sparsefl_jax.sparsity.masks import density
from sparsefl_jax.sparsity.masks import layer_zero_fraction
from sparsefl_jax.sparsity.masks import magnitude_masks
from sparsefl_jax.sparsity.masks import magnitude_prune
from sparsefl_jax.sparsity.masks import majority_vote
from sparsefl_jax.sparsity.masks import majority_vote_merge
from sparsefl_jax.sparsity.masks import mask_iou
from sparsefl_jax.sparsity.masks import mask_of
from sparsefl_jax.sparsity.masks import nnz
from sparsefl_jax.sparsity.masks import pack_masks
from sparsefl_jax.sparsity.masks import PackedMask
from sparsefl_jax.sparsity.masks import per_layer_density
from sparsefl_jax.sparsity.masks import regrowth
from sparsefl_jax.sparsity.masks import trainable_filter
from sparsefl_jax.sparsity.masks import unpack_masks
from sparsefl_jax.sparsity.masks import weighted_average
from sparsefl_jax.sparsity.masks import weights_filter
from sparsefl_jax.sparsity.schedules import ConstantSchedule
from sparsefl_jax.sparsity.schedules import OneShotSchedule
from sparsefl_jax.sparsity.schedules import PolynomialSchedule
from sparsefl_jax.sparsity.topk import apply_threshold
from sparsefl_jax.sparsity.topk import global_topk_masks
from sparsefl_jax.sparsity.topk import global_topk_threshold
from sparsefl_jax.sparsity.topk import layerwise_topk_masks
from sparsefl_jax.tree_paths import path_str
from sparsefl_jax.sparsity.topk import topk_mask
from sparsefl_jax.sparsity.topk import topk_threshold
