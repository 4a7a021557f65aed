"""PruneFL (Jiang, Wang, Valls, Ko, Lee, Leung and Tassiulas, "Model Pruning Enables
Efficient Federated Learning on Edge Devices", IEEE TNNLS 2022, arXiv:1909.12326).

PruneFL adapts the mask of the conv/dense kernels during training so as to maximise the
approximate empirical-risk reduction per unit of round time. The paper's formula did not
survive in our copy of the text, so the rule below is reconstructed from the authors' code
(github.com/jiangyuang/PruneFL: `control/algorithm.py`, `bases/fl/simulation/adaptive.py`,
`configs/*.py`) and the paper's description, step by step.

**The objective.** For a mask M over the prunable weights, one round reduces the loss by about
Δ(M) = Σ_{j ∈ M} g_j² + G (g_j² the squared gradient of weight j, G that of every parameter
that is never pruned: biases, BatchNorm scale/offset) and takes time T(M) = c + Σ_{j ∈ M} t_j
(t_j the time one kept weight adds to a round, c the time that no mask removes). PruneFL keeps
the M that makes Δ(M)/T(M) large. Adding weight j raises the ratio exactly when
g_j²/t_j > Δ(M)/T(M), so the greedy search below stops at the first weight that does not.

**A readjustment** (`readjust_masks`; the code's `process_layer` + `architecture_search`):

1. Every kernel l keeps, unconditionally, its active weights except the floor(d·n_l) smallest
   by |w| (n_l active weights; the threshold is the floor(d·n_l)-th smallest active |w|, ties
   with it kept). d bounds how much one readjustment can remove from a layer.
2. Every other entry of the kernel (the d smallest active ones and every pruned one) is a
   candidate. Candidates are visited in descending importance g_j²/t_j over all layers (ties
   by position) and added while g_j²/t_j > Δ/T, with Δ and T accumulated over the kept set
   and the candidates added so far (Δ starts with G; T starts with c). A pruned weight can
   come back: regrowth is part of the rule.
3. Optional cap: no more than ceil((1 − s)·N) kernel entries are kept, s = --sparsity and N
   the kernels' size (the code's `max_density`; see "--sparsity" below).

**Where the squared gradients come from.** The readjustment rounds are the rounds t with
(t − 1) > 0 and (t − 1) mod ΔR = 0 (the code's 0-based round index; ΔR =
--prunefl_readjust_every, 50 in the code and in FedSparsify's comparison): with ΔR = 50,
rounds 51, 101, 151. In those
rounds each client sums g² over the real steps of its local training (`local_update`; the
gradient is the dense one: pruned weights are 0 but their gradient is not) and uploads the sum
for every parameter as `Upload.extras`, charged on the uplink like the values (dense float32:
4 bytes per parameter). The server adds them over the round's clients (`upload_stats` counts
them unweighted: a client with more data ran more steps already), averages the weights as
FedAvg, and readjusts the mask from the aggregate's |w| and the summed g² (`finalize_state`,
after aggregation, before the server optimizer) with d = d_0·0.5^((t − 1)/H) (the code's
`MAX_DEC_DIFF · 0.5^(idx / ADJ_HALF_LIFE)`: d_0 = --prunefl_max_decrease = 0.3,
H = --prunefl_half_life = 10000 rounds, as in the code's FEMNIST and CIFAR-10 configs). The
clients train inside the new mask from the next round on. Rounds between readjustments are
masked FedAvg; they send no squared gradients (a round phase of their own, so they carry no
accumulator).

**Initial pruning** (`init_from_data`, before round 1): one client, drawn from the init seed
(`federated.probe`: the client and its batch of --batch_size examples come from the init
stream folded with a purpose tag), prunes alone. For each of R = --prunefl_init_rounds
reconfigurations (5, as in FedSparsify's comparison and the FedDST authors' port) it runs
--prunefl_init_steps plain SGD steps (lr = --lr) on its batch inside the current mask, summing
g² over them, then readjusts with the undecayed d_0 (as the code's initial pruning). The trained
weights and the mask start the federated rounds (the code continues from the initial client's
model). R = 0 skips it (the model starts dense).

**Time cost t_j** (--prunefl_time_cost; the paper measures it on its devices: per layer, the
time of a sparse step per kept weight plus the upload time per weight):

* `uniform` (default): t_j = 1 for every kernel entry. On dense hardware, such as the CPU
  this library runs on, a masked layer costs as much compute as a dense one, so the only
  part of the round time that a mask changes is sending the kept weights, the same per
  weight; everything else is in c. This is the paper's measurement on such hardware.
* `layer_flops`: t_j = the multiply-accumulates that one weight of layer l does per example in
  the forward pass (1 for a dense layer; one per output position for a convolution), read from
  the model's own computation (the dot_general/convolution that consumes the kernel in the
  jaxpr of the probe loss). This models a device whose sparse kernels skip pruned weights, where
  compute dominates (the code's per-layer `COMP_COEFFICIENTS`).

c = κ·Σ_j t_j over every kernel entry of the dense model, κ = --prunefl_time_constant = 0.14:
the code's FEMNIST configuration has c = 6.25 s against Σ_j t_j = 44.8 s for its dense model
(TIME_CONSTANT vs COMP_COEFFICIENTS + COMM_COEFFICIENT). The greedy rule is invariant to a
common scale of the t_j, so only κ and the ratios between layers matter.

**--sparsity** is PruneFL's optional density cap (step 3): PruneFL chooses its own density,
and s only stops the readjustments from growing past 1 − s (the code's `max_density`; it
can end denser while step 1 keeps more, at most d below the previous mask). A required flag
for every sparse method here; s = 0.3 keeps the cap at 70% density.

**Aggregation, regrowth, what is pruned.** FedAvg of the clients' masked weights; the server
re-applies the mask after its update (`server_post`), so a server optimizer cannot revive
pruned weights. A regrown weight starts from the aggregate's value there, which is 0 under
FedAvg (no client trained it), as in the FedDST authors' port (`prunefl.py`). Prunable: the
conv/dense kernels (`tree_paths.is_kernel`); biases and BatchNorm parameters are never pruned
but their squared gradients count in G, as in the code. Clients learn a new mask from the
next broadcast (its non-zeros, plus the regrown zeros): that 1 bit per kernel entry once
after each readjustment is not charged on the downlink (the engine has no downlink mask
channel).

Where this departs from the authors' code, and why:
* The code's clients accumulate (Σ_steps g)²·(examples processed) per round, over all rounds
  since the last readjustment, with every client taking part in every round. Clients here are
  sampled and keep no state between rounds, so they accumulate Σ_steps g² within the
  readjustment round only (as the code's own initial pruning does), and upload nothing in
  other rounds.
* The code's simulation multiplies the weights by the mask inside each layer, so a pruned
  weight's gradient is zero and it can only come back in the readjustment that removed it;
  its prototype (sparse layers) and the paper use the dense gradient, as here.
* The code keeps a pruned weight's last value on the server and revives it with that value;
  here it restarts from the aggregate (0), like the FedDST port.
* Initial pruning: the code trains on 10 fixed batches of one client for up to 1000 rounds,
  readjusting every 50 rounds once the training accuracy exceeds 1.5/C and stopping after 5
  reconfigurations that each change the density by at most 10%; here a fixed R
  reconfigurations on the probe batch (the `init_from_data` contract gives one batch).
* The cap stops exactly at ceil((1 − s)·N) (the code's check lets one more weight in).

The FedDST authors' port (`prunefl.py`) and FedSparsify's port rank by |g|² resp. the raw
signed gradient, start from an empty mask and keep adding until "n_required = (1 −
0.3·0.5^{r/R})·N" weights are in even when the ratio drops; that required-fraction floor is a
reading of the code's per-layer decrease bound d (step 1), which is what is implemented here.
"""
import dataclasses
import math
from typing import Any, Dict, List, NamedTuple, Tuple

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from sparsefl_jax.algorithms.base import Upload, nnz_server_metrics
from sparsefl_jax.algorithms.hyper import Hyper
from sparsefl_jax.algorithms.masked import MaskedTraining
from sparsefl_jax.sparsity import masks as masks_lib
from sparsefl_jax.sparsity import topk
from sparsefl_jax.traceable import check_range
from sparsefl_jax.tree_paths import is_kernel, path_str
from sparsefl_jax.types import AlgoState, Params, PRNGKey, PyTree, Scalar

TRAIN, READJUST = "train", "readjust"
TIME_COSTS = ("uniform", "layer_flops")


class PruneFLState(NamedTuple):
  """Server state.

  mask: bool, params-shaped; the kernels' current mask, every other leaf all True.
  time_cost: one float32 scalar per leaf: t_j of every weight of that kernel (0 elsewhere).
  """
  mask: PyTree
  time_cost: PyTree


def _kernel_flags(tree: PyTree) -> PyTree:
  """True for the conv/dense kernels (the prunable leaves), False elsewhere."""
  return jax.tree_util.tree_map_with_path(lambda p, x: is_kernel(path_str(p), x), tree)


def uniform_time_cost(params: Params) -> PyTree:
  """t_j = 1 for every kernel entry (0 for the other leaves)."""
  return jax.tree.map(lambda k: jnp.float32(1.0 if k else 0.0), _kernel_flags(params))


# ---- layer_flops: multiply-accumulates per weight, read from the model's computation -------
def _sub_jaxprs(eqn) -> List[Any]:
  out = []
  for value in eqn.params.values():
    for v in (value if isinstance(value, (tuple, list)) else (value,)):
      inner = getattr(v, "jaxpr", v)
      if hasattr(inner, "eqns") and hasattr(inner, "invars"):
        out.append(inner)
  return out


def _is_var(v) -> bool:
  return isinstance(v, jax_core.Var)


def _walk(jaxpr, labels: Dict[Any, int], macs: Dict[int, float]) -> None:
  """Adds to `macs[i]` the multiply-accumulates of every dot/convolution whose one operand is
  (a reshape/cast/... of) input leaf i; `labels` maps variables to the leaf they carry."""
  for eqn in jaxpr.eqns:
    found = {labels[v] for v in eqn.invars if _is_var(v) and v in labels}
    name = eqn.primitive.name
    if name in ("dot_general", "conv_general_dilated"):
      if len(found) == 1:
        (leaf,) = found
        pos = next(i for i, v in enumerate(eqn.invars) if _is_var(v) and labels.get(v) == leaf)
        out = eqn.outvars[0].aval
        operand = eqn.invars[pos].aval
        if name == "dot_general":
          (lhs_c, rhs_c), _ = eqn.params["dimension_numbers"]
          k = math.prod(operand.shape[d] for d in (lhs_c if pos == 0 else rhs_c))
        else:   # MACs per output entry: the kernel's size over its output features
          rhs = eqn.invars[1].aval
          out_dim = eqn.params["dimension_numbers"].rhs_spec[0]
          k = math.prod(rhs.shape) // rhs.shape[out_dim]
        macs[leaf] = macs.get(leaf, 0.0) + float(math.prod(out.shape)) * float(k)
      continue                     # a product is an activation, not the kernel any more
    subs = [s for s in _sub_jaxprs(eqn) if len(s.invars) == len(eqn.invars)]
    if subs:
      for sub in subs:
        inner = {sv: labels[v] for sv, v in zip(sub.invars, eqn.invars)
                 if _is_var(v) and v in labels}
        _walk(sub, inner, macs)
        for so, o in zip(sub.outvars, eqn.outvars):
          if _is_var(so) and so in inner:
            labels[o] = inner[so]
      continue
    if len(found) == 1:            # reshape, transpose, convert, mask multiply, ...
      (leaf,) = found
      for o in eqn.outvars:
        labels[o] = leaf


def layer_flops_time_cost(params: Params, loss_fn) -> PyTree:
  """t_j = MACs per example of one weight of each kernel in the forward pass of `loss_fn`
  (up to the common batch factor, which the rule ignores); 0 for the other leaves."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  closed = jax.make_jaxpr(loss_fn)(params)
  labels = {v: i for i, (v, (p, x)) in enumerate(zip(closed.jaxpr.invars, leaves))
            if is_kernel(path_str(p), x)}
  macs: Dict[int, float] = {}
  _walk(closed.jaxpr, dict(labels), macs)
  costs = []
  for i, (p, x) in enumerate(leaves):
    if not is_kernel(path_str(p), x):
      costs.append(jnp.float32(0.0))
      continue
    if macs.get(i, 0.0) <= 0.0:
      raise ValueError(f"prunefl_time_cost='layer_flops': no dot/convolution consumes the "
                       f"kernel {path_str(p)!r}; use prunefl_time_cost='uniform'")
    costs.append(jnp.float32(macs[i] / math.prod(x.shape)))
  return jax.tree.unflatten(jax.tree.structure(params), costs)


# ---- the readjustment --------------------------------------------------------------------
def readjust_masks(params: Params, sq_grads: PyTree, mask: PyTree, time_cost: PyTree,
                   decrease: Any, time_constant: float, max_keep: int) -> PyTree:
  """PruneFL's new mask (see the module docstring, steps 1-3).

  Args:
    params: the weights whose |w| picks the kept set (the aggregate, on the server).
    sq_grads: Σ g² per entry, params-shaped; the non-kernel leaves only enter Δ's sum G.
    mask: the current mask (bool, params-shaped).
    time_cost: t_j per leaf (float32 scalars, > 0 on kernels).
    decrease: d, at most floor(d·n_l) active weights of kernel l leave the kept set.
    time_constant: κ > 0; c = κ·Σ_j t_j over every kernel entry.
    max_keep: at most this many kernel entries are kept in all.

  Returns the new bool mask; non-kernel leaves all True.
  """
  flags = jax.tree.leaves(_kernel_flags(params))
  ws, sqs, ms, ts = (jax.tree.leaves(x) for x in (params, sq_grads, mask, time_cost))
  decrease = jnp.asarray(decrease, jnp.float32)
  kept, sq, cost, sizes = [], [], [], []
  other = jnp.float32(0.0)
  total_time = jnp.float32(0.0)
  for is_k, w, s, m, t in zip(flags, ws, sqs, ms, ts):
    s = jnp.asarray(s, jnp.float32).ravel()
    if not is_k:
      other = other + jnp.sum(s)
      continue
    a = jnp.abs(jnp.asarray(w, jnp.float32)).ravel()
    m = jnp.asarray(m).ravel()
    n_active = jnp.sum(m, dtype=jnp.int32)
    drop = jnp.floor(decrease * n_active.astype(jnp.float32)).astype(jnp.int32)
    # The drop-th smallest active |w| (inf past the last one: nothing active is kept).
    ranked = jnp.sort(jnp.concatenate([jnp.where(m, a, jnp.inf), jnp.full((1,), jnp.inf)]))
    threshold = ranked[drop]
    kept.append(m & (a >= threshold))
    sq.append(s)
    cost.append(jnp.broadcast_to(jnp.asarray(t, jnp.float32), s.shape))
    sizes.append(a.size)
    total_time = total_time + jnp.asarray(t, jnp.float32) * a.size
  kept, sq, cost = (jnp.concatenate(x) for x in (kept, sq, cost))
  delta0 = jnp.sum(jnp.where(kept, sq, 0.0)) + other
  time0 = time_constant * total_time + jnp.sum(jnp.where(kept, cost, 0.0))
  importance = sq / cost
  candidate = ~kept
  order = jnp.argsort(jnp.where(candidate, -importance, jnp.inf), stable=True)
  s_sorted, t_sorted, r_sorted = sq[order], cost[order], importance[order]
  before = lambda x, x0: x0 + jnp.concatenate([jnp.zeros((1,), x.dtype), jnp.cumsum(x)[:-1]])
  improves = r_sorted > before(s_sorted, delta0) / before(t_sorted, time0)
  improves &= jnp.arange(kept.size) < jnp.sum(candidate, dtype=jnp.int32)
  added = jnp.sum(jnp.cumprod(improves.astype(jnp.int32)), dtype=jnp.int32)
  added = jnp.minimum(added, jnp.maximum(max_keep - jnp.sum(kept, dtype=jnp.int32), 0))
  grown = jnp.zeros(kept.shape, bool).at[order].set(jnp.arange(kept.size) < added)
  new_flat = kept | grown
  out, start = [], 0
  it = iter(sizes)
  for is_k, m in zip(flags, ms):
    if not is_k:
      out.append(jnp.ones(jnp.shape(m), bool))
      continue
    n = next(it)
    out.append(new_flat[start:start + n].reshape(jnp.shape(m)))
    start += n
  return jax.tree.unflatten(jax.tree.structure(mask), out)


@dataclasses.dataclass(frozen=True)
class PruneFL(MaskedTraining):
  """Adaptive pruning: initial pruning on one client, then mask readjustments every ΔR rounds
  from the clients' summed squared gradients (see the module docstring).

  Attributes:
    sparsity: s; the readjustments keep at most ceil((1 − s)·N) kernel entries.
    readjust_every: ΔR; rounds t with (t − 1) > 0 and (t − 1) mod ΔR = 0 readjust.
    max_decrease: d_0, the largest fraction of a layer's active weights a readjustment can
      drop; decays as d_0·0.5^((t − 1)/half_life).
    half_life: H, in rounds.
    time_cost: 'uniform' or 'layer_flops' (how t_j is modelled).
    time_constant: κ > 0, c = κ·Σ_j t_j of the dense kernels.
    init_rounds: R, reconfigurations of the initial pruning (0: none).
    init_steps: SGD steps on the probe batch before each initial reconfiguration.
    init_lr: their learning rate (the run's --lr).
  """
  sparsity: float = 0.3
  readjust_every: int = 50
  max_decrease: float = 0.3
  half_life: int = 10000
  time_cost: str = "uniform"
  time_constant: float = 0.14
  init_rounds: int = 5
  init_steps: int = 10
  init_lr: float = 0.02

  name = "prunefl"
  description = ("PruneFL: initial pruning on one client, then every prunefl_readjust_every "
                 "rounds the mask is readjusted from the clients' summed squared gradients, "
                 "adding weights by g^2/t while the risk reduction per unit time improves")
  sparse = True
  hyperparams = (
      Hyper("prunefl_readjust_every", 50, "PruneFL: ΔR, rounds between mask readjustments "
            "(rounds t with t-1 a positive multiple of ΔR).", low=1),
      Hyper("prunefl_max_decrease", 0.3, "PruneFL: d_0, the largest fraction of a layer's "
            "active weights one readjustment can remove (the code's MAX_DEC_DIFF).",
            low=0.0, high=1.0),
      Hyper("prunefl_half_life", 10000, "PruneFL: H, d = d_0 * 0.5^((t-1)/H) (the code's "
            "ADJ_HALF_LIFE).", low=1),
      Hyper("prunefl_time_cost", "uniform", "PruneFL: time cost t_j of a kept weight: "
            "uniform (1 each: dense hardware, where only sending a weight depends on the "
            "mask) or layer_flops (its layer's multiply-accumulates per weight and "
            "example).", choices=TIME_COSTS),
      Hyper("prunefl_time_constant", 0.14, "PruneFL: c, the round time no mask removes, as "
            "a fraction of the dense kernels' total time cost (0.14: the code's FEMNIST "
            "configuration).", low=0.0, include_low=False),
      Hyper("prunefl_init_rounds", 5, "PruneFL: reconfigurations of the initial pruning on "
            "one client (0 = start dense).", low=0),
      Hyper("prunefl_init_steps", 10, "PruneFL: SGD steps on the initial client's batch "
            "before each initial reconfiguration.", low=1),
  )
  metric_fields = {"nnz_params": None}

  def __post_init__(self):
    super().__post_init__()
    check_range("sparsity", self.sparsity, 0, 1, high_open=True)
    check_range("prunefl_readjust_every", self.readjust_every, 1)
    check_range("prunefl_max_decrease", self.max_decrease, 0, 1)
    check_range("prunefl_half_life", self.half_life, 1)
    check_range("prunefl_time_constant", self.time_constant, 0, low_open=True)
    check_range("prunefl_init_rounds", self.init_rounds, 0)
    check_range("prunefl_init_steps", self.init_steps, 1)
    check_range("init_lr", self.init_lr, 0, low_open=True)
    if self.time_cost not in TIME_COSTS:
      raise ValueError(f"prunefl_time_cost={self.time_cost!r} is not one of "
                       f"{list(TIME_COSTS)}")

  @classmethod
  def from_config(cls, config) -> "PruneFL":
    h = lambda name: cls.hyper(config, name)
    return cls(sparsity=config.sparsity, readjust_every=h("prunefl_readjust_every"),
               max_decrease=h("prunefl_max_decrease"), half_life=h("prunefl_half_life"),
               time_cost=h("prunefl_time_cost"), time_constant=h("prunefl_time_constant"),
               init_rounds=h("prunefl_init_rounds"), init_steps=h("prunefl_init_steps"),
               init_lr=config.lr)

  # ---- schedule ----------------------------------------------------------------------------
  def round_phase(self, t: int) -> str:
    return READJUST if t > 1 and (t - 1) % self.readjust_every == 0 else TRAIN

  def decrease(self, t: Scalar) -> jax.Array:
    """d of the readjustment in round t: d_0·0.5^((t − 1)/H)."""
    idx = jnp.asarray(t, jnp.float32) - 1.0
    return jnp.float32(self.max_decrease) * jnp.power(jnp.float32(0.5), idx / self.half_life)

  def max_keep(self, params: Params) -> int:
    """The cap ceil((1 − s)·N) on the kept kernel entries."""
    return topk.num_to_keep(masks_lib.size(params, is_kernel), 1.0 - self.sparsity)

  def readjust(self, params: Params, sq_grads: PyTree, state: PruneFLState, decrease
               ) -> PyTree:
    """The new mask from `params`' magnitudes and the summed squared gradients."""
    return readjust_masks(params, sq_grads, state.mask, state.time_cost, decrease,
                          self.time_constant, self.max_keep(params))

  # ---- server ------------------------------------------------------------------------------
  def init_state(self, params: Params) -> PruneFLState:
    return PruneFLState(masks_lib.keep_all(params), uniform_time_cost(params))

  def init_from_data(self, params: Params, algo_state: PruneFLState, loss_fn,
                     key: PRNGKey) -> Tuple[Params, PruneFLState]:
    del key
    cost = (layer_flops_time_cost(params, loss_fn) if self.time_cost == "layer_flops"
            else uniform_time_cost(params))
    state = algo_state._replace(time_cost=cost)
    if self.init_rounds == 0:
      return params, state

    def sgd(carry, _):
      w, acc, mask = carry
      g = jax.grad(loss_fn)(w)
      acc = jax.tree.map(lambda a, x: a + jnp.square(x.astype(jnp.float32)), acc, g)
      w = jax.tree.map(lambda p, x, m: p - self.init_lr * jnp.where(m, x, 0).astype(p.dtype),
                       w, g, mask)
      return (w, acc, mask), None

    def reconfigure(carry, _):
      w, mask = carry
      acc = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), w)
      (w, acc, _), _ = jax.lax.scan(sgd, (w, acc, mask), None, length=self.init_steps)
      mask = self.readjust(w, acc, state._replace(mask=mask), self.max_decrease)
      return (masks_lib.apply_masks(w, mask), mask), None

    (params, mask), _ = jax.lax.scan(reconfigure, (params, state.mask), None,
                                     length=self.init_rounds)
    return params, state._replace(mask=mask)

  def upload_stats(self, upload: Upload) -> Tuple[PyTree, PyTree]:
    # The squared gradients are summed over the clients, unweighted (see the docstring).
    if self.phase == READJUST:
      return upload.values, upload.extras
    return upload.values, ()

  def finalize_state(self, global_params: Params, mean: PyTree, counts: PyTree,
                     num_clients: int, algo_state: PruneFLState, t: Scalar) -> PruneFLState:
    del global_params, num_clients
    if self.phase != READJUST:
      return algo_state
    return algo_state._replace(mask=self.readjust(mean, counts, algo_state, self.decrease(t)))

  def server_post(self, params: Params, algo_state: PruneFLState, t: Scalar
                  ) -> tuple[Params, PruneFLState]:
    del t
    return masks_lib.apply_masks(params, algo_state.mask), algo_state

  server_metrics = nnz_server_metrics

  # ---- client ------------------------------------------------------------------------------
  def _mask(self, client_state: PyTree) -> PyTree:
    return client_state[0] if self.phase == READJUST else client_state

  def client_init(self, global_params: Params, algo_state: AlgoState, t: Scalar,
                  key) -> PyTree:
    del global_params, t, key
    if self.phase == READJUST:   # (mask, Σ g² so far)
      return algo_state.mask, jax.tree.map(
          lambda m: jnp.zeros(jnp.shape(m), jnp.float32), algo_state.mask)
    return algo_state.mask

  def transform_grads(self, grads: Params, params: Params, client_state: PyTree) -> Params:
    del params
    return masks_lib.apply_masks(grads, self._mask(client_state))

  def local_update(self, grads: Params, params: Params, opt_state: PyTree,
                   client_state: PyTree, step: Any
                   ) -> Tuple[Params, Params, PyTree, PyTree]:
    if self.phase == READJUST:   # the dense gradient, pruned weights included
      mask, acc = client_state
      acc = jax.tree.map(lambda a, g: a + jnp.square(g.astype(jnp.float32)), acc, grads)
      client_state = (mask, acc)
    return super().local_update(grads, params, opt_state, client_state, step)

  def post_step(self, params: Params, opt_state: PyTree, client_state: PyTree
                ) -> tuple[Params, PyTree, PyTree]:
    return masks_lib.apply_masks(params, self._mask(client_state)), opt_state, client_state

  def client_upload(self, global_params: Params, local_params: Params, client_state: PyTree,
                    t: Scalar) -> Upload:
    del global_params, t
    values = masks_lib.apply_masks(local_params, self._mask(client_state))
    if self.phase == READJUST:
      return Upload(values, extras=client_state[1])
    return Upload(values)
