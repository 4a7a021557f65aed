r"""Launch a federated run: every ExperimentConfig field is a flag of the same name.

  python experiments/run.py --algorithm=fedavg --dataset=fashion_mnist --model=fmnist_fc \
      --num_clients=10 --clients_per_round=10 --rounds=20 --workdir=runs/fedavg
  python experiments/run.py --flagfile=experiments/flags/quickstart.flags

Outputs in --workdir: config.json, metrics.jsonl (one JSON object per round), checkpoints/.
Bad settings exit with status 2 and one line naming the value and what is accepted.
"""
import dataclasses
import os
import sys
import typing

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags, logging  # noqa: E402

from sparsefl_jax.config import ConfigError, ExperimentConfig  # noqa: E402


class _ChoiceParser(flags.EnumParser):
  """absl's enum parser with the project's one-line error: `name='bad' is not one of [...]`."""

  def __init__(self, name: str, choices):
    super().__init__(list(choices), case_sensitive=True)
    self.name = name

  def parse(self, argument: str) -> str:
    if argument not in self.enum_values:
      raise ValueError(f"{self.name}={argument!r} is not one of {list(self.enum_values)}")
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
      flags.FLAGS[field.name].parser = _ChoiceParser(field.name, choices)
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


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; settings are --flags")
  if not flags.FLAGS["verbosity"].present:  # keep library INFO chatter (orbax) off the console
    logging.set_verbosity(logging.WARNING)
  from sparsefl_jax import train  # heavy imports after flag parsing
  cfg = config_from_flags()
  try:
    row = train.run(cfg)
  except ConfigError as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  except ValueError as e:  # data/model errors carry the same one-line contract
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)
  acc = row.get("test_accuracy", float("nan"))
  print(f"done: {row.get('round', 0)} rounds, test_accuracy={acc:.4f}, "
        f"uplink={row['cumulative_uplink_bytes'] / 1e6:.1f} MB, "
        f"downlink={row['cumulative_downlink_bytes'] / 1e6:.1f} MB; outputs in {cfg.workdir}")


def parse_flags(argv):
  """Parses the command line; a bad flag value exits 2 with one line (no usage dump)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f"error: {e}\n")
    sys.exit(2)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=parse_flags)
