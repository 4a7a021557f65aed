r"""Launch a federated run: every ExperimentConfig field is a flag of the same name, and so
is every hyperparameter a method declares (`Algorithm.hyperparams`).

  python experiments/run.py --algorithm=fedavg --dataset=fashion_mnist --model=fmnist_fc \
      --num_clients=10 --clients_per_round=10 --rounds=20 --workdir=runs/fedavg
  python experiments/run.py --flagfile=experiments/flags/quickstart.flags

A method in your own file brings its hyperparameters as flags too:

  python experiments/run.py --algorithm=my_file:MyMethod --my_scale=0.5 ...

Outputs in --workdir: config.json, metrics.jsonl (one JSON object per round), checkpoints/.
Bad settings exit with status 2 and one line naming the value and what is accepted.
"""
import dataclasses
import os
import re
import signal
import sys
import typing
from typing import Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

from sparsefl_jax import distributed  # noqa: E402
from sparsefl_jax.config import ConfigError, ExperimentConfig, flagfile_lines  # noqa: E402

# The hyperparameter flags `define_flags` defined: {name: (Hyper, algorithms declaring it)}.
_HYPER_FLAGS: Dict[str, Tuple[object, Tuple[str, ...]]] = {}


class _ChoiceParser(flags.EnumParser):
  """absl's enum parser with the project's one-line error: `name='bad' is not one of [...]`."""

  def __init__(self, name: str, choices, import_spec: bool = False):
    super().__init__(list(choices), case_sensitive=True)
    self.name = name
    self.import_spec = import_spec   # also accept 'package.module:ClassName' (--algorithm)

  def parse(self, argument: str) -> str:
    if self.import_spec and ":" in argument:
      return argument   # resolved (and refused in one line if bad) when the run is built
    if argument not in self.enum_values:
      spec = " or a 'package.module:ClassName' import spec" if self.import_spec else ""
      raise ValueError(f"{self.name}={argument!r} is not one of {list(self.enum_values)}"
                       f"{spec}")
    return argument


def algorithm_specs(argv: Sequence[str]) -> List[str]:
  """The 'package.module:ClassName' values of every --algorithm in argv and in the flagfiles
  it names: their classes are imported before parsing so their hyperparameters are flags.
  An unreadable flagfile is skipped here; absl reports it when it parses."""
  specs: List[str] = []

  def note(name: str, value: str) -> None:
    if name == "algorithm" and ":" in value:
      specs.append(value)
    elif name == "flagfile":
      try:
        for n, v, _, _ in flagfile_lines(value):
          note(n, v)
      except (OSError, ValueError):
        pass

  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == "--":
      break
    if not arg.startswith("-"):
      continue
    name, eq, value = arg.lstrip("-").partition("=")
    if not eq:   # --algorithm VALUE
      if name not in ("algorithm", "flagfile") or i + 1 >= len(args):
        continue
      value = args[i + 1]
    note(name, value)
  return specs


def define_flags(argv: Optional[Sequence[str]] = None,
                 flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Registers one absl flag per config field (type, default and help from the dataclass),
  and one per hyperparameter declared by a built-in algorithm or by a class `argv` names by
  import spec (`--algorithm=package.module:ClassName`, also inside a --flagfile).

  Fields and hyperparameters with `choices` become enum flags, so `--helpfull` lists the
  accepted values. Raises ConfigError (one line) for a bad import spec or two methods that
  declare one flag differently.
  """
  from sparsefl_jax import algorithms
  from sparsefl_jax.algorithms import hyper
  hints = typing.get_type_hints(ExperimentConfig)
  for field in dataclasses.fields(ExperimentConfig):
    if not field.metadata.get("flag", True):   # method_args: filled from the flags below
      continue
    help_text, choices = field.metadata["help"], field.metadata.get("choices")
    if field.metadata.get("registry") == "algorithms":   # each method declares its own line
      choices = algorithms.names()
      help_text = help_text + " Built-ins: " + "; ".join(
          f"{name} = {text}" for name, text in algorithms.descriptions().items()) + "."
    _define(flag_values, field.name, hints[field.name], field.default, help_text, choices,
            field.metadata.get("import_spec", False))
  table = hyper.known(algorithm_specs(sys.argv if argv is None else argv))
  _HYPER_FLAGS.clear()
  for name, (h, owners) in table.items():
    if name in flag_values:
      raise ConfigError(f"hyperparameter --{name} of algorithm={owners[0]!r} clashes with the "
                        f"existing flag --{name}; rename it")
    _define(flag_values, name, h.kind, h.default,
            f"[hyperparameter of {', '.join(owners)}] {h.describe()}",
            h.choices if h.kind is str else None)
    _HYPER_FLAGS[name] = (h, owners)
  distributed.define_flags(flag_values)   # launch-only: not part of the config


def _define(flag_values: flags.FlagValues, name: str, kind, default, help_text: str,
            choices=None, import_spec: bool = False) -> None:
  """One absl flag of the setting's type; a setting with choices is an enum flag."""
  if choices:
    flags.DEFINE_enum(name, default, list(choices), help_text, flag_values=flag_values)
    flag_values[name].parser = _ChoiceParser(name, choices, import_spec)
  elif kind is bool:
    flags.DEFINE_bool(name, default, help_text, flag_values=flag_values)
  elif kind is int:
    flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)
  elif kind in (float, typing.Optional[float]):
    flags.DEFINE_float(name, default, help_text, flag_values=flag_values)
  else:
    flags.DEFINE_string(name, default, help_text, flag_values=flag_values)


def config_from_flags(flag_values: flags.FlagValues = flags.FLAGS) -> ExperimentConfig:
  """The config the parsed flags describe. `method_args` holds every hyperparameter the run's
  algorithm declares (defaults included, so config.json records them); a hyperparameter flag
  set for an algorithm that does not declare it is a one-line ConfigError."""
  from sparsefl_jax import algorithms
  from sparsefl_jax.algorithms import hyper
  values = {f.name: getattr(flag_values, f.name) for f in dataclasses.fields(ExperimentConfig)
            if f.metadata.get("flag", True)}
  own = hyper.declared(algorithms.algorithm_class(values["algorithm"]))
  for name, (_, owners) in sorted(_HYPER_FLAGS.items()):
    if flag_values[name].present and name not in own:
      declares = f"it declares {sorted(own)}" if own else "it declares none"
      raise ConfigError(f"--{name} is a hyperparameter of algorithm {list(owners)}, not of "
                        f"algorithm={values['algorithm']!r} ({declares}); drop the flag or "
                        "choose one of those algorithms")
  values["method_args"] = {name: (flag_values[name].value if name in _HYPER_FLAGS
                                  else h.default) for name, h in own.items()}
  return ExperimentConfig(**values)


def parse_flags(argv: List[str]) -> List[str]:
  """absl flag parsing with the one-line contract: a bad flag, value or flagfile, or a stray
  positional argument, prints `error: ...` and exits 2 (absl would print usage, exit 1)."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    message = " ".join(str(e).split()).replace("ERROR:: ", "")
    bad = re.match(r"flag --(\w+)=", message)
    if isinstance(e, flags.IllegalFlagValueError) and bad and bad.group(1) in flags.FLAGS:
      message += f"; accepted: a {flags.FLAGS[bad.group(1)].flag_type()}"
    _fail(message)
  if len(rest) > 1:
    _fail(f"unexpected argument {rest[1]!r}; settings are --name=value flags "
          "(--helpfull lists them)")
  return rest


def _fail(message: str, code: int = 2) -> None:
  sys.stderr.write(f"error: {message}\n")
  sys.stderr.flush()
  sys.exit(code)


def _signal_before_training(signum: int, frame) -> None:
  del frame
  _fail(f"{signal.Signals(signum).name} before training started: nothing to save", 128 + signum)


def main(argv) -> None:
  del argv  # parse_flags refused positional arguments
  for sig in (signal.SIGINT, signal.SIGTERM):   # train.run installs the graceful handlers
    signal.signal(sig, _signal_before_training)
  if not flags.FLAGS["verbosity"].present:  # keep library INFO chatter (orbax) off the console
    logging.set_verbosity(logging.WARNING)
  try:   # several processes: jax.distributed before any other JAX call
    distributed.initialize_from_flags()
  except ValueError as e:
    _fail(" ".join(str(e).split()))
  from sparsefl_jax import train  # heavy imports after flag parsing
  from sparsefl_jax.guard import Diverged
  from sparsefl_jax.stopping import RunInterrupted
  try:
    cfg = config_from_flags()
    row = train.run(cfg)
  except ValueError as e:  # ConfigError and data/model errors: the same one-line contract
    _fail(" ".join(str(e).split()))
  except Diverged as e:
    _fail(str(e), e.exit_code)
  except RunInterrupted as e:
    _fail(str(e), e.exit_code)
  acc = row.get("test_accuracy")
  acc_s = f"{acc:.4f}" if isinstance(acc, float) else "n/a"
  print(f"done: {row.get('round', 0)} rounds, test_accuracy={acc_s}, "
        f"uplink={row.get('cumulative_uplink_bytes', 0) / 1e6:.1f} MB, "
        f"downlink={row.get('cumulative_downlink_bytes', 0) / 1e6:.1f} MB; "
        f"outputs in {cfg.workdir}")


if __name__ == "__main__":
  try:
    define_flags(sys.argv)
  except ValueError as e:   # a bad import spec, clashing hyperparameter declarations
    _fail(" ".join(str(e).split()))
  app.run(main, flags_parser=parse_flags)
