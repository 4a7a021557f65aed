r"""Launch a federated run: every ExperimentConfig field is a flag of the same name.

  python experiments/run.py --algorithm=fedavg --dataset=fashion_mnist --model=fmnist_fc \
      --num_clients=10 --clients_per_round=10 --rounds=20 --workdir=runs/fedavg
  python experiments/run.py --flagfile=experiments/flags/quickstart.flags

Outputs in --workdir: config.json, metrics.jsonl (one JSON object per round), checkpoints/.
Bad settings exit with status 2 and one line naming the value and what is accepted.
"""
import dataclasses
import os
import re
import signal
import sys
import typing
from typing import List

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

from sparsefl_jax.config import ExperimentConfig  # noqa: E402


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


def define_flags() -> None:
  """Registers one absl flag per config field (type, default and help from the dataclass).

  Fields with `choices` become enum flags, so `--helpfull` lists the accepted values.
  """
  hints = typing.get_type_hints(ExperimentConfig)
  for field in dataclasses.fields(ExperimentConfig):
    kind = hints[field.name]
    help_text = field.metadata["help"]
    choices = field.metadata.get("choices")
    if choices:
      flags.DEFINE_enum(field.name, field.default, list(choices), help_text)
      flags.FLAGS[field.name].parser = _ChoiceParser(
          field.name, choices, field.metadata.get("import_spec", False))
    elif kind is bool:
      flags.DEFINE_bool(field.name, field.default, help_text)
    elif kind is int:
      flags.DEFINE_integer(field.name, field.default, help_text)
    elif kind in (float, typing.Optional[float]):
      flags.DEFINE_float(field.name, field.default, help_text)
    else:
      flags.DEFINE_string(field.name, field.default, help_text)


def config_from_flags() -> ExperimentConfig:
  values = {f.name: getattr(flags.FLAGS, f.name) for f in dataclasses.fields(ExperimentConfig)}
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
  define_flags()
  app.run(main, flags_parser=parse_flags)
