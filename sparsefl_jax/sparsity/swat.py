"""SWAT (Raihan & Aamodt 2020) as a layer op: sparse weights forward, sparse activations back.

For a sparse layer with density d (Raihan & Aamodt 2020, Alg. 1 and the authors' code):

  forward   y  = f(a, TopK_d(W))          input activation dense
  saved        ã = TopK_d(a) over the whole activation tensor, W̃ = TopK_d(W)
  backward  ∇a = f_a(∇y; W̃)              input gradient with the sparse weights
            ∇W = f_W(∇y; ã)              DENSE weight gradient with sparse activations

`f` is the layer's contraction (dense or im2col conv), so one `jax.vjp` of it at (ã, W̃) gives
both gradients. The stored weights stay dense and receive dense updates, so the mask is
dynamic. Evaluation also uses TopK(W) (the op is part of the model). Thresholds follow SWAT's
top-K semantics (k = ceil(d·n), keep |x| ≥ k-th largest, ties kept) through
`sparsity.topk.topk_threshold`, and can be cached across local steps (SWAT's `topk_period`):
when the model is applied with a mutable 'swat' collection holding, per sparse layer,
`refresh` (an unbatched bool) and the cached `thr_w`/`thr_a`, thresholds are recomputed only
on refresh steps.

`swat_contract` is the shared custom-VJP core; SparsyFed's activation pruning reuses it with
its own thresholds.
"""
import dataclasses
import functools
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from sparsefl_jax import traceable
from sparsefl_jax.sparsity import topk
from sparsefl_jax.tree_paths import module_path, nest_by_layer, weight_layers

Contract = Callable[[jax.Array, jax.Array], jax.Array]
COLLECTION = "swat"
# Per sparse layer {'mask': (B,) bool}: the real rows of the training batch, so activation
# top-K thresholds rank and count real examples only (padding never changes training).
ROWS_COLLECTION = "batch_rows"


def keep_above(x: jax.Array, threshold: jax.Array) -> jax.Array:
  """x with the entries whose |x| is below `threshold` set to zero (SWAT's drop_threshold)."""
  return jnp.where(topk.abs32(x) >= threshold, x, jnp.zeros_like(x))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def swat_contract(contract: Contract, x: jax.Array, w: jax.Array, w_keep: jax.Array,
                  thr_a: jax.Array) -> jax.Array:
  """contract(x, W ⊙ keep) with SWAT's backward; `w_keep` (0/1) and `thr_a` get no gradient."""
  return contract(x, w * w_keep)


def _swat_fwd(contract, x, w, w_keep, thr_a):
  w_sparse = w * w_keep
  return contract(x, w_sparse), (keep_above(x, thr_a), w_sparse, w_keep, thr_a)


def _swat_bwd(contract, residuals, g):
  x_sparse, w_sparse, w_keep, thr_a = residuals
  _, vjp = jax.vjp(contract, x_sparse, w_sparse)
  gx, gw = vjp(g)
  return gx, gw, jnp.zeros_like(w_keep), jnp.zeros_like(thr_a)


swat_contract.defvjp(_swat_fwd, _swat_bwd)


def activation_threshold(module, x: jax.Array, density, method: str = "bisection"
                         ) -> jax.Array:
  """SWAT's activation top-K threshold of the layer input `x` over the batch's real rows.

  The rows come from the module's 'batch_rows' variable when the model is applied with
  `row_mask_variables(...)` (training); without it every row counts (evaluation, direct use).
  """
  rows = (module.get_variable(ROWS_COLLECTION, "mask")
          if module.has_variable(ROWS_COLLECTION, "mask") else None)
  return topk.rows_topk_threshold(jax.lax.stop_gradient(x), density, rows, method)


def row_mask_variables(paths: Sequence[str], example_mask: Optional[jax.Array]) -> dict:
  """The nested 'batch_rows' collection {layer path parts...: {'mask': example_mask}}."""
  if example_mask is None:
    return {}
  mask = jnp.asarray(example_mask, bool)
  return nest_by_layer({name: {"mask": mask} for name in paths})


def threshold_keep(w: jax.Array, threshold: jax.Array) -> jax.Array:
  """The 0/1 mask |w| ≥ threshold, as w's dtype."""
  return (topk.abs32(w) >= threshold).astype(w.dtype)


STRUCTURES = ("unstructured", "block")
MATMUL_IMPLS = ("xla", "pallas")


@dataclasses.dataclass(frozen=True)
class SwatOp:
  """A `models.LinearOp` applying SWAT to the layers listed in `densities`.

  Attributes:
    densities: ((module path, density), ...): weight and activation density per sparse layer
      (SWAT uses the same for both); layers not listed run dense.
    method: exact threshold algorithm ('top_k', 'bisection' or 'sort').
    structure: 'unstructured' (element top-K of W) or 'block' (top-K of block_size² blocks of
      the kernel's 2-D view by L2 norm; activations stay unstructured, as in SWAT's structured
      variants).
    block_size: block edge for structure='block'.
    matmul_impl: 'xla' (dense masked matmul) or 'pallas' (the block-sparse kernel, which
      skips zero blocks; structure='block' only).
    interpret: Pallas interpret mode (None: on when the default backend is CPU).
  """
  densities: Tuple[Tuple[str, float], ...]
  method: str = "bisection"
  structure: str = "unstructured"
  block_size: int = 32
  matmul_impl: str = "xla"
  interpret: Optional[bool] = None

  def __post_init__(self):
    if self.structure not in STRUCTURES:
      raise ValueError(f"sparsity_structure={self.structure!r} is not one of {STRUCTURES}")
    if self.matmul_impl not in MATMUL_IMPLS:
      raise ValueError(f"matmul_impl={self.matmul_impl!r} is not one of {MATMUL_IMPLS}")
    if self.matmul_impl == "pallas" and self.structure != "block":
      raise ValueError("matmul_impl='pallas' needs sparsity_structure='block' (unstructured "
                       "top-K masks cannot skip work); accepted: sparsity_structure=block")

  def density(self, path: str) -> Optional[float]:
    return dict(self.densities).get(path)

  def __call__(self, module, contract: Contract, x: jax.Array, kernel: jax.Array
               ) -> jax.Array:
    d = self.density(module_path(module))
    if d is None:
      return contract(x, kernel)
    if self.structure == "block":
      return self._block(module, contract, x, kernel, d)
    compute_w = lambda: topk.topk_threshold(jax.lax.stop_gradient(kernel), d, self.method)
    compute_a = lambda: activation_threshold(module, x, d, self.method)
    if module.has_variable(COLLECTION, "refresh"):
      refresh = module.get_variable(COLLECTION, "refresh")
      refresh_w = (module.get_variable(COLLECTION, "refresh_w")
                   if module.has_variable(COLLECTION, "refresh_w") else refresh)
      cached_w = module.get_variable(COLLECTION, "thr_w")
      cached_a = module.get_variable(COLLECTION, "thr_a")
      thr_w = jax.lax.cond(refresh_w, compute_w, lambda: cached_w)
      thr_a = jax.lax.cond(refresh, compute_a, lambda: cached_a)
      if module.is_mutable_collection(COLLECTION):
        module.put_variable(COLLECTION, "thr_w", thr_w)
        module.put_variable(COLLECTION, "thr_a", thr_a)
    else:
      thr_w, thr_a = compute_w(), compute_a()
    return swat_contract(contract, x, kernel, threshold_keep(kernel, thr_w), thr_a)

  def _block(self, module, contract, x, kernel, d):
    """Block-structured SWAT: the same math through XLA or the Pallas kernel."""
    from sparsefl_jax.sparsity import block   # local: keeps the unstructured path light
    if self.matmul_impl == "pallas":
      from sparsefl_jax.kernels.ops import BlockSparseOp
      op = BlockSparseOp(d, block_size=self.block_size, backward="swat",
                         activation_density=d, interpret=self.interpret)
      return op(module, contract, x, kernel)
    bs = (self.block_size, self.block_size)
    w = jax.lax.stop_gradient(kernel)
    keep = block.expand_block_mask(block.block_topk_mask(block.as_2d(w), d, bs), bs,
                                   kernel.shape).astype(kernel.dtype)
    thr_a = activation_threshold(module, x, d, self.method)
    return swat_contract(contract, x, kernel, keep, thr_a)


# ---- which layers are sparse, and how sparse ------------------------------------------------


def default_sparse_layers(layers: Dict[str, Tuple[int, ...]]) -> Tuple[str, ...]:
  """ZeroFL's choice generalised: every weight layer except the last one called (the
  classifier), 1×1 convolutions (ResNet shortcuts) and a ResNet 'stem'. This gives exactly
  ZeroFL's sets: ResNet-18 → all 3×3 convs but the stem; LEAF CNN → conv1, conv2, fc1
  (Qiu et al. 2022, §4). `layers` must be in call order.
  """
  names = list(layers)
  last = names[-1] if names else None
  chosen = []
  for name, shape in layers.items():
    is_1x1 = len(shape) == 4 and shape[0] == 1 and shape[1] == 1
    if name == last or is_1x1 or name.split("/")[-1] == "stem":
      continue
    chosen.append(name)
  return tuple(chosen)


def select_sparse_layers(layers: Dict[str, Tuple[int, ...]], spec: str) -> Tuple[str, ...]:
  """'default', 'all', or a comma-separated list of module paths (each must exist)."""
  if spec == "default":
    return default_sparse_layers(layers)
  if spec == "all":
    return tuple(layers)
  wanted = [s.strip() for s in spec.split(",") if s.strip()]
  unknown = [w for w in wanted if w not in layers]
  if unknown or not wanted:
    raise ValueError(f"sparse_layers={spec!r} names unknown layers {unknown}; accepted: "
                     f"'default', 'all' or a comma-separated subset of {list(layers)}")
  return tuple(wanted)


def layer_densities(params, sparsity: float, spec: str = "default",
                    distribution: str = "uniform", order: Sequence[str] = ()
                    ) -> Tuple[Tuple[str, float], ...]:
  """((path, density), ...) for the sparse layers: SWAT-U (uniform) or SWAT-ERK.

  A traced sparsity (a vmapped sweep) gives traced uniform densities; ERK needs a number.
  """
  traceable.check_range("sparsity", sparsity, 0, 1, high_open=True)
  layers = weight_layers(params, order)
  chosen = select_sparse_layers(layers, spec)
  if distribution == "uniform":
    return tuple((name, 1.0 - sparsity) for name in chosen)
  if distribution != "erk":
    raise ValueError(f"sparsity_distribution={distribution!r} is not one of "
                     "['uniform', 'erk']")
  traceable.require_concrete("sparsity", sparsity, "sparsity_distribution='erk' (per-layer "
                             "densities are solved in Python)")
  from sparsefl_jax.sparsity import distributions  # local: set-up only
  shapes = {name: jnp.zeros(layers[name], jnp.float32) for name in chosen}
  sparsities = distributions.erk(shapes, sparsity, filter_fn=None)
  return tuple((name, 1.0 - float(sparsities[name])) for name in chosen)


def cache_variables(densities: Sequence[Tuple[str, float]], refresh: jax.Array,
                    cached: Optional[dict] = None, refresh_w: Optional[jax.Array] = None
                    ) -> dict:
  """The nested 'swat' collection: per sparse layer {refresh, [refresh_w,] thr_w, thr_a}.

  `refresh` recomputes the activation threshold (and the weight threshold unless `refresh_w`
  is given separately, e.g. False on step 0 when the clients received it with the model).
  """
  out: dict = {}
  for name, _ in densities:
    node = out
    parts = name.split("/")
    for p in parts:
      node = node.setdefault(p, {})
    prev = _lookup(cached, parts) if cached is not None else None
    node["refresh"] = refresh
    if refresh_w is not None:
      node["refresh_w"] = refresh_w
    node["thr_w"] = prev["thr_w"] if prev else jnp.zeros((), jnp.float32)
    node["thr_a"] = prev["thr_a"] if prev else jnp.zeros((), jnp.float32)
  return out


def cached_thresholds(collection: dict, densities: Sequence[Tuple[str, float]]) -> dict:
  """{path: {'thr_w', 'thr_a'}} read back from an applied 'swat' collection."""
  out = {}
  for name, _ in densities:
    node = _lookup(collection, name.split("/"))
    out[name] = {"thr_w": node["thr_w"], "thr_a": node["thr_a"]}
  return out


def _lookup(tree: Optional[dict], parts):
  if tree is None:
    return None
  if "/".join(parts) in tree:      # flat {path: ...} form (client state)
    return tree["/".join(parts)]
  node = tree
  for p in parts:
    node = node[p]
  return node
