"""The reference of every `metrics.jsonl` field: meaning, unit, emitting methods, scope.

This dict is the single source of truth: BUILD.md's "Metrics reference" table is generated
from it (`python -m sparsefl_jax.metrics_reference --write BUILD.md`), and
`tests/test_metrics_reference.py` runs one round of every registered algorithm to check that
each emitted key has a row here, that each row's method list is exactly who emits it, and
that BUILD.md's table is up to date.
"""
import dataclasses
import re
import sys
from typing import Dict, Iterable, List, Optional, Tuple

MASK_METHODS = ("swat", "zerofl", "sparsyfed", "topk")        # global-mask metrics
REGROWTH_METHODS = MASK_METHODS
FEDSPARSIFY = ("fedsparsify_global", "fedsparsify_local")

EVERY_ROUND = "every round"
EVAL_ROUNDS = "evaluation rounds"


@dataclasses.dataclass(frozen=True)
class MetricField:
  """One field of a metrics.jsonl row.

  Attributes:
    meaning: what the value is.
    unit: its unit ('' for none).
    methods: the algorithms whose rows carry it; None = every algorithm.
    scope: 'round' (one value for the round or the new global model), 'sum over clients',
      'mean over clients' (weighted by example counts), or 'per client' (one entry each).
    cumulative: True if summed over rounds 1..t.
    when: 'every round' or 'evaluation rounds' (every --eval_every rounds and the last).
  """
  meaning: str
  unit: str
  methods: Optional[Tuple[str, ...]] = None
  scope: str = "round"
  cumulative: bool = False
  when: str = EVERY_ROUND


# Keys ending in '<layer>' stand for one key per weight layer ('density/Dense_0', ...).
FIELDS: Dict[str, MetricField] = {
    "round": MetricField("Round index t (the TensorBoard step).", "1-based index"),
    "clients": MetricField("Ids of the clients sampled this round.", "client ids (list)",
                           scope="per client"),
    "lr": MetricField("Client learning rate used this round (after --lr_schedule).", ""),
    "train_loss": MetricField(
        "Local training loss: per-example cross-entropy summed over every example of every "
        "local step of every sampled client, divided by the number of those examples.",
        "nats", scope="mean over clients"),
    "num_examples": MetricField("Training examples held by the sampled clients.", "examples",
                                scope="sum over clients"),
    "uplink_bytes": MetricField(
        "Bytes the sampled clients upload this round under --comm_encoding (dense: 4 bytes "
        "per entry; csr/bitmask: from the actual non-zeros), mask bitmaps included.", "bytes",
        scope="sum over clients"),
    "uplink_nnz": MetricField("Non-zero values uploaded by the sampled clients.", "values",
                              scope="sum over clients"),
    "downlink_bytes": MetricField(
        "Bytes broadcast this round: K copies of the broadcast model under --comm_encoding.",
        "bytes", scope="sum over clients"),
    "downlink_nnz": MetricField("Non-zero values broadcast: K × those of the broadcast model.",
                                "values", scope="sum over clients"),
    "transmitted_params": MetricField("uplink_nnz + downlink_nnz (FedSparsify's count).",
                                      "values", scope="sum over clients"),
    "fedsparsify_cost_mbits": MetricField(
        "FedSparsify's transmission cost: (32 × transmitted_params + 1 bit per entry of each "
        "uploaded mask) / 10^6.", "Mbit", scope="sum over clients"),
    "global_density": MetricField(
        "Non-zero fraction of all parameters (every leaf, biases included) of the new global "
        "model.", "fraction in [0, 1]"),
    "cumulative_uplink_bytes": MetricField("uplink_bytes summed over rounds 1..t.", "bytes",
                                           scope="sum over clients", cumulative=True),
    "cumulative_downlink_bytes": MetricField("downlink_bytes summed over rounds 1..t.", "bytes",
                                             scope="sum over clients", cumulative=True),
    "seconds": MetricField("Wall-clock time of the round's jitted step (evaluation and "
                           "logging excluded; round 1 includes compilation).", "s"),
    "test_loss": MetricField("Mean cross-entropy of the new global model on the test split.",
                             "nats", when=EVAL_ROUNDS),
    "test_accuracy": MetricField("Accuracy of the new global model on the test split.",
                                 "fraction in [0, 1]", when=EVAL_ROUNDS),
    "upload_density": MetricField("Non-zero fraction of what a client uploads.",
                                  "fraction in [0, 1]", methods=("swat", "zerofl"),
                                  scope="mean over clients"),
    "regrowth": MetricField(
        "Parameters that are zero in the global model a client received and non-zero in the "
        "model it uploads (SparsyFed's regrowth), over all parameters. Every method emits it "
        "under --mask_metrics.", "parameters",
        methods=REGROWTH_METHODS, scope="mean over clients"),
    "deactivation": MetricField(
        "The reverse of regrowth: non-zero in the received model, zero in the uploaded one "
        "(every method under --mask_metrics).",
        "parameters", methods=REGROWTH_METHODS, scope="mean over clients"),
    "mask_iou": MetricField(
        "IoU of the non-zero patterns of the previous and the new global model "
        "(|a ∧ b| / |a ∨ b| over all parameters); every method under --mask_metrics.",
        "fraction in [0, 1]",
        methods=MASK_METHODS),
    "density/<layer>": MetricField(
        "Non-zero fraction of that conv/dense kernel in the new global model (one key per "
        "weight layer; one TensorBoard group); every method under --mask_metrics.",
        "fraction in [0, 1]", methods=MASK_METHODS),
    "local_density": MetricField("Non-zero fraction of a client's pruned upload.",
                                 "fraction in [0, 1]", methods=("fedsparsify_local",),
                                 scope="mean over clients"),
    "nnz_params": MetricField("Non-zero parameters of the new global model.", "parameters",
                              methods=FEDSPARSIFY),
    "model_csr_bytes": MetricField("Size of the new global model in CSR encoding.", "bytes",
                                   methods=FEDSPARSIFY),
    "target_sparsity": MetricField("Sparsity s_t of the pruning schedule in force (Eq. 1).",
                                   "fraction in [0, 1]", methods=FEDSPARSIFY),
}



def fields() -> Dict[str, MetricField]:
  """FIELDS plus what the built-in methods declare in their own files.

  A method's `metric_fields` ({key: MetricField or None}) documents the keys it emits
  besides the universal ones: a MetricField adds a row (its `methods` filled in), None
  adds the method to an existing row of FIELDS. So a new method never edits this module.
  """
  from sparsefl_jax import algorithms   # lazy: the registry imports JAX
  out = dict(FIELDS)
  for name in algorithms.ALGORITHMS:
    for key, field in getattr(algorithms.algorithm_class(name), "metric_fields", {}).items():
      base = out.get(key, field)
      if base is None:
        raise ValueError(f"algorithm {name!r} declares metric {key!r} as an existing row, "
                         "but FIELDS has no such row")
      if base.methods is None:
        raise ValueError(f"algorithm {name!r} redeclares the universal metric {key!r}")
      methods = base.methods if key in out else ()
      out[key] = dataclasses.replace(base, methods=methods + (name,))
  return out


_PLACEHOLDER = re.compile(r"<[a-z_]+>")


def _pattern(name: str) -> "re.Pattern[str]":
  parts = _PLACEHOLDER.split(name)
  return re.compile(".+".join(re.escape(p) for p in parts) + r"\Z")


def reference_name(key: str) -> Optional[str]:
  """The `fields()` entry a metrics key belongs to ('density/Dense_0' -> 'density/<layer>')."""
  known = fields()
  if key in known:
    return key
  for name in known:
    if "<" in name and _pattern(name).match(key):
      return name
  return None


def undocumented(keys: Iterable[str]) -> List[str]:
  """The keys that no FIELDS entry describes, sorted."""
  return sorted(k for k in set(keys) if reference_name(k) is None)


def markdown_table() -> str:
  """The reference as a Markdown table (the block between BUILD.md's markers)."""
  lines = ["| field | meaning | unit | emitted by | scope | cumulative | when |",
           "|---|---|---|---|---|---|---|"]
  for name, f in fields().items():
    methods = "all" if f.methods is None else ", ".join(f"`{m}`" for m in f.methods)
    meaning = f.meaning.replace("|", "\\|")   # a literal bar inside a table cell
    lines.append(f"| `{name}` | {meaning} | {f.unit or '–'} | {methods} | {f.scope} | "
                 f"{'yes' if f.cumulative else 'no'} | {f.when} |")
  return "\n".join(lines) + "\n"


BEGIN = "<!-- metrics-reference:begin (generated by python -m sparsefl_jax.metrics_reference "\
        "--write BUILD.md) -->\n"
END = "<!-- metrics-reference:end -->\n"


def splice(doc: str) -> str:
  """`doc` with the text between the markers replaced by the current table."""
  start, stop = doc.find(BEGIN), doc.find(END)
  if start < 0 or stop < start:
    raise ValueError("the document has no metrics-reference markers")
  return doc[:start + len(BEGIN)] + markdown_table() + doc[stop:]


def main(argv: List[str]) -> int:
  """`--write PATH` rewrites the table in PATH; without arguments prints it."""
  if len(argv) == 2 and argv[0] == "--write":
    with open(argv[1]) as f:
      doc = f.read()
    with open(argv[1], "w") as f:
      f.write(splice(doc))
    return 0
  if argv:
    sys.stderr.write(f"error: arguments {argv} are not '--write PATH'\n")
    return 2
  sys.stdout.write(markdown_table())
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
