"""The papers' comparison run sets: which methods, on which settings, with which flags.

Each member is a `run.py` command: the set's base flagfile, the group's flags (e.g. the LDA α),
the member's flags, then the run's overrides (`--rounds` and `--override` of compare.py).
Flagfiles are relative to the repository root.

* `fedsparsify`: FedSparsify's comparison (Stripelis et al., Figures 2-3 and 12): the 2-FC
  model on Fashion-MNIST, 10 clients all participating, non-IID with 2 classes per client,
  4 local epochs, batch 32, SGD lr 0.02, 200 rounds, seed 1990, target sparsity 0.9 (PruneFL
  also at its recommended 0.3).
* `sparsyfed`: SparsyFed's comparison (Guastella et al., Figures 2-3): the LEAF CNN (10
  classes) on Fashion-MNIST, 100 clients, 10 per round, equal-size LDA with α = 0.1 and 1.0,
  95% sparsity, SparsyFed's local settings (`sparsyfed_fmnist.flags`); mask metrics for every
  method and the global mask saved every round for the IoU heat-map.
"""
import dataclasses
from typing import Callable, Dict, Sequence, Tuple, Union

Flags = Union[Sequence[str], Callable[[int], Sequence[str]]]


@dataclasses.dataclass(frozen=True)
class Member:
  """One method of a comparison: a table row and a run folder named `label`.

  `flags` are run.py flags, or a function of the run's round count T returning them (OneShot
  with fine-tuning prunes at T − 10: a shortened run keeps the shape with fewer rounds).
  """
  label: str
  title: str
  flags: Flags

  def flags_for(self, rounds: int) -> Tuple[str, ...]:
    return tuple(self.flags(rounds) if callable(self.flags) else self.flags)


@dataclasses.dataclass(frozen=True)
class ComparisonSet:
  """A paper's comparison: members run on a base flagfile, once per group."""
  name: str
  title: str
  flagfile: str
  rounds: int
  members: Tuple[Member, ...]
  table: str                                  # 'fedsparsify' or 'sparsyfed' columns
  common: Tuple[str, ...] = ()                # flags every member gets
  groups: Tuple[Tuple[str, Tuple[str, ...]], ...] = (("", ()),)   # (label, flags)
  rounds_note: str = ""


def _finetune(rounds: int) -> Tuple[str, ...]:
  """OneShot + FT: the paper's 10 fine-tuning rounds of 200; fewer when T is shorter."""
  return ("--algorithm=oneshot", f"--oneshot_finetune_rounds={max(1, min(10, rounds - 1))}")


FEDSPARSIFY = ComparisonSet(
    name="fedsparsify",
    title="FedSparsify's comparison (Fashion-MNIST, 2-FC, 10 clients, non-IID 2 classes)",
    flagfile="experiments/flags/fedsparsify_fmnist_10c_noniid.flags",
    rounds=200,
    table="fedsparsify",
    common=("--sparsity=0.9", "--eval_every=1", "--resume"),
    members=(
        Member("fedavg", "FedAvg", ("--algorithm=fedavg",)),
        Member("fedprox", "FedProx (μ = 0.001)", ("--algorithm=fedprox", "--prox_mu=0.001")),
        Member("fedsparsify_global", "FedSparsify-Global", ("--algorithm=fedsparsify_global",)),
        Member("fedsparsify_local", "FedSparsify-Local", ("--algorithm=fedsparsify_local",)),
        Member("snip", "SNIP", ("--algorithm=snip",)),
        Member("grasp", "GraSP", ("--algorithm=grasp",)),
        Member("prunefl", "PruneFL (s = 0.9)", ("--algorithm=prunefl",)),
        Member("prunefl_0.3", "PruneFL (s = 0.3)", ("--algorithm=prunefl", "--sparsity=0.3")),
        Member("oneshot", "OneShot", ("--algorithm=oneshot", "--oneshot_finetune_rounds=0")),
        Member("oneshot_ft", "OneShot + FT", _finetune),
        Member("random_prune", "Random", ("--algorithm=random_prune",)),
    ))

SPARSYFED = ComparisonSet(
    name="sparsyfed",
    title="SparsyFed's comparison (Fashion-MNIST, LEAF CNN, 100 clients, 10 per round, 95%)",
    flagfile="experiments/flags/sparsyfed_fmnist.flags",
    rounds=30,
    table="sparsyfed",
    common=("--sparsity=0.95", "--mask_metrics", "--mask_every=1", "--eval_every=1",
            "--resume"),
    groups=(("alpha0.1", ("--alpha=0.1",)), ("alpha1.0", ("--alpha=1.0",))),
    rounds_note=("SparsyFed runs 700 rounds on CIFAR; here 30 rounds per run, 12 runs, about "
                 "an hour of this 2-core machine in total."),
    members=(
        Member("sparsyfed", "SparsyFed", ("--algorithm=sparsyfed",)),
        Member("topk", "Top-K", ("--algorithm=topk",)),
        Member("zerofl", "ZeroFL", ("--algorithm=zerofl", "--mask_ratio=0")),
        # Under vmap a 1-epoch JMWST readjustment is a select at every step; map runs it once.
        Member("flash", "FLASH", ("--algorithm=flash", "--client_map=map")),
        Member("feddst", "FedDST", ("--algorithm=feddst",)),
        Member("fedavg", "FedAvg (dense)", ("--algorithm=fedavg",)),
    ))

SETS: Dict[str, ComparisonSet] = {s.name: s for s in (FEDSPARSIFY, SPARSYFED)}
