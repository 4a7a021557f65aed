"""FLASH (Babakniya, Kundu, Prakash, Niu and Avestimehr, "Revisiting Sparsity Hunting in
Federated Learning: Why does Sparsity Consensus Matter?", TMLR 2023; official PyTorch code:
github.com/SaraBabakN/flash_fl, read for the facts below).

FLASH first lets a few clients "hunt" for per-layer densities (stage 1), then trains one
sparse model whose mask all clients share (stage 2). d = 1 − --sparsity is the density of
the pruned layers; N their number of weights.

Pruned layers (`--sparse_layers`): 'default' is every conv kernel for ResNet-18 (the paper
and the code's mask files: the stem, every 3×3 and every 1×1 shortcut conv, not the
classifier) and every conv/dense kernel (`tree_paths.is_kernel`) for the other models;
'all' = every kernel, 'conv' = every conv kernel, 'middle' = every kernel but the first and
the last in call order (the code's MNIST setting), or a comma-separated list of layer paths.
Biases, BatchNorm and the other kernels are never pruned.

Stage 1, round 1 (its own compiled round: `round_phase(1) = 'hunt'`):
* The server draws a random mask M0 at density d, uniform per layer: k_l = ceil(d·n_l)
  positions of layer l chosen uniformly at random (the code draws each entry with
  probability d, so its counts are d·n_l only in expectation).
* max(1, int(flash_init_frac · --num_clients)) clients (the code's
  `max(int(init_frac * num_users), 1)`) train `flash_init_epochs` local epochs from the
  initial model masked by M0, with the code's dynamic sparse training (below), and send
  their masks (1 bit per entry of the pruned layers; the weights they trained are discarded,
  so none are sent: the values upload is zero; BatchNorm statistics travel as in every
  round).
* The server averages each layer's density over those clients, δ_l = mean_k nnz_k,l / n_l
  (unweighted, as the code), rescales them to the budget, δ'_l = min(1, δ_l · d·N /
  Σ_l δ_l·n_l), RE-INITIALISES the model and masks it at random with exactly
  ceil(δ'_l · n_l) weights in layer l (the code again draws entries with probability δ'_l).
  The fresh initialisation (the code builds a new model) redraws every conv/dense kernel
  with the layers' own initialiser (`models.layers.Dense/Conv.kernel_init`, LeCun normal;
  every model here uses it), from a key derived from the run's init key
  (`init_from_data` hands one, stored in the server state); biases and BatchNorm
  scale/offset return to their initial values. BatchNorm running statistics are not reset
  (the contract gives a method no hook on them; they are the stage-1 clients' mean and are
  replaced by training within the first rounds, momentum 0.9 per step).
Stage 2, rounds t ≥ 2, `--flash_mode`:
* spdst: the mask stays fixed; clients train inside it (masked gradients, the mask re-applied
  after every optimizer step) and the server averages (FedAvg).
* jmwst: in rounds with (t − 2) mod r_int = 0 (r_int = `flash_update_interval`; the code's
  0-based `round_idx % r_int == 0`) clients run the dynamic sparse training from the server
  mask for the run's --local_epochs and send their masks with their weights; the server
  averages the weights and recomputes the mask: layer l keeps the
  floor(ν_l · min(1, d·N / Σ_l ν_l)) largest |w| of the average, ν_l = mean_k nnz_k,l
  (the code's `get_next_round_mask`, 'avg' sensitivity; ties by position). In the other
  rounds clients train inside the server mask, like spdst.

Dynamic sparse training of one client (the code's `core.Masking`, sparse momentum's
magnitude-prune / random-regrow with layer redistribution by mean |w|): plain masked SGD;
the prune rate starts at p = `flash_prune_rate` (0.25) and falls linearly to 0 over the
client's T = E·ceil(n_k/B) real steps (after s steps it is p·(T − s)/T). The mask is
readjusted ("truncate_weights") after the last real batch of every epoch but the last, or,
with E = 1, after batch ceil(n_k/B) // 2 of the epoch; the client's own n_k comes from the
`client_examples` hook. With E > 1 the readjustment runs in `forward`, right before the first
batch of the next epoch: the same point of the client's schedule (that batch trains at the
readjusted weights), and one every client reaches at the same step, so it stays a real
`lax.cond` under vmap. With E = 1 it runs in `post_step` after the client's own middle
batch: a per-client predicate, which vmap turns into a select computed at every local step
(selections are bisections over float bit patterns, not sorts, to keep that cheap).
Measured on CPU, fmnist_fc, 10 clients of 6000 examples, JMWST with E = 1: 13.8 s per round
under --client_map=vmap against 0.8 s under map, identical results; the flagfiles use map.
One readjustment over the pruned layers l:
1. v_l = mean |w| over layer l's mask, normalised to sum 1 (an empty layer gets 0: the code
   stops with an error there); nnz_l, zeros_l = n_l − nnz_l.
2. Layer prune rate p_l = p, or min(p, zeros_l/n_l) for a layer denser than 80 % whose v_l
   exceeds 1/L.
3. Prune: r_l = ceil(p_l·nnz_l) (0: the mask becomes the non-zero pattern of w); keep the
   nnz_l − r_l largest |w| of the mask (ties by position). R = Σ removed.
4. Regrowth budget: g_l = ceil(v_l·(R + A)), A the adjusted growth below; capped at
   c_l = 0.99·(zeros_l + r_l) with the overflow spread evenly over the layers until none is
   left (the code's iterative residual loop, solved here in closed form: g_l ← min(g_l + Δ,
   c_l) with Δ ≥ 0 such that the total is unchanged, or every layer at its cap when it
   cannot be).
5. Regrow floor(g_l) positions chosen uniformly at random among the layer's zeros (the code
   draws each zero with probability floor(g_l)/#zeros: the same count in expectation; here
   exactly). Regrown weights start at 0; a pruned weight regrown at once keeps its value.
6. A ← 0.25·A + 0.75·a + mean(a's so far), a = d·N − (new total nnz) (per client and round,
   starting at 0, as the code's Masking object).

Where this departs from the code, besides the exact counts above: the server averages
example-weighted (the engine's FedAvg; the code's `average_weights` is unweighted: the same
for its equal-size LDA clients); the server masks the new global model itself (the code
broadcasts the denser average and each client masks it on receipt: the same training, but
evaluation and the downlink here see the sparse model); --rounds counts stage 1 as round 1
(the paper's 600 rounds are --rounds=601), so the exponential LR schedule is 3 rounds ahead
of the code's (it updates the LR after each round and not in stage 1); hetero-FLASH and the
'aggregate' sensitivity are not implemented. FLASH runs with --server_optimizer=none (the
code's FedAvg): stage 1 replaces the model.

The mask of a new global model reaches the server state as the non-zero pattern of the
candidate `finalize_aggregate` returns (a kept weight that is exactly 0 there is stored as
the smallest normal float32, 1.2e-38, so that it stays in the mask).

`--flash_variant=sparsyfed` is SparsyFed's re-implementation (Guastella et al., ICLR 2025,
their FedAvgFLASH): in round 1 the run's cohort trains dense for `flash_init_epochs`, each
client keeps the global top (1 − s) of its pruned layers' |w| before upload; the server
averages the weights, keeps in each layer the int(n_l·δ_l) largest |w| (δ_l the
example-weighted mean client density, ties kept) and then the global top d of the pruned
layers (ties kept); that mask is fixed (spdst) and nothing is re-initialised. Later rounds
train inside it (their clients mask the gradients where the weight is 0 and prune to s
again after training, a no-op then). Their code thresholds every parameter array, BatchNorm
included; here only the pruned layers.
"""
import dataclasses
from typing import Any, List, NamedTuple, Sequence, Tuple

import jax
import jax.numpy as jnp

from sparsefl_jax.algorithms.base import Phase, Upload, nnz_server_metrics
from sparsefl_jax.algorithms.hyper import Hyper
from sparsefl_jax.algorithms.masked import MaskedTraining
from sparsefl_jax.config import ConfigError
from sparsefl_jax.models import layers as layers_lib
from sparsefl_jax.sparsity import masks as masks_lib
from sparsefl_jax.sparsity import topk
from sparsefl_jax.traceable import check_range
from sparsefl_jax.tree_paths import is_kernel, kernel_layer, path_str, weight_layers
from sparsefl_jax.types import AlgoState, Params, PRNGKey, PyTree, Scalar

HUNT, DST, FIXED = "hunt", "dst", "fixed"
MODES = ("spdst", "jmwst")
VARIANTS = ("original", "sparsyfed")
_SNAP = 2.0**-21          # float32 snapping of counts, as `sparsity.topk.num_to_keep`
# Purpose tags folded into the server key (init_from_data's key).
_TAG_MASK0, _TAG_FRESH, _TAG_MASK1 = 0, 1, 2


class FlashState(NamedTuple):
  """Server state: the global mask (bool, params-shaped; unpruned leaves all True) and the
  server's key (from `init_from_data`, derived from the run's init key)."""
  mask: PyTree
  key: jax.Array


class DSTState(NamedTuple):
  """One client's dynamic sparse training: its mask (params-shaped), its key, ceil(n_k/B),
  the pending readjustment (flag, prune rate, real step count s) and the adjusted growth A
  with the sum and count of the adjustments so far."""
  mask: PyTree
  key: jax.Array
  batches: jax.Array
  truncate: jax.Array
  rate: jax.Array
  step: jax.Array
  adjusted: jax.Array
  adj_sum: jax.Array
  adj_count: jax.Array


def ceil_count(x: jax.Array) -> jax.Array:
  """ceil(x) of a float32 count, snapped onto an integer within float rounding (int32)."""
  x = jnp.asarray(x, jnp.float32)
  tol = jnp.minimum(jnp.abs(x) * _SNAP, 0.25)
  return jnp.ceil(x - tol).astype(jnp.int32)


def floor_count(x: jax.Array) -> jax.Array:
  """floor(x) of a float32 count, snapped onto an integer within float rounding (int32)."""
  x = jnp.asarray(x, jnp.float32)
  tol = jnp.minimum(jnp.abs(x) * _SNAP, 0.25)
  return jnp.floor(x + tol).astype(jnp.int32)


def redistribute(growth: jax.Array, cap: jax.Array) -> jax.Array:
  """The code's residual loop in closed form: min(growth + Δ, cap), Δ ≥ 0 the smallest
  shift that keeps the total (the overflow over the caps spread evenly, again and again);
  every layer at its cap when the caps cannot hold the total. Vectors over the layers."""
  head = cap - growth                          # room left; < 0: overflow
  n = head.shape[0]
  hs = jnp.sort(head)
  below = jnp.cumsum(hs) - hs                  # Σ of the j smallest, j = 0..n-1
  j = jnp.arange(n)
  shift = -below / (n - j).astype(jnp.float32)   # Δ with the j smallest capped
  lower = jnp.concatenate([jnp.full((1,), -jnp.inf, hs.dtype), hs[:-1]])
  valid = (shift >= lower) & (shift <= hs)
  delta = jnp.where(jnp.any(valid), shift[jnp.argmax(valid)], jnp.inf)
  return jnp.minimum(growth + jnp.maximum(delta, 0.0), cap)


def keep_largest(score: jax.Array, candidates: jax.Array, count) -> jax.Array:
  """The `count` (int, may be traced) candidates with the largest non-negative score, ties
  by position (the lower index first): `feddst.keep_largest`'s result without a sort.

  The count-th largest score comes from `sparsity.topk`'s 32-pass bisection over float bit
  patterns (non-candidates are set to -1, below every candidate), then the ties at it are
  taken in position order. A few passes over the layer instead of an argsort: under vmap a
  per-client readjustment (E = 1) runs at every local step as a select, so this is what
  those steps cost.
  """
  x = jnp.where(candidates, jnp.asarray(score, jnp.float32), -1.0)
  count = jnp.asarray(count, jnp.int32)
  thr = topk.kth_largest([x], count, "bisection")
  above = x > thr
  tie = (x == thr).ravel()
  room = count - jnp.sum(above, dtype=jnp.int32)
  first = (jnp.cumsum(tie, dtype=jnp.int32) <= room).reshape(x.shape)
  return above | (tie.reshape(x.shape) & first)


def random_subset(key: PRNGKey, candidates: jax.Array, count) -> jax.Array:
  """`count` positions of `candidates` (bool) chosen uniformly at random."""
  return keep_largest(jax.random.uniform(key, candidates.shape), candidates, count)


class Truncation(NamedTuple):
  """What one readjustment produced (for the client state and for tests)."""
  masks: List[jax.Array]     # new masks of the pruned layers
  removed: jax.Array         # (L,) int32 weights pruned per layer
  regrown: jax.Array         # (L,) int32 weights regrown per layer
  adjusted: jax.Array
  adj_sum: jax.Array
  adj_count: jax.Array


def truncate(weights: Sequence[jax.Array], masks: Sequence[jax.Array], rate, adjusted,
             adj_sum, adj_count, baseline: float, key: PRNGKey) -> Truncation:
  """One readjustment of the pruned layers' masks (steps 1-6 of the module docstring).

  `weights` are the (masked) weights of the pruned layers, `masks` their masks, `rate` the
  decayed prune rate p, `baseline` = d·N; (adjusted, adj_sum, adj_count) the adjusted growth.
  """
  ws = [jnp.asarray(w) for w in weights]
  ms = [jnp.asarray(m, bool) for m in masks]
  num = len(ws)
  size_i = jnp.asarray([w.size for w in ws], jnp.int32)
  size = size_i.astype(jnp.float32)
  nnz = jnp.stack([jnp.sum(m, dtype=jnp.int32) for m in ms])
  nnz_f = nnz.astype(jnp.float32)
  zeros = size - nnz_f
  mean_abs = jnp.stack([jnp.sum(jnp.where(m, jnp.abs(w), 0.0).astype(jnp.float32))
                        for w, m in zip(ws, ms)]) / jnp.maximum(nnz_f, 1.0)
  mean_abs = jnp.where(nnz > 0, mean_abs, 0.0)
  total = jnp.sum(mean_abs)
  share = jnp.where(total != 0, mean_abs / jnp.where(total != 0, total, 1.0), mean_abs)
  sparsity = zeros / size
  rate = jnp.asarray(rate, jnp.float32)
  rates = jnp.where((sparsity < 0.2) & (share > 1.0 / num), jnp.minimum(sparsity, rate), rate)
  num_remove = ceil_count(rates * nnz_f)
  pruned = [jnp.where(r == 0, w != 0, keep_largest(jnp.abs(w), m, k - r))
            for w, m, k, r in zip(ws, ms, nnz, num_remove)]
  kept = jnp.stack([jnp.sum(m, dtype=jnp.int32) for m in pruned])
  removed = nnz - kept
  adjusted = jnp.asarray(adjusted, jnp.float32)
  growth = ceil_count(share * (jnp.sum(removed).astype(jnp.float32) + adjusted))
  cap = 0.99 * (zeros + num_remove.astype(jnp.float32))
  budget = floor_count(redistribute(growth.astype(jnp.float32), cap))
  free = size_i - kept
  regrown = jnp.clip(budget, 0, free)
  new = [m | random_subset(jax.random.fold_in(key, l), ~m, g)
         for l, (m, g) in enumerate(zip(pruned, regrown))]
  adjustment = jnp.float32(baseline) - jnp.sum(kept + regrown).astype(jnp.float32)
  adj_sum = jnp.asarray(adj_sum, jnp.float32) + adjustment
  adj_count = jnp.asarray(adj_count, jnp.int32) + 1
  adjusted = 0.25 * adjusted + 0.75 * adjustment + adj_sum / adj_count.astype(jnp.float32)
  return Truncation(new, removed, regrown, adjusted, adj_sum, adj_count)


@dataclasses.dataclass(frozen=True)
class FLASH(MaskedTraining):
  """Sparsity hunting (stage 1), then SPDST (fixed mask) or JMWST (DST + server mask).

  Attributes:
    sparsity: s; the pruned layers keep d = 1 − s of their weights.
    mode: 'spdst' or 'jmwst' (stage 2).
    init_frac, init_epochs: stage 1's cohort fraction and local epochs.
    prune_rate: the DST's initial prune rate p (linearly annealed to 0 over local training).
    update_interval: r_int, JMWST's rounds between server-mask updates.
    num_clients: the run's client count (stage 1's cohort is a fraction of it).
    batch_size: B, for a client's ceil(n_k/B) batches per epoch.
    local_epochs: stage 2's local epochs (JMWST's DST schedule).
    layers: which kernels are pruned: 'all', 'conv', 'middle' or comma-separated paths.
    variant: 'original' or 'sparsyfed' (SparsyFed's re-implementation).
    scope: the pruned layers' module paths (bound by `setup`).
  """
  sparsity: float = 0.95
  mode: str = "spdst"
  init_frac: float = 0.1
  init_epochs: int = 10
  prune_rate: float = 0.25
  update_interval: int = 1
  num_clients: int = 100
  batch_size: int = 32
  local_epochs: int = 1
  layers: str = "all"
  variant: str = "original"
  scope: Tuple[str, ...] = ()

  name = "flash"
  description = ("FLASH: a few clients hunt per-layer densities with DST, the server "
                 "re-initialises and masks the model; then a fixed mask (spdst) or DST with "
                 "server masks (jmwst)")
  sparse = True
  reads_sparse_layers = True
  needs_setup = True
  hyperparams = (
      Hyper("flash_mode", "spdst", "FLASH stage 2: spdst (fixed mask) or jmwst (clients run "
            "DST, the server recomputes the mask every flash_update_interval rounds).",
            choices=MODES),
      Hyper("flash_init_frac", 0.1, "FLASH: fraction of --num_clients that hunt densities in "
            "round 1 (at least one).", low=0.0, high=1.0, include_low=False),
      Hyper("flash_init_epochs", 10, "FLASH: local epochs of round 1 (stage 1).", low=1),
      Hyper("flash_prune_rate", 0.25, "FLASH: initial DST prune rate, linearly annealed to "
            "0 over a client's local steps.", low=0.0, high=1.0),
      Hyper("flash_update_interval", 1, "FLASH jmwst: r_int, the server recomputes the mask "
            "in rounds t with (t - 2) % r_int == 0 (clients run DST there).", low=1),
      Hyper("flash_variant", "original", "FLASH: original (the authors' code) or sparsyfed "
            "(SparsyFed's re-implementation: dense round 1, layer densities, global "
            "threshold, fixed mask, no re-initialisation).", choices=VARIANTS),
  )
  metric_fields = {"nnz_params": None}

  def __post_init__(self):
    super().__post_init__()
    check_range("sparsity", self.sparsity, 0, 1, low_open=True, high_open=True)
    if self.mode not in MODES:
      raise ConfigError(f"flash_mode={self.mode!r} is not one of {list(MODES)}")
    if self.variant not in VARIANTS:
      raise ConfigError(f"flash_variant={self.variant!r} is not one of {list(VARIANTS)}")
    if self.variant == "sparsyfed" and self.mode != "spdst":
      raise ConfigError(f"flash_mode={self.mode!r} with flash_variant='sparsyfed': SparsyFed's "
                        "re-implementation fixes the mask after round 1; use flash_mode=spdst")
    check_range("flash_init_frac", self.init_frac, 0, 1, low_open=True)
    check_range("flash_init_epochs", self.init_epochs, 1)
    check_range("flash_prune_rate", self.prune_rate, 0, 1)
    check_range("flash_update_interval", self.update_interval, 1)
    check_range("num_clients", self.num_clients, 1)
    check_range("batch_size", self.batch_size, 1)
    check_range("local_epochs", self.local_epochs, 1)

  @classmethod
  def from_config(cls, config) -> "FLASH":
    server = config.resolved_server_optimizer(cls.default_server_optimizer)
    if server != "none":
      raise ConfigError(f"server_optimizer={server!r} with algorithm='flash': FLASH averages "
                        "with FedAvg and replaces the model after stage 1; use "
                        "--server_optimizer=none")
    layers = config.sparse_layers
    if layers == "default":
      layers = "conv" if config.model == "resnet18" else "all"
    return cls(sparsity=config.sparsity, mode=cls.hyper(config, "flash_mode"),
               init_frac=cls.hyper(config, "flash_init_frac"),
               init_epochs=cls.hyper(config, "flash_init_epochs"),
               prune_rate=cls.hyper(config, "flash_prune_rate"),
               update_interval=cls.hyper(config, "flash_update_interval"),
               num_clients=config.num_clients, batch_size=config.batch_size,
               local_epochs=config.local_epochs, layers=layers,
               variant=cls.hyper(config, "flash_variant"))

  @property
  def density(self) -> float:
    return 1.0 - self.sparsity

  # ---- set-up: which layers are pruned ------------------------------------------------------
  def setup(self, params: Params, layer_order: Tuple[str, ...]):
    found = weight_layers(params, layer_order)
    spec = self.layers
    if spec == "all":
      scope = tuple(found)
    elif spec == "conv":
      scope = tuple(p for p, shape in found.items() if len(shape) >= 3)
    elif spec == "middle":
      scope = tuple(found)[1:-1]
    else:
      scope = tuple(s.strip() for s in spec.split(",") if s.strip())
      unknown = [s for s in scope if s not in found]
      if unknown:
        raise ConfigError(f"sparse_layers={spec!r} names unknown layers {unknown}; accepted: "
                          f"'default', 'all', 'conv', 'middle' or paths among {list(found)}")
    if not scope:
      raise ConfigError(f"sparse_layers={spec!r} selects no layer of this model (its weight "
                        f"layers: {list(found)})")
    return self.bind(scope=scope), None

  def pruned(self, tree: PyTree) -> List[bool]:
    """Per leaf of `tree` (params or a mask), in flatten order: is it a pruned kernel."""
    self.require_bound("pruned")
    return [is_kernel(path_str(p), x) and kernel_layer(path_str(p)) in self.scope
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]

  def pruned_leaves(self, tree: PyTree) -> List[jax.Array]:
    return [x for x, s in zip(jax.tree.leaves(tree), self.pruned(tree)) if s]

  def with_pruned(self, tree: PyTree, new: Sequence[jax.Array]) -> PyTree:
    """`tree` with its pruned leaves replaced by `new` (in order)."""
    leaves, treedef = jax.tree.flatten(tree)
    it = iter(new)
    return jax.tree.unflatten(treedef, [next(it) if s else x
                                        for x, s in zip(leaves, self.pruned(tree))])

  def sizes(self, params: Params) -> List[int]:
    return [int(x.size) for x in self.pruned_leaves(params)]

  def full_mask(self, params: Params, pruned_masks: Sequence[jax.Array]) -> PyTree:
    """A params-shaped mask: `pruned_masks` on the pruned kernels, all True elsewhere."""
    return self.with_pruned(masks_lib.keep_all(params), pruned_masks)

  def random_masks(self, params: Params, counts: Sequence[Any], key: PRNGKey
                   ) -> List[jax.Array]:
    """Masks of the pruned layers: layer l keeps counts[l] positions chosen uniformly at
    random."""
    ones = [jnp.ones(jnp.shape(x), bool) for x in self.pruned_leaves(params)]
    return [random_subset(jax.random.fold_in(key, l), m, k)
            for l, (m, k) in enumerate(zip(ones, counts))]

  def masked_visible(self, params: Params, pruned_masks: Sequence[jax.Array]) -> Params:
    """`params` with its pruned layers masked, a kept exact 0 stored as the smallest normal
    float (so the pruned layers' non-zero pattern is exactly the mask: `server_post` reads
    it back into the server state)."""
    def one(w, m):
      tiny = jnp.asarray(jnp.finfo(w.dtype).tiny, w.dtype)
      return jnp.where(m, jnp.where(w == 0, tiny, w), jnp.zeros_like(w))
    return self.with_pruned(params, [one(w, m) for w, m in zip(self.pruned_leaves(params),
                                                               pruned_masks)])

  # ---- round phases ---------------------------------------------------------------------------
  def round_phase(self, t: int) -> str:
    if t <= 1:
      return HUNT
    if self.mode == "jmwst" and (t - 2) % self.update_interval == 0:
      return DST
    return FIXED

  def phase_settings(self, phase: str) -> Phase:
    if phase != HUNT:
      return Phase()
    if self.variant == "sparsyfed":
      return Phase(local_epochs=self.init_epochs)
    return Phase(clients_per_round=max(int(self.init_frac * self.num_clients), 1),
                 local_epochs=self.init_epochs)

  @property
  def runs_dst(self) -> bool:
    """Whether this phase's clients run dynamic sparse training."""
    return self.phase == DST or (self.phase == HUNT and self.variant == "original")

  @property
  def phase_epochs(self) -> int:
    return self.init_epochs if self.phase == HUNT else self.local_epochs

  # ---- server ---------------------------------------------------------------------------------
  def init_state(self, params: Params) -> FlashState:
    return FlashState(masks_lib.keep_all(params), jnp.zeros((2,), jnp.uint32))

  def init_from_data(self, params: Params, algo_state: AlgoState, loss_fn, key: PRNGKey
                     ) -> Tuple[Params, FlashState]:
    """Not a pruning from data: the contract's one pre-round-1 hook with a key derived from
    the init seed. Stores it (the fresh initialisation of stage 1 needs it) and masks the
    model with M0 (SparsyFed's variant starts dense)."""
    del algo_state, loss_fn
    key = jnp.asarray(key, jnp.uint32)
    if self.variant == "sparsyfed":
      return params, FlashState(masks_lib.keep_all(params), key)
    counts = [topk.num_to_keep(n, self.density) for n in self.sizes(params)]
    mask = self.full_mask(params, self.random_masks(params, counts,
                                                    jax.random.fold_in(key, _TAG_MASK0)))
    return masks_lib.apply_masks(params, mask), FlashState(mask, key)

  def upload_stats(self, upload: Upload) -> Tuple[PyTree, PyTree]:
    if self.phase == FIXED:
      return upload.values, ()
    if self.variant == "sparsyfed":   # example-weighted layer densities
      dens = tuple(jnp.mean(v != 0, dtype=jnp.float32)
                   for v in self.pruned_leaves(upload.values))
      return (upload.values, dens), ()
    return upload.values, tuple(jnp.sum(m, dtype=jnp.int32) for m in upload.mask)

  def finalize_aggregate(self, global_params: Params, mean: PyTree, counts: PyTree,
                         num_clients: int, algo_state: FlashState, t: Scalar) -> Params:
    del t
    if self.phase == FIXED:
      return mean
    if self.variant == "sparsyfed":
      return self.sparsyfed_mask_model(*mean)
    mean_nnz = [c.astype(jnp.float32) / num_clients for c in counts]
    if self.phase == HUNT:
      return self.hunted_model(global_params, mean_nnz, algo_state.key)
    return self.jmwst_model(mean, mean_nnz)

  def hunted_counts(self, sizes: Sequence[int], mean_nnz: Sequence[jax.Array]) -> List[Any]:
    """Stage 1: k_l = ceil(min(1, δ_l·d·N / Σ δ_l·n_l)·n_l), δ_l = mean_nnz_l / n_l."""
    total = sum(mean_nnz)
    ratio = jnp.where(total > 0, self.density * sum(sizes) / jnp.where(total > 0, total, 1.0),
                      0.0)
    out = []
    for n, m in zip(sizes, mean_nnz):
      dens = jnp.where(total > 0, jnp.minimum(m / n * ratio, 1.0), self.density)
      out.append(topk.num_to_keep(n, dens))
    return out

  def hunted_model(self, global_params: Params, mean_nnz: Sequence[jax.Array], key
                   ) -> Params:
    """A fresh initialisation masked at random with the hunted layer counts."""
    counts = self.hunted_counts(self.sizes(global_params), mean_nnz)
    masks = self.random_masks(global_params, counts, jax.random.fold_in(key, _TAG_MASK1))
    return self.masked_visible(fresh_init(global_params, jax.random.fold_in(key, _TAG_FRESH)),
                               masks)

  def jmwst_counts(self, sizes: Sequence[int], mean_nnz: Sequence[jax.Array]) -> List[Any]:
    """JMWST: floor(ν_l · min(1, d·N / Σ ν_l)), ν_l = mean_nnz_l (at most n_l)."""
    total = sum(mean_nnz)
    ratio = jnp.minimum(1.0, self.density * sum(sizes) / jnp.maximum(total, 1e-30))
    return [jnp.minimum(floor_count(m * ratio), n) for n, m in zip(sizes, mean_nnz)]

  def jmwst_model(self, mean: Params, mean_nnz: Sequence[jax.Array]) -> Params:
    """The average masked by the top-|w| of each layer with the clients' mean counts."""
    leaves = self.pruned_leaves(mean)
    counts = self.jmwst_counts(self.sizes(mean), mean_nnz)
    return self.masked_visible(mean, [
        keep_largest(jnp.abs(w), jnp.ones(w.shape, bool), k) for w, k in zip(leaves, counts)])

  def sparsyfed_mask_model(self, mean: Params, dens: Sequence[jax.Array]) -> Params:
    """SparsyFed's round 1: layer l keeps the int(n_l·δ_l) largest |w| (ties kept), then the
    global top d of the pruned layers if the density is off by more than 1e-6 (ties kept)."""
    leaves = self.pruned_leaves(mean)
    kept = []
    for w, d in zip(leaves, dens):
      k = floor_count(d * w.size)
      thr = topk.kth_largest([topk.abs32(w)], k, "bisection")
      kept.append(jnp.where((k < w.size) & (topk.abs32(w) < thr), 0.0, w).astype(w.dtype))
    total = sum(int(w.size) for w in kept)
    nnz = sum(jnp.sum(w != 0, dtype=jnp.int32) for w in kept)
    off = jnp.abs(1.0 - nnz.astype(jnp.float32) / total - self.sparsity) > 1e-6
    thr = topk.kth_largest([topk.abs32(w) for w in kept], int(total * self.density),
                           "bisection")
    kept = [jnp.where(off & (topk.abs32(w) < thr), 0.0, w).astype(w.dtype) for w in kept]
    return self.with_pruned(mean, kept)

  def server_post(self, params: Params, algo_state: FlashState, t: Scalar
                  ) -> Tuple[Params, FlashState]:
    del t
    if self.phase == FIXED:   # a no-op after FedAvg of masked clients
      return masks_lib.apply_masks(params, algo_state.mask), algo_state
    mask = self.full_mask(params, [w != 0 for w in self.pruned_leaves(params)])
    return params, algo_state._replace(mask=mask)

  server_metrics = nnz_server_metrics

  # ---- client -------------------------------------------------------------------------------
  def client_init(self, global_params: Params, algo_state: FlashState, t: Scalar,
                  key: PRNGKey) -> PyTree:
    del global_params, t
    if not self.runs_dst:
      return algo_state.mask     # masked training (SparsyFed's round 1: all True)
    zero_i, zero_f = jnp.zeros((), jnp.int32), jnp.zeros((), jnp.float32)
    return DSTState(algo_state.mask, key, zero_i, jnp.zeros((), bool), zero_f, zero_i,
                    zero_f, zero_f, zero_i)

  def client_examples(self, client_state: PyTree, num_examples: jax.Array) -> PyTree:
    if not self.runs_dst:
      return client_state
    batches = jnp.maximum(-(-jnp.asarray(num_examples, jnp.int32) // self.batch_size), 1)
    return client_state._replace(batches=batches)

  def readjust_schedule(self, step: Any, batches: jax.Array
                        ) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """(readjust at this step?, decayed prune rate p·(T − s)/T, real steps done s) of a client
    with `batches` = ceil(n_k/B) batches per epoch, at a real `step`.

    E > 1: the code readjusts after the client's last real batch of epochs 0..E−2, i.e.
    right before the first batch of epochs 1..E−1; that step is known to every client at
    once (an unbatched predicate: a real `lax.cond` under vmap too), and `forward` readjusts
    there, before the batch's forward pass (s = the steps before it). E = 1: after batch
    ceil(n_k/B) // 2 (s counts it), a per-client step: `post_step` readjusts there.
    """
    epochs = self.phase_epochs
    total = batches * epochs
    if epochs == 1:
      now, s = step.batch == batches // 2, step.batch + 1
    else:
      now, s = (step.batch == 0) & (step.epoch > 0), step.epoch * batches
    rate = (jnp.float32(self.prune_rate) * (total - s).astype(jnp.float32)
            / total.astype(jnp.float32))
    return now, rate, s

  def forward(self, model, params: Params, model_state: PyTree, x: jax.Array, *, train: bool,
              example_mask, rngs, client_state: PyTree, step: Any = None):
    if not (train and step is not None and self.runs_dst and self.phase_epochs > 1):
      return super().forward(model, params, model_state, x, train=train,
                             example_mask=example_mask, rngs=rngs, client_state=client_state,
                             step=step)
    # Readjust before this batch when it opens epochs 1..E-1: the batch then trains (and its
    # gradient is taken) at the readjusted weights, as after the code's truncate_weights.
    now, rate, s = self.readjust_schedule(step, client_state.batches)
    cs = client_state._replace(rate=rate, step=s)
    frozen = jax.lax.stop_gradient(params)
    cs = jax.lax.cond(now, lambda: self.readjust(frozen, cs)[1], lambda: cs)
    logits, new_state, _ = self.apply_model(model, masks_lib.apply_masks(params, cs.mask),
                                            model_state, x, train=train,
                                            example_mask=example_mask, rngs=rngs)
    return logits, new_state, cs

  def local_update(self, grads: Params, params: Params, opt_state: PyTree,
                   client_state: PyTree, step: Any) -> Tuple[Params, Params, PyTree, PyTree]:
    if not self.runs_dst:
      return super().local_update(grads, params, opt_state, client_state, step)
    if self.phase_epochs == 1:   # readjust after this step (post_step) at the client's middle
      now, rate, s = self.readjust_schedule(step, client_state.batches)
      client_state = client_state._replace(truncate=now, rate=rate, step=s)
    return masks_lib.apply_masks(grads, client_state.mask), params, opt_state, client_state

  def post_step(self, params: Params, opt_state: PyTree, client_state: PyTree
                ) -> Tuple[Params, PyTree, PyTree]:
    if not self.runs_dst:
      return super().post_step(params, opt_state, client_state)
    params = masks_lib.apply_masks(params, client_state.mask)
    if self.phase_epochs == 1:   # per client: under vmap a select computed at every step
      params, client_state = jax.lax.cond(
          client_state.truncate, lambda: self.readjust(params, client_state),
          lambda: (params, client_state))
    return params, opt_state, client_state

  def readjust(self, params: Params, cs: DSTState) -> Tuple[Params, DSTState]:
    """The code's `truncate_weights` on the client's pruned layers; params re-masked."""
    sizes = self.sizes(params)
    out = truncate(self.pruned_leaves(params), self.pruned_leaves(cs.mask), cs.rate,
                   cs.adjusted, cs.adj_sum, cs.adj_count, self.density * sum(sizes),
                   jax.random.fold_in(cs.key, cs.step))
    mask = self.with_pruned(cs.mask, out.masks)
    return masks_lib.apply_masks(params, mask), cs._replace(
        mask=mask, adjusted=out.adjusted, adj_sum=out.adj_sum, adj_count=out.adj_count)

  def client_upload(self, global_params: Params, local_params: Params, client_state: PyTree,
                    t: Scalar) -> Upload:
    del global_params, t
    if self.variant == "sparsyfed" and self.phase == HUNT:
      keep = topk.global_topk_masks(local_params, self.density,
                                    filter_fn=lambda p, x: self._is_pruned_path(p, x),
                                    method="bisection")
      return Upload(masks_lib.apply_masks(local_params, keep))
    if not self.runs_dst:
      return Upload(masks_lib.apply_masks(local_params, client_state))
    sent = tuple(self.pruned_leaves(client_state.mask))
    if self.phase == HUNT:   # stage 1 sends the masks only
      return Upload(jax.tree.map(jnp.zeros_like, local_params), sent, jnp.asarray(True))
    return Upload(masks_lib.apply_masks(local_params, client_state.mask), sent,
                  jnp.asarray(True))

  def _is_pruned_path(self, path: str, leaf: Any) -> bool:
    return is_kernel(path, leaf) and kernel_layer(path) in self.scope


def fresh_init(params: Params, key: PRNGKey) -> Params:
  """A fresh draw of every conv/dense kernel with the layers' initialiser (LeCun normal, as
  `models.layers.Conv`/`Dense` default to); other leaves as in `params` (their initial
  values when `params` is the initial model)."""
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  out = []
  for i, (p, x) in enumerate(leaves):
    if is_kernel(path_str(p), x):
      init = layers_lib.Conv.kernel_init if jnp.ndim(x) >= 3 else layers_lib.Dense.kernel_init
      out.append(init(jax.random.fold_in(key, i), jnp.shape(x), jnp.asarray(x).dtype))
    else:
      out.append(x)
  return jax.tree.unflatten(jax.tree.structure(params), out)
