"""ExperimentConfig: every setting of a run, validated in one place.

The launch script turns each field into an absl flag (same name, same default, the help text
below), so the library, the flags and `config.json` never drift apart.
"""
import dataclasses
import math
import os
import typing
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union


def _f(default, help_text: str, choices: Optional[Tuple[str, ...]] = None):
  return dataclasses.field(default=default, metadata={"help": help_text, "choices": choices})


# Accepted values of the open-ended-looking string fields. Plain tuples, so the launch script
# can list them in --helpfull without importing JAX or TFDS; tests/test_flags.py checks them
# against the registries they mirror (models.MODELS, data.DATASETS, data.PARTITIONS,
# optimizers.SERVER_OPTIMIZERS). The algorithms are not listed here: the launch script asks
# the algorithm registry (each method's file declares its name and description).
MODELS = ("linear", "mlp_small", "fmnist_fc", "small_cnn", "leaf_cnn", "cifar_cnn", "resnet18",
          "vgg16")
DATASETS = ("fashion_mnist", "mnist", "cifar10", "cifar100", "emnist/byclass",
            "emnist/balanced", "speech_commands", "digits", "synthetic")
PARTITIONS = ("iid", "lda", "dirichlet", "classes", "natural")
# The four independent seeds (a sweep replica offsets them together).
SEED_FIELDS = ("seed", "data_seed", "init_seed", "sampling_seed")
SERVER_OPTIMIZERS = ("", "none", "sgd", "adam", "yogi", "adagrad")


class ConfigError(ValueError):
  """A setting is out of range or unknown; the message names the value and what is accepted."""


SERVER_OPTIMIZER_NAMES = ("", "none", "sgd", "adam", "yogi", "adagrad")
# (H, W, C) of each dataset's examples, and of the paper models that only fit one input shape
# (the flattening classifiers are sized for it); test models and ResNet/VGG adapt to any input.
DATASET_SHAPES = {"fashion_mnist": (28, 28, 1), "mnist": (28, 28, 1),
                  "emnist/byclass": (28, 28, 1), "emnist/balanced": (28, 28, 1),
                  "cifar10": (32, 32, 3), "cifar100": (32, 32, 3), "digits": (8, 8, 1)}
FIXED_INPUT_MODELS = {"fmnist_fc": (28, 28, 1), "leaf_cnn": (28, 28, 1),
                      "cifar_cnn": (32, 32, 3)}


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  # What to run.
  algorithm: str = dataclasses.field(default="fedavg", metadata={
      "help": "Federated algorithm: a built-in name, or a method in your own file: "
      "'package.module:ClassName' (an Algorithm subclass on the Python path).",
      "registry": "algorithms", "import_spec": True})
  dataset: str = _f("fashion_mnist", "Dataset: TFDS-backed (fashion_mnist offline from "
                    "Debian's package; the others from a prepared --data_dir), 'digits' "
                    "(scikit-learn's bundled 8x8 digits) or 'synthetic'.", DATASETS)
  data_dir: str = _f("", "TFDS data dir; for fashion_mnist also a folder of the IDX .gz files.")
  model: str = _f("fmnist_fc", "Model architecture (linear, mlp_small, small_cnn: tiny "
                  "test models).", MODELS)
  conv_impl: str = _f("im2col", "Convolution lowering.", ("im2col", "lax"))
  # Federation.
  num_clients: int = _f(10, "Number of clients the data is partitioned into.")
  clients_per_round: int = _f(10, "Clients sampled per round (without replacement).")
  rounds: int = _f(10, "Number of federated rounds.")
  partition: str = _f("iid", "How the training set is split across clients: iid, lda "
                      "(Flower's equal-size LDA, alpha), dirichlet (alpha), classes "
                      "(classes_per_client), natural (the dataset's own writers/speakers).",
                      PARTITIONS)
  alpha: float = _f(1.0, "Dirichlet concentration for partition=lda|dirichlet (inf = IID).")
  classes_per_client: int = _f(2, "Labels per client for partition=classes.")
  min_partition_size: int = _f(1, "Minimum client size for partition=dirichlet (resampled).")
  val_fraction: float = _f(0.0, "Fraction of each client's data held out for validation.")
  # Local training.
  local_epochs: int = _f(1, "Local epochs per round.")
  batch_size: int = _f(32, "Local mini-batch size.")
  lr: float = _f(0.02, "Client learning rate (the start value for lr_schedule=exponential).")
  lr_schedule: str = _f("constant", "Client LR over rounds.", ("constant", "exponential"))
  lr_end: float = _f(0.001, "Final client LR for lr_schedule=exponential (ZeroFL).")
  momentum: float = _f(0.0, "Client SGD momentum.")
  weight_decay: float = _f(0.0, "Client weight decay (coupled, as PyTorch SGD).")
  prox_mu: float = _f(0.01, "FedProx proximal coefficient μ.")
  lr_horizon: int = _f(0, "Horizon T of lr_schedule=exponential in rounds (lr reaches lr_end "
                       "at round T); 0 = --rounds. SparsyFed's code fixes T=700, also for its "
                       "500-round Speech runs.")
  # Server.
  server_optimizer: str = _f("", "Server optimizer on the pseudo-gradient; '' = the "
                             "algorithm's default ('none' replaces the model: FedAvg; sgd "
                             "with server_momentum = FedAvgM).", SERVER_OPTIMIZERS)
  server_lr: Optional[float] = _f(None, "Server LR (default: 1.0 for sgd, 0.01 for adam/yogi, "
                                  "0.1 for adagrad).")
  server_momentum: float = _f(0.0, "Server SGD momentum (FedAvgM).")
  server_b1: float = _f(0.9, "Server Adam/Yogi β1.")
  server_b2: float = _f(0.99, "Server Adam/Yogi β2.")
  server_eps: float = _f(1e-3, "Server adaptivity τ (FedOpt's τ; eps for the optax forms).")
  server_opt_impl: str = _f("reddi", "Form of server_optimizer=adam|yogi|adagrad: 'reddi' = "
                            "Reddi et al.'s FedOpt as written (m0=v0=0, no bias correction); "
                            "'optax' = optax.adam/yogi/adagrad (bias-corrected moments, "
                            "effective τ·sqrt(1-β2^t)).", ("reddi", "optax"))
  # Sparsity (SWAT/ZeroFL, FedSparsify, SparsyFed, Top-K; unused by dense methods).
  sparsity: float = _f(0.0, "Target sparsity: SWAT/ZeroFL sp, FedSparsify s_T, SparsyFed/Top-K.")
  mask_ratio: float = _f(0.0, "ZeroFL r_mask: clients upload the top (1 - sparsity + mask_ratio).")
  uplink: str = _f("topk_weights", "ZeroFL uplink strategy.",
                   ("topk_weights", "diff_on_topk_weights", "topk_weights_diff", "dense"))
  sparse_layers: str = _f("default", "Which weight layers are sparse: 'default' (the method's "
                          "paper choice), 'all', or a comma-separated list of layer paths.")
  sparsity_distribution: str = _f("uniform", "Per-layer sparsity (SWAT).", ("uniform", "erk"))
  topk_method: str = _f("bisection", "Exact top-K threshold algorithm.",
                        ("top_k", "bisection", "sort"))
  topk_period: int = _f(0, "Recompute SWAT top-K thresholds every N local steps (cached "
                        "in between; 1 = exact top-K every step). 0 = SWAT's CIFAR setting: "
                        "10 for unstructured masks, 1 for block masks.")
  initial_sparsity: float = _f(0.0, "FedSparsify schedule s_0.")
  prune_start_round: int = _f(1, "FedSparsify schedule t_0 (pruning starts after it).")
  prune_frequency: int = _f(1, "FedSparsify schedule F (prune every F rounds).")
  prune_exponent: int = _f(3, "FedSparsify schedule exponent n.")
  prune_scope: str = _f("global", "FedSparsify threshold over all layers or per layer.",
                        ("global", "layer"))
  vote_threshold: int = _f(-1, "FedSparsify-Local: a weight survives if at least this many "
                           "clients kept it; -1 = floor(K/2).")
  beta: float = _f(1.25, "SparsyFed Powerprop exponent β (w = sign(v)|v|^β).")
  spectral_exponent: bool = _f(False, "SparsyFed: per-layer β from the spectral norm.")
  act_threshold: str = _f("per_batch", "SparsyFed activation-pruning threshold: exact top-K "
                          "per batch; first_batch = cached from the round's first batch for "
                          "conv layers, per batch for dense layers (the authors' code); "
                          "first_batch_all = cached for every layer.",
                          ("per_batch", "first_batch", "first_batch_all"))
  mask_every: int = _f(0, "Save the packed global mask every N rounds (0 = never).")
  mask_metrics: bool = _f(False, "Emit SparsyFed's mask metrics (per-client regrowth and "
                         "deactivation, the global mask_iou and per-layer densities) for "
                         "every method, not only the ones that report them anyway.")
  sparsity_structure: str = _f("unstructured", "Top-K mask structure.",
                               ("unstructured", "block"))
  block_size: int = _f(32, "Block edge for sparsity_structure=block.")
  matmul_impl: str = _f("xla", "Sparse layer matmul.", ("xla", "pallas"))
  spectral_average: str = _f("nonzero", "SparsyFed spectral exponent β = 1 + mean(|W|/σ_max): "
                             "mean over the non-zero entries (release code) or all entries.",
                             ("nonzero", "all"))
  # Engine.
  client_map: str = _f("auto", "How clients are mapped (auto: map for conv models on CPU, "
                       "vmap otherwise).", ("auto", "vmap", "map", "chunked"))
  client_chunk_size: int = _f(2, "Clients per vmapped chunk for client_map=chunked.")
  num_devices: int = _f(1, "Devices to shard each round's clients over (1 = none; on CPU "
                       "set XLA_FLAGS=--xla_force_host_platform_device_count=N).")
  data_placement: str = _f("device", "Where the federated training set lives: 'device' = "
                           "on every device, the round gathers its cohort inside jit (the "
                           "default; fastest while the data fits); 'host' = in host memory, "
                           "each round's sampled cohort is gathered on the host one round "
                           "ahead and moved to the devices (each process reads only its own "
                           "shard). Results are bit-identical.", ("device", "host"))
  host_data_dir: str = _f("", "data_placement=host: train on the flat client folder written "
                          "by sparsefl_jax.data.host_placement.FlatWriter (x.npy, y.npy, "
                          "offsets.npy, meta.json; read from disk per cohort), using its "
                          "first num_clients clients; --dataset then supplies only the test "
                          "split, classes and normalisation. '' = the dataset's own split.")
  comm_encoding: str = _f("auto", "Byte encoding for uplink/downlink accounting: auto = "
                          "each tensor in the cheapest of dense, csr and bitmask (what a real "
                          "system sends); the fixed ones match a paper's own counting.",
                          ("auto", "dense", "csr", "bitmask"))
  # Evaluation, output, reproducibility.
  eval_every: int = _f(1, "Evaluate every N rounds (and always after the last); 0 = last only.")
  eval_batch_size: int = _f(1000, "Evaluation batch size.")
  seed: int = _f(0, "Training seed (shuffling, augmentation, dropout).")
  data_seed: int = _f(0, "Data partition seed.")
  init_seed: int = _f(0, "Model initialisation seed.")
  sampling_seed: int = _f(0, "Client sampling seed.")
  workdir: str = _f("runs/default", "Output folder: config.json, metrics.jsonl, checkpoints.")
  resume: bool = _f(False, "Continue from the latest checkpoint in workdir.")
  checkpoint_every: int = _f(10, "Checkpoint every N rounds (and after the last); 0 = last only.")
  keep_checkpoints: int = _f(3, "Checkpoints kept.")
  plot_partition: bool = _f(False, "Write the per-client label distribution to workdir as PNG.")
  progress: bool = _f(True, "Show a progress line per round.")
  progress_every: int = _f(0, "When stderr is not a terminal (a log), print a progress line "
                           "every N rounds; 0 = about 20 lines per run.")
  tensorboard: bool = _f(True, "Write TensorBoard event files of every metrics.jsonl scalar "
                         "to workdir/tensorboard/.")
  allow_nonfinite: bool = _f(False, "Keep training when the loss, parameters or server state "
                             "become NaN/inf (default: stop with an error, keep the last good "
                             "checkpoint).")
  # Synthetic data (dataset=synthetic).
  synthetic_shape: str = _f("28,28,1", "Example shape of synthetic data, comma-separated.")
  synthetic_classes: int = _f(10, "Classes of synthetic data.")
  synthetic_examples: int = _f(64, "Examples per client of synthetic data.")
  synthetic_test: int = _f(256, "Test examples of synthetic data.")
  # Hyperparameters the run's method declares (`Algorithm.hyperparams`), as (name, value)
  # pairs sorted by name; a dict is accepted and normalised. Not a flag itself: the launch
  # script defines one flag per declared hyperparameter and fills this with all of them.
  method_args: Tuple[Tuple[str, Any], ...] = dataclasses.field(default=(), metadata={
      "help": "Values of the hyperparameters the algorithm declares ({name: value}).",
      "choices": None, "flag": False})

  def __post_init__(self):
    object.__setattr__(self, "method_args", _normalise_method_args(self.method_args))

  def replace(self, **changes) -> "ExperimentConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_flagfile(cls, path: str, **overrides) -> "ExperimentConfig":
    """Reads an absl flagfile (`--name=value` lines, `#` comments, nested `--flagfile=`)
    into a config, for notebooks and tests that do not go through the launch script.
    A `method_args` override is merged over the file's hyperparameters."""
    values = parse_flagfile(path)
    if "method_args" in overrides:
      merged = dict(values.get("method_args", {}))
      merged.update(dict(_normalise_method_args(overrides.pop("method_args"))))
      values["method_args"] = merged
    values.update(overrides)
    return cls(**values)

  def with_method_defaults(self) -> "ExperimentConfig":
    """A copy whose `method_args` holds every hyperparameter the algorithm declares, checked
    and typed, at its default where unset: so `config.json` records them all and a resume
    compares the values that train, however the run was started."""
    from sparsefl_jax import algorithms   # lazy: this module stays importable without JAX
    from sparsefl_jax.algorithms import hyper
    cls = algorithms.algorithm_class(self.algorithm)
    return self.replace(method_args=hyper.with_defaults(cls, dict(self.method_args),
                                                        self.algorithm))

  @property
  def synthetic_example_shape(self) -> Tuple[int, ...]:
    try:
      shape = tuple(int(s) for s in self.synthetic_shape.split(","))
    except ValueError:
      raise ConfigError(f"synthetic_shape={self.synthetic_shape!r} must be comma-separated "
                        "positive integers, e.g. 28,28,1") from None
    if not shape or min(shape) < 1:
      raise ConfigError(f"synthetic_shape={self.synthetic_shape!r} must be comma-separated "
                        "positive integers, e.g. 28,28,1")
    return shape

  def resolved_server_optimizer(self, algorithm_default: str) -> str:
    return self.server_optimizer or algorithm_default

  def resolved_server_lr(self, optimizer: str) -> float:
    if self.server_lr is not None:
      return self.server_lr
    return {"adam": 0.01, "yogi": 0.01, "adagrad": 0.1}.get(optimizer, 1.0)

  def validate(self) -> "ExperimentConfig":
    """Raises ConfigError naming the first bad value and its accepted range."""
    for f in dataclasses.fields(self):
      if f.name == "algorithm":   # the registry knows the names (and import specs)
        continue
      choices = f.metadata.get("choices")
      value = getattr(self, f.name)
      if choices and value not in choices:
        raise ConfigError(f"{f.name}={value!r} is not one of {list(choices)}")
    from sparsefl_jax import algorithms   # lazy: this module stays importable without JAX
    algorithm = algorithms.algorithm_class(self.algorithm)   # ConfigError when unknown
    from sparsefl_jax.algorithms import hyper
    hyper.check_args(algorithm, dict(self.method_args), self.algorithm)
    _at_least(self, "num_clients", 1)
    _at_least(self, "rounds", 1)
    _at_least(self, "local_epochs", 1)
    if self.lr_horizon < 0:
      raise ConfigError(f"lr_horizon={self.lr_horizon} must be >= 0; accepted: 0 (= rounds) or "
                        "a number of rounds")
    _at_least(self, "batch_size", 1)
    _at_least(self, "eval_batch_size", 1)
    _at_least(self, "eval_every", 0)
    _at_least(self, "checkpoint_every", 0)
    _at_least(self, "progress_every", 0)
    _at_least(self, "keep_checkpoints", 1)
    _at_least(self, "classes_per_client", 1)
    _at_least(self, "min_partition_size", 1)
    _at_least(self, "client_chunk_size", 1)
    _at_least(self, "num_devices", 1)
    _at_least(self, "synthetic_classes", 2)
    _at_least(self, "synthetic_examples", 1)
    _at_least(self, "synthetic_test", 1)
    if not 1 <= self.clients_per_round <= self.num_clients:
      raise ConfigError(f"clients_per_round={self.clients_per_round} must lie in "
                        f"[1, num_clients={self.num_clients}]")
    _positive(self, "lr")
    if self.lr_schedule == "exponential":
      _positive(self, "lr_end")
    _in_unit(self, "momentum")
    _in_unit(self, "server_momentum")
    _in_unit(self, "server_b1")
    _in_unit(self, "server_b2")
    _in_unit(self, "val_fraction")
    if self.weight_decay < 0 or not math.isfinite(self.weight_decay):
      raise ConfigError(f"weight_decay={self.weight_decay} must be a finite number >= 0")
    if self.prox_mu < 0 or not math.isfinite(self.prox_mu):
      raise ConfigError(f"prox_mu={self.prox_mu} must be a finite number >= 0")
    if not self.alpha > 0:
      raise ConfigError(f"alpha={self.alpha} must be > 0 (use inf for IID)")
    _positive(self, "server_eps")
    if not 0.0 <= self.sparsity < 1.0:
      raise ConfigError(f"sparsity={self.sparsity} must lie in [0, 1)")
    if not 0.0 <= self.initial_sparsity <= self.sparsity or self.initial_sparsity >= 1.0:
      raise ConfigError(f"initial_sparsity={self.initial_sparsity} must lie in "
                        f"[0, sparsity={self.sparsity}]")
    if not 0.0 <= self.mask_ratio <= self.sparsity:
      raise ConfigError(f"mask_ratio={self.mask_ratio} must lie in [0, sparsity="
                        f"{self.sparsity}] (mask_ratio = sparsity uploads the whole model)")
    _at_least(self, "topk_period", 0)
    _at_least(self, "prune_start_round", 0)
    _at_least(self, "prune_frequency", 1)
    _at_least(self, "prune_exponent", 1)
    _at_least(self, "mask_every", 0)
    _at_least(self, "block_size", 1)
    if self.vote_threshold != -1 and self.vote_threshold < 1:
      raise ConfigError(f"vote_threshold={self.vote_threshold} must be -1 (floor(K/2)) or >= 1")
    self._check_block_support(algorithm)
    if not self.beta >= 1.0 or not math.isfinite(self.beta):
      raise ConfigError(f"beta={self.beta} must be a finite number >= 1")
    if self.server_lr is not None:
      _positive(self, "server_lr")
    if not self.workdir:
      raise ConfigError("workdir='' must name a folder to write config.json, metrics.jsonl "
                        "and checkpoints to")
    if self.dataset == "synthetic":
      _ = self.synthetic_example_shape
    if self.host_data_dir and self.data_placement != "host":
      raise ConfigError(f"host_data_dir={self.host_data_dir!r} is read only with "
                        f"data_placement='host' (got {self.data_placement!r})")
    if self.server_optimizer not in SERVER_OPTIMIZER_NAMES:
      raise ConfigError(f"server_optimizer={self.server_optimizer!r} is not one of "
                        f"{list(SERVER_OPTIMIZER_NAMES)} ('' = the algorithm's default)")
    self._check_sparsity_support(algorithm)
    self._check_input_shape()
    return self

  # What an algorithm honours is declared on its class (`sparse`, `supports_block`,
  # `supports_pallas`, `reads_sparse_layers`), so adding a method never edits this file.
  def _check_block_support(self, cls) -> None:
    """Refuses block masks / the Pallas matmul for an algorithm that does not implement them."""
    from sparsefl_jax.algorithms import with_capability
    if self.sparsity_structure == "block" and not cls.supports_block:
      raise ConfigError(f"sparsity_structure='block' is implemented for algorithms "
                        f"{list(with_capability('supports_block'))}; got "
                        f"algorithm={self.algorithm!r}")
    if self.matmul_impl == "pallas" and (self.sparsity_structure != "block"
                                         or not cls.supports_pallas):
      raise ConfigError(f"matmul_impl='pallas' needs sparsity_structure='block' and algorithm "
                        f"in {list(with_capability('supports_pallas'))} (got "
                        f"{self.sparsity_structure!r}, {self.algorithm!r})")

  def _check_sparsity_support(self, cls) -> None:
    """A sparse method needs --sparsity > 0; --sparse_layers only where it is read."""
    from sparsefl_jax.algorithms import with_capability
    if cls.sparse and self.sparsity <= 0.0:
      raise ConfigError(f"sparsity={self.sparsity} with algorithm={self.algorithm!r}: sparse "
                        "methods need an explicit --sparsity in (0, 1) (e.g. 0.9)")
    if self.sparse_layers != "default" and not cls.reads_sparse_layers:
      raise ConfigError(f"sparse_layers={self.sparse_layers!r} is only read by algorithms "
                        f"{list(with_capability('reads_sparse_layers'))}; got "
                        f"algorithm={self.algorithm!r} (accepted here: 'default')")

  def _check_input_shape(self) -> None:
    """Refuses a paper model fed a dataset of another input shape (digits into fmnist_fc)."""
    want = FIXED_INPUT_MODELS.get(self.model)
    have = (self.synthetic_example_shape if self.dataset == "synthetic"
            else DATASET_SHAPES.get(self.dataset))
    if want is None or have is None or tuple(have) == want:
      return
    fits = sorted(d for d, s in DATASET_SHAPES.items() if s == want)
    raise ConfigError(f"model={self.model!r} takes {'x'.join(map(str, want))} inputs but "
                      f"dataset={self.dataset!r} has {'x'.join(map(str, have))}; accepted "
                      f"datasets for it: {fits} (or linear/mlp_small/small_cnn for any shape)")


def _at_least(cfg, name: str, low: int) -> None:
  value = getattr(cfg, name)
  if value < low:
    raise ConfigError(f"{name}={value} must be >= {low}")


def _positive(cfg, name: str) -> None:
  value = getattr(cfg, name)
  if not (value > 0 and math.isfinite(value)):
    raise ConfigError(f"{name}={value} must be a finite number > 0")


def _in_unit(cfg, name: str) -> None:
  value = getattr(cfg, name)
  if not 0.0 <= value < 1.0:
    raise ConfigError(f"{name}={value} must lie in [0, 1)")


def _normalise_method_args(args: Union[None, Mapping[str, Any], Iterable[Tuple[str, Any]]]
                           ) -> Tuple[Tuple[str, Any], ...]:
  """`method_args` as hashable (name, value) pairs sorted by name (a dict is accepted)."""
  if not args:
    return ()
  try:
    pairs = list(args.items()) if isinstance(args, Mapping) else [tuple(p) for p in args]
  except TypeError:
    pairs = None
  if pairs is None or any(len(p) != 2 or not isinstance(p[0], str) for p in pairs):
    raise ConfigError(f"method_args={args!r} must map hyperparameter names to values, e.g. "
                      "{'my_scale': 0.5}")
  names = [k for k, _ in pairs]
  twice = sorted({k for k in names if names.count(k) > 1})
  if twice:
    raise ConfigError(f"method_args names {twice} more than once; give each once")
  return tuple(sorted(pairs, key=lambda p: p[0]))


def flagfile_lines(path: str) -> List[Tuple[str, str, bool, str]]:
  """(name, value, has '=', file) of every flag line of an absl-style flagfile, in order,
  nested `--flagfile=` expanded in place (relative to the including file, else to the
  working directory)."""
  with open(path) as f:
    lines = [l.strip() for l in f]
  out = []
  for line in lines:
    if not line or line.startswith("#"):
      continue
    if not line.startswith("--"):
      raise ConfigError(f"{path}: line {line!r} is not of the form --name=value")
    name, eq, value = line[2:].partition("=")
    if name == "flagfile":
      nested = os.path.join(os.path.dirname(path), value)
      if not os.path.exists(nested) and os.path.exists(value):
        nested = value   # relative to the working directory, as absl reads it
      out.extend(flagfile_lines(nested))
    else:
      out.append((name, value, bool(eq), path))
  return out


def parse_flagfile(path: str) -> Dict[str, Any]:
  """{field: typed value} from an absl-style flagfile; unknown flags are an error.

  A line naming a hyperparameter declared by a known algorithm (built-in, registered, or the
  flagfile's own `--algorithm=package.module:ClassName`) goes into `method_args` (a dict);
  whether the run's algorithm declares it is checked by `validate()`."""
  hints = typing.get_type_hints(ExperimentConfig)
  fields = set(hints) - {"method_args"}
  entries = flagfile_lines(path)
  out: Dict[str, Any] = {}
  method_args: Dict[str, Any] = {}
  table = None   # hyperparameters of the known algorithms, loaded at the first other name
  for name, value, has_value, where in entries:
    is_bool_negation = not has_value and name.startswith("no") and name[2:] in fields
    key = name[2:] if is_bool_negation else name
    if key in fields:
      kind = hints[key]
      if kind is bool:
        out[key] = (not is_bool_negation) if not has_value else value.lower() in (
            "1", "true", "yes")
      elif kind is int:
        out[key] = int(value)
      elif kind in (float, Optional[float]):
        out[key] = float(value)
      else:
        out[key] = value
      continue
    if table is None:
      from sparsefl_jax.algorithms import hyper   # lazy: imports the algorithm modules
      table = hyper.known([v for n, v, _, _ in entries if n == "algorithm" and ":" in v])
    is_bool_negation = not has_value and name.startswith("no") and name[2:] in table
    key = name[2:] if is_bool_negation else name
    if key not in table:
      raise ConfigError(f"{where}: unknown flag --{name}")
    declared = table[key][0]
    if declared.kind is bool and not has_value:
      method_args[key] = not is_bool_negation
    else:
      try:
        method_args[key] = declared.convert(value)
      except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
  if method_args:
    out["method_args"] = method_args
  return out


def config_to_json(cfg: ExperimentConfig) -> Dict[str, Any]:
  """The config as strict-JSON values: a non-finite float setting (alpha=inf) becomes the
  string 'inf' so `config.json` stays valid JSON and round-trips through `config_from_json`."""
  out = dataclasses.asdict(cfg)
  out["method_args"] = dict(cfg.method_args)   # a JSON object {name: value}
  for d in (out, out["method_args"]):
    for k, v in d.items():
      if isinstance(v, float) and not math.isfinite(v):
        d[k] = str(v)
  return out


def config_from_json(values: Dict[str, Any]) -> ExperimentConfig:
  """Inverse of `config_to_json`; fields missing from an older file take their defaults,
  unknown keys are an error."""
  hints = typing.get_type_hints(ExperimentConfig)
  unknown = sorted(set(values) - set(hints))
  if unknown:
    raise ConfigError(f"config has unknown settings {unknown}")
  out = dict(values)
  for k, v in out.items():
    if isinstance(v, str) and hints[k] in (float, Optional[float]):
      out[k] = float(v)
  if out.get("method_args"):
    out["method_args"] = _restore_method_args(out.get("algorithm", "fedavg"),
                                              dict(_normalise_method_args(out["method_args"])))
  return ExperimentConfig(**out)


def _restore_method_args(algorithm: str, args: Dict[str, Any]) -> Dict[str, Any]:
  """Float hyperparameters that `config_to_json` wrote as strings ('inf') as floats again;
  values the algorithm does not declare (or cannot be imported) are left to `validate()`."""
  from sparsefl_jax import algorithms   # lazy: this module stays importable without JAX
  from sparsefl_jax.algorithms import hyper
  try:
    table = hyper.declared(algorithms.algorithm_class(algorithm))
  except ConfigError:
    return args
  out = dict(args)
  for k, v in args.items():
    if k in table and table[k].kind is float and isinstance(v, str):
      try:
        out[k] = table[k].convert(v)
      except ConfigError:
        pass
  return out
