"""The contract every federated algorithm implements: a frozen dataclass of small hooks.

The engine (`sparsefl_jax.federated.round`) calls the hooks in this order each round:

  server: broadcast(params, algo_state, t)                  -> what every sampled client receives
          client_context(global, algo_state, t)             -> what clients see of the server state
  client: client_init(global, context, t, key)              -> client_state (masks, thresholds, ...)
          client_examples(client_state, n_k)                 -> e.g. the client's batches per epoch
          for each local step (inside lax.scan):
            forward(...) + local_loss(...)                   -> loss; grads
            local_update(grads, params, opt_state,
                         client_state, step)                 -> e.g. masked grads, prune/regrow
            <client optax update>
            post_step(params, opt_state, client_state)       -> e.g. projection onto a mask
          client_upload(global, local, client_state, t)      -> Upload (what goes on the wire)
          upload_stats(upload)                               -> additive (weighted, counted) sums
          client_metrics(global, upload, client_state)       -> per-client scalars (weighted mean)
  server: finalize_aggregate(global, mean, counts, K, ...)   -> candidate model
          finalize_state(global, mean, counts, K, ...)       -> server state from the sums
          <server optax update towards the candidate>
          server_post(params, algo_state, t)                 -> e.g. pruning, new global masks

Once, before round 1: init_params(params, key), setup(params, layer_order), init_state(params)
and, for methods that prune from data (SNIP, GraSP), init_from_data(params, algo_state,
loss_fn, key) with the loss on one batch of one client.

Aggregation is a sum of per-client statistics (`upload_stats`: an example-weighted part and a
counted part) followed by `finalize_aggregate`: sums are associative, so the engine streams
them client by client under 'map'/'chunked' (memory flat in clients per round) and reduces
them across devices with one psum, for every method that does not override `aggregate`.

Every default reproduces FedAvg, so a method overrides only the hooks it changes (the way a
jaxpruner algorithm overrides one scoring hook). `t` is the unbatched 1-based round number:
schedules evaluated on it stay shared across clients, so `lax.cond` on it never computes both
branches under vmap. Per-client hooks run under the client map (vmap or lax.map): write them
for ONE client; the engine adds the client axis.
"""
import dataclasses
from typing import Any, Callable, ClassVar, Dict, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from sparsefl_jax.federated.aggregation import sum_dtype, weighted_mean
from sparsefl_jax.sparsity import masks
from sparsefl_jax.types import AlgoState, ClientState, Params, PRNGKey, PyTree, Scalar


class UnboundAlgorithmError(RuntimeError):
  """A hook that needs model facts ran on an algorithm that `setup()` did not bind."""


class Upload(NamedTuple):
  """What one client sends. `values` has the params' structure; entries it does not send are 0.

  `values` holds weights when the algorithm's `uplink` is 'weights' and weight differences
  (local − global) when it is 'delta'. `mask` is an optional params-shaped boolean tree sent
  alongside (1 bit per entry, e.g. FedSparsify-Local's local mask); None when none is sent.
  `mask_sent` (a bool scalar) says whether the mask goes on the wire this round (None =
  whenever there is one): a method that pruned nothing keeps it home and is not charged.
  `extras` is any other method-defined payload (PruneFL's importance scores, counts): a
  pytree of arrays, charged on the uplink like the values (same encoding) and read by the
  method's `upload_stats`; None when nothing else is sent.
  """
  values: Params
  mask: Optional[PyTree] = None
  mask_sent: Optional[jax.Array] = None
  extras: Optional[PyTree] = None


def nnz_server_metrics(self, old_params: Params, new_params: Params, algo_state: AlgoState
                       ) -> Dict[str, Any]:
  """A ready-made `server_metrics` for sparse methods: the global model's non-zeros.

  Assign it in the class body (`server_metrics = nnz_server_metrics`)."""
  del self, old_params, algo_state
  return {"nnz_params": masks.nnz(new_params)}


INIT_ONLY = "init_only"   # dataclass field metadata key, see `init_only_field`


def init_only_field(default: Any) -> Any:
  """A field an algorithm reads only while building its initial state (`init_state`,
  `init_params`), never inside the round, e.g. a seed that draws a fixed permutation.

  Members of a sweep may differ in such a field: each member's state is built with its own
  value, and the shared round never reads it (`sparsefl_jax.sweep` skips these fields when
  it checks that the members' algorithms are equal).
  """
  return dataclasses.field(default=default, metadata={INIT_ONLY: True})


@dataclasses.dataclass(frozen=True)
class Phase:
  """How the rounds of one phase differ from the run's settings (None = as configured).

  FLASH's stage 1 trains a fraction of the clients for 10 local epochs; OneShot prunes in one
  round. Each phase is its own compiled round (compiled once, on its first round).
  """
  clients_per_round: Optional[int] = None
  local_epochs: Optional[int] = None


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """FedAvg; subclasses override hooks. Instances are static (closed over by jit).

  Attributes:
    uplink: 'weights' (clients send models; the aggregate is their weighted mean) or 'delta'
      (clients send local − global; the aggregate is global + weighted mean of the deltas).
    default_server_optimizer: used when the run does not name one ('none' = replace).
  """
  uplink: str = "weights"
  default_server_optimizer: str = "none"
  bound: bool = False   # set by setup(); see `needs_setup`
  # The phase whose round this instance's hooks build (static: hooks may branch on it in
  # Python); set by `for_phase`. A method without phases only ever sees "train".
  phase: str = "train"

  # The method's --algorithm name and its one-line --helpfull description. A class that sets
  # `name` in its own body inside `sparsefl_jax/algorithms/` is a built-in (the registry
  # finds it); one elsewhere runs by import spec or `register_algorithm`.
  name: ClassVar[str] = "fedavg"
  description: ClassVar[str] = ""
  # How the broadcast model is counted on the downlink: None = the run's `comm_encoding`;
  # a method whose paper sends the global model in a fixed format (ZeroFL: dense) names it.
  downlink_encoding: ClassVar[Optional[str]] = None
  # Whether the engine may stream the aggregate (sum `upload_stats` chunk by chunk instead of
  # stacking every upload); None = True unless the method overrides `aggregate` itself.
  streaming_aggregate = None
  # Whether hooks read model facts that only `setup()` binds (which layers are sparse, their
  # call order): such an algorithm refuses to run unbound instead of guessing (by name order,
  # ResNet-18's classifier would sort before its convolutions and become sparse).
  needs_setup: ClassVar[bool] = False
  # Capabilities, read by `config.validate` through the registry (no lists of names there).
  sparse: ClassVar[bool] = False            # sparsifies: needs an explicit --sparsity > 0
  supports_block: ClassVar[bool] = False    # honours --sparsity_structure=block
  supports_pallas: ClassVar[bool] = False   # honours --matmul_impl=pallas (block masks)
  reads_sparse_layers: ClassVar[bool] = False   # honours --sparse_layers
  # The metrics.jsonl keys this method emits beyond every method's: {key:
  # metrics_reference.MetricField (a new documented row) or None (an existing row of
  # metrics_reference.FIELDS that it also emits)}. BUILD.md's reference table reads them.
  metric_fields: ClassVar[Dict[str, Any]] = {}
  # Why the schedule depends on the total round count (so --rounds cannot change on resume);
  # None when it does not.
  rounds_fixed_reason: ClassVar[Optional[str]] = None

  @classmethod
  def rounds_fixed_for(cls, config) -> Optional[str]:
    """`rounds_fixed_reason` for this run's settings (a method whose schedule depends on
    --rounds only under some settings overrides this)."""
    del config
    return cls.rounds_fixed_reason
  # Hyperparameters the method declares (`algorithms.hyper.Hyper`), inherited by subclasses:
  # each is a --flag of run.py and a key of `ExperimentConfig.method_args`; `from_config`
  # reads them with `cls.hyper(config, name)`.
  hyperparams: ClassVar[Tuple["Hyper", ...]] = ()

  @classmethod
  def hyper(cls, config, name: str) -> Any:
    """The checked value of the declared hyperparameter `name` in `config` (its default when
    unset); ConfigError when `cls` does not declare `name` or the value is out of range."""
    from sparsefl_jax.algorithms import hyper   # the logic lives there; base stays small
    return hyper.value(cls, config, name)

  def __post_init__(self):
    if self.uplink not in ("weights", "delta"):
      raise ValueError(f"uplink={self.uplink!r} must be 'weights' or 'delta'")

  @classmethod
  def from_config(cls, config) -> "Algorithm":
    """Builds the algorithm from a run's config; methods with hyperparameters override this."""
    del config
    return cls()

  def setup(self, params: Params, layer_order: Tuple[str, ...]
            ) -> Tuple["Algorithm", Optional[Any]]:
    """Binds model facts to the algorithm; returns (algorithm, layer op or None).

    Called once with the freshly initialised parameters and the weight layers' module paths
    in call order (first layer … classifier). An algorithm that changes how weight layers
    compute (SWAT, Powerprop) returns a `models.LinearOp`; the model is then rebuilt with it.
    The returned algorithm has `bound=True`; overrides bind through `self.bind(...)`.
    """
    del params, layer_order
    return self.bind(), None

  def bind(self, **facts) -> "Algorithm":
    """A copy with the given model facts (dataclass fields) set and `bound=True`."""
    return dataclasses.replace(self, bound=True, **facts)

  def require_bound(self, hook: str) -> None:
    """Raises UnboundAlgorithmError when `hook` needs `setup()` and it did not run."""
    if self.needs_setup and not self.bound:
      raise UnboundAlgorithmError(
          f"{type(self).__name__}.{hook} needs the model facts bound by setup(); call "
          f"`algorithm, op = algorithm.setup(params, layer_order)` first "
          f"(train.assemble_model does)")

  # ---- round phases (host side, plain Python ints) --------------------------------------
  def round_phase(self, t: int) -> str:
    """The phase of round t (1-based): rounds of one phase share a compiled round_step.

    Must depend on t (and the method's static settings) only, so a resumed run picks the same
    phases. Default: every round is "train".
    """
    del t
    return "train"

  def phase_settings(self, phase: str) -> Phase:
    """Cohort size / local epochs of a phase's rounds (default: the run's)."""
    del phase
    return Phase()

  def for_phase(self, phase: str) -> "Algorithm":
    """This algorithm with `phase` set: what the engine builds that phase's round from."""
    return dataclasses.replace(self, phase=phase)

  # ---- server side ---------------------------------------------------------------------
  def init_params(self, params: Params, key: PRNGKey) -> Params:
    """Transforms freshly initialised parameters (e.g. Powerprop's v = sign(u)|u|^(1/β))."""
    del key
    return params

  def init_from_data(self, params: Params, algo_state: AlgoState,
                     loss_fn: Callable[[Params], Scalar], key: PRNGKey
                     ) -> Tuple[Params, AlgoState]:
    """Pruning at initialisation from data (SNIP, GraSP): runs once, before round 1.

    `loss_fn(params)` is the mean loss on one batch (--batch_size examples) of one client
    drawn from the init seed; differentiate it (jax.grad, Hessian-vector products) to score
    weights. `loss_fn(params, temperature=T)` (T a Python float) divides the logits by T
    before the cross-entropy (GraSP's official code uses T = 200). Returns the (masked)
    parameters and the server state. Called only when a method overrides it, so other
    methods draw no batch.
    """
    del loss_fn, key
    return params, algo_state

  def init_state(self, params: Params) -> AlgoState:
    """Per-method server state (global masks, ...). Must be a pytree of arrays."""
    del params
    return ()

  def broadcast(self, params: Params, algo_state: AlgoState, t: Scalar) -> Params:
    """The model every sampled client receives this round."""
    del algo_state, t
    return params

  def client_context(self, global_params: Params, algo_state: AlgoState, t: Scalar
                     ) -> AlgoState:
    """What every client receives of the server state this round (default: `algo_state`).

    Computed ONCE per round, outside the client map, and handed to `client_init` as its
    `algo_state`: work that depends only on the broadcast model (SWAT's step-0 weight
    thresholds, SparsyFed's spectral exponents) is then done once instead of once per client.
    """
    del global_params, t
    return algo_state

  def upload_stats(self, upload: Upload) -> Tuple[PyTree, PyTree]:
    """What ONE client's upload adds to the aggregate: (weighted, counted).

    The engine sums `weighted` over the clients with their example counts n_k and divides by
    Σ n_k (the example-weighted mean), and sums `counted` over the real clients unweighted
    (e.g. votes: a bool/int mask). Default: the upload values, nothing counted (FedAvg).
    """
    return upload.values, ()

  def finalize_aggregate(self, global_params: Params, mean: PyTree, counts: PyTree,
                         num_clients: int, algo_state: AlgoState, t: Scalar) -> Params:
    """The candidate global model from the summed statistics of this round's uploads.

    `mean` = Σ n_k·weighted_k / Σ n_k, `counts` = Σ_k counted_k over the `num_clients`
    (a static int) real clients of the round.
    """
    del counts, num_clients, algo_state, t
    if self.uplink == "delta":
      return jax.tree.map(jnp.add, global_params, mean)
    return mean

  def finalize_state(self, global_params: Params, mean: PyTree, counts: PyTree,
                     num_clients: int, algo_state: AlgoState, t: Scalar) -> AlgoState:
    """The server state after this round's summed upload statistics (default: unchanged).

    Same arguments as `finalize_aggregate`, called right after it, before the server
    optimizer; `server_post` then receives the state returned here. A method whose server
    state depends on what the clients sent besides the model (PruneFL's new mask from the
    summed squared gradients in `counts`) computes it here. A method overriding this must
    not override `aggregate` (the engine needs the sums, not just the candidate).
    """
    del global_params, mean, counts, num_clients, t
    return algo_state

  def aggregate_stats(self, uploads: Upload, weights: jax.Array) -> Tuple[PyTree, PyTree]:
    """(mean, counts) of the stacked uploads: Σ n_k·weighted_k / Σ n_k and Σ_k counted_k."""
    weighted, counted = jax.vmap(self.upload_stats)(uploads)
    mean = weighted_mean(weighted, weights)
    counts = jax.tree.map(lambda c: jnp.sum(c, axis=0, dtype=sum_dtype(c.dtype)), counted)
    return mean, counts

  def aggregate(self, global_params: Params, uploads: Upload, weights: jax.Array,
                algo_state: AlgoState, t: Scalar) -> Params:
    """Combines the stacked uploads (leading client axis) into a candidate global model.

    Defined by `upload_stats` + `finalize_aggregate`; override those, not this. A method that
    overrides `aggregate` itself still runs, but its uploads are stacked (never streamed).
    """
    mean, counts = self.aggregate_stats(uploads, weights)
    return self.finalize_aggregate(global_params, mean, counts, weights.shape[0], algo_state,
                                   t)

  def server_post(self, params: Params, algo_state: AlgoState, t: Scalar
                  ) -> tuple[Params, AlgoState]:
    """Runs after the server optimizer (e.g. prune the new global model, update masks)."""
    del t
    return params, algo_state

  def eval_params(self, params: Params, algo_state: AlgoState) -> Params:
    """The parameters evaluation uses (e.g. SWAT evaluates with top-K weights)."""
    del algo_state
    return params

  # ---- client side (written for ONE client) -------------------------------------------
  def client_init(self, global_params: Params, algo_state: AlgoState, t: Scalar,
                  key: PRNGKey) -> ClientState:
    del global_params, algo_state, t, key
    return ()

  def client_examples(self, client_state: ClientState, num_examples: jax.Array
                      ) -> ClientState:
    """Hands the client state this client's number of training examples n_k (an int32 scalar,
    batched under the client map); runs once, right after `client_init`.

    For a method that acts at a client's own place in its schedule, e.g. after its last real
    batch of an epoch (ceil(n_k / B) batches; the padded steps after it change nothing), as
    FLASH's dynamic sparse training does. A predicate on it is batched: under vmap a
    `lax.cond` on it computes both branches. Default: the state unchanged.
    """
    del num_examples
    return client_state

  def forward(self, model, params: Params, model_state: PyTree, x: jax.Array, *, train: bool,
              example_mask: Optional[jax.Array], rngs: Optional[Dict[str, PRNGKey]],
              client_state: ClientState, step: Optional[jax.Array] = None
              ) -> tuple[jax.Array, PyTree, ClientState]:
    """Logits, updated model state (BatchNorm statistics) and client state of one batch.

    `step` is a `federated.client.LocalStep` (padded step index, epoch, batch within the
    epoch; None in evaluation), unbatched: a predicate on it stays a real `lax.cond` under the
    client vmap (e.g. SWAT's threshold refresh every N batches of an epoch).
    Returning a new client state lets layer ops cache values across steps (thresholds).
    """
    del step
    logits, new_state, _ = self.apply_model(model, params, model_state, x, train=train,
                                            example_mask=example_mask, rngs=rngs)
    return logits, new_state, client_state

  @staticmethod
  def apply_model(model, params: Params, model_state: PyTree, x: jax.Array, *, train: bool,
                  example_mask: Optional[jax.Array], rngs: Optional[Dict[str, PRNGKey]],
                  extra_collections: Optional[Dict[str, PyTree]] = None,
                  mutable_extra: Sequence[str] = ()
                  ) -> tuple[jax.Array, PyTree, Dict[str, PyTree]]:
    """The one `model.apply` of every `forward`: (logits, new model state, new extras).

    `extra_collections` are variable collections a method hands its layer op (SWAT's row
    masks and threshold cache, SparsyFed's β); in training, the model state (BatchNorm
    statistics) and the extras named in `mutable_extra` come back updated. In evaluation
    nothing is mutable: the model state comes back as given and the extras dict is empty.
    """
    variables = {"params": params, **model_state, **(extra_collections or {})}
    mutable = [*model_state.keys(), *mutable_extra] if train else []
    if not mutable:
      logits = model.apply(variables, x, train=train, example_mask=example_mask, rngs=rngs)
      return logits, model_state, {}
    logits, new = model.apply(variables, x, train=True, example_mask=example_mask, rngs=rngs,
                              mutable=mutable)
    return (logits, {k: new[k] for k in model_state},
            {k: new[k] for k in mutable_extra})

  def local_loss(self, params: Params, global_params: Params, client_state: ClientState
                 ) -> Scalar:
    """An extra term added to the local objective (FedProx's proximal term)."""
    del params, global_params, client_state
    return jnp.zeros((), jnp.float32)

  def transform_grads(self, grads: Params, params: Params, client_state: ClientState
                      ) -> Params:
    """Gradients the optimizer sees (e.g. masked); the simple form of `local_update`."""
    del params, client_state
    return grads

  def local_update(self, grads: Params, params: Params, opt_state: PyTree,
                   client_state: ClientState, step: Any
                   ) -> Tuple[Params, Params, PyTree, ClientState]:
    """Runs between the gradient and the optimizer update of every local step.

    Sees the step's gradients, parameters, optimizer state and client state, and the
    unbatched `federated.client.LocalStep` (index, epoch, batch): a method may change any of
    them — prune and regrow a mask by gradient magnitude at chosen steps (FedDST), accumulate
    squared gradients (PruneFL). Returns (grads, params, opt_state, client_state); the default
    applies `transform_grads`.
    """
    del step
    return self.transform_grads(grads, params, client_state), params, opt_state, client_state

  def post_step(self, params: Params, opt_state: PyTree, client_state: ClientState
                ) -> tuple[Params, PyTree, ClientState]:
    """Runs after every local optimizer step (e.g. re-apply a mask, update thresholds)."""
    return params, opt_state, client_state

  def client_upload(self, global_params: Params, local_params: Params,
                    client_state: ClientState, t: Scalar) -> Upload:
    del client_state, t
    if self.uplink == "delta":
      return Upload(jax.tree.map(jnp.subtract, local_params, global_params))
    return Upload(local_params)

  def client_metrics(self, global_params: Params, upload: Upload, client_state: ClientState
                     ) -> Dict[str, Scalar]:
    """Per-client scalars, averaged over the round's clients weighted by example counts."""
    del global_params, upload, client_state
    return {}

  def server_metrics(self, old_params: Params, new_params: Params, algo_state: AlgoState
                     ) -> Dict[str, Any]:
    """Per-round scalars (or small arrays) computed on the server after the update."""
    del old_params, new_params, algo_state
    return {}
