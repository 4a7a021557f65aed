"""Hyperparameters declared with the method that reads them.

A method lists them on its class, `hyperparams = (Hyper("my_scale", 1.0, "..."), ...)`, and
reads them in `from_config` with `cls.hyper(config, "my_scale")`. `experiments/run.py` turns
each into a `--my_scale` flag and `ExperimentConfig.method_args` carries the values (into
`config.json` too), so adding a method never edits `config.py`.

The type of a hyperparameter is the type of its default (bool, int, float or str); `check`
converts a value to it and refuses one outside the declared range or choices in one line
naming the value and what is accepted, like every other setting.
"""
import dataclasses
import math
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple, Type

from sparsefl_jax.config import ConfigError

KINDS = (bool, int, float, str)
_KIND_NAMES = {bool: "a bool (true/false)", int: "an int", float: "a float", str: "a string"}
_TRUE, _FALSE = ("1", "true", "yes", "t", "y"), ("0", "false", "no", "f", "n")


def _num(x: float) -> str:
  return str(x) if isinstance(x, int) else f"{x:g}"


@dataclasses.dataclass(frozen=True)
class Hyper:
  """One declared hyperparameter: flag name, default (its type is the setting's type), help.

  `choices` restricts the value to a fixed set (a str setting becomes an enum flag, listed by
  --helpfull). `low`/`high` bound a number; `include_low`/`include_high` say whether the bound
  itself is accepted: (0, 10] is low=0, include_low=False, high=10.
  """
  name: str
  default: Any
  help: str
  choices: Optional[Tuple[Any, ...]] = None
  low: Optional[float] = None
  high: Optional[float] = None
  include_low: bool = True
  include_high: bool = True

  def __post_init__(self):
    where = f"Hyper({self.name!r})"
    if not (isinstance(self.name, str) and self.name.isidentifier()
            and self.name == self.name.lower()):
      raise ConfigError(f"{where}: the name must be a lower-case identifier (it is a flag)")
    if type(self.default) not in KINDS:
      raise ConfigError(f"{where}: default={self.default!r} must be a bool, int, float or str "
                        "(its type is the setting's type)")
    if self.choices is not None:
      object.__setattr__(self, "choices", tuple(self.choices))
      if not self.choices or any(type(c) is not self.kind for c in self.choices):
        raise ConfigError(f"{where}: choices={list(self.choices)} must be non-empty values of "
                          f"the default's type {self.kind.__name__}")
    if (self.low is not None or self.high is not None) and self.kind not in (int, float):
      raise ConfigError(f"{where}: low/high bound numbers; the default {self.default!r} is "
                        f"a {self.kind.__name__}")
    try:
      self.check(self.default)
    except ConfigError as e:
      raise ConfigError(f"{where}: the default is refused: {e}") from None

  @property
  def kind(self) -> type:
    """The setting's type: the type of the default."""
    return type(self.default)

  def accepted(self) -> str:
    """What `check` accepts, for error messages and --helpfull: '(0, 10]', '>= 1', ..."""
    if self.choices is not None:
      return f"one of {list(self.choices)}"
    lo = None if self.low is None else _num(self.low)
    hi = None if self.high is None else _num(self.high)
    if lo is not None and hi is not None:
      return (f"{'[' if self.include_low else '('}{lo}, {hi}"
              f"{']' if self.include_high else ')'}")
    if lo is not None:
      return f"{'>=' if self.include_low else '>'} {lo}"
    if hi is not None:
      return f"{'<=' if self.include_high else '<'} {hi}"
    return ""

  def _refuse(self, value: Any, what: str) -> ConfigError:
    return ConfigError(f"{self.name}={value!r} {what}")

  def convert(self, value: Any) -> Any:
    """`value` as the setting's type (a str is read as flag text), or ConfigError."""
    kind, accepted = self.kind, self.accepted()
    if self.choices is not None:
      accepted = f"({accepted})"
    elif accepted[:1] in ("[", "("):
      accepted = f"in {accepted}"
    bad = self._refuse(value, f"must be {_KIND_NAMES[kind]} {accepted}".rstrip())
    if kind is str:
      if not isinstance(value, str):
        raise bad
      return value
    if isinstance(value, str):
      text = value.strip().lower()
      if kind is bool:
        if text in _TRUE or text in _FALSE:
          return text in _TRUE
        raise bad
      try:
        value = int(text) if kind is int else float(text)
      except ValueError:
        raise bad from None
    if kind is bool:
      if not isinstance(value, bool):
        raise bad
      return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise bad
    if kind is int:
      if isinstance(value, float) and not value.is_integer():
        raise bad
      return int(value)
    if math.isnan(value):
      raise bad
    return float(value)

  def check(self, value: Any) -> Any:
    """The value as the setting's type, or ConfigError (one line) naming it and the range."""
    value = self.convert(value)
    if self.choices is not None:
      if value not in self.choices:
        raise self._refuse(value, f"is not one of {list(self.choices)}")
      return value
    too_low = self.low is not None and (value < self.low if self.include_low
                                        else value <= self.low)
    too_high = self.high is not None and (value > self.high if self.include_high
                                          else value >= self.high)
    if too_low or too_high:
      accepted = self.accepted()
      raise self._refuse(value, f"must lie in {accepted}" if accepted[0] in "[(" else
                         f"must be {accepted}")
    return value

  def same_flag(self, other: "Hyper") -> bool:
    """Whether two declarations can share one flag: same name, type, default and choices."""
    return (self.name == other.name and self.kind is other.kind
            and self.default == other.default and self.choices == other.choices)

  def describe(self) -> str:
    """The flag's help: the declared text plus the accepted range."""
    accepted = self.accepted()
    return f"{self.help} Accepted: {accepted}." if accepted else self.help


def declared(cls: type) -> Dict[str, Hyper]:
  """{name: Hyper} a method class declares, its bases' included (a subclass inherits them and
  may redeclare one, e.g. with another default). Refuses a name declared twice in one class
  and a name taken by an `ExperimentConfig` field (both would be the same flag)."""
  from sparsefl_jax.config import ExperimentConfig
  fields = {f.name for f in dataclasses.fields(ExperimentConfig)}
  out: Dict[str, Hyper] = {}
  for klass in reversed(cls.__mro__):
    own = vars(klass).get("hyperparams", ())
    names = [h.name for h in own if isinstance(h, Hyper)]
    if len(names) != len(own) or len(set(names)) != len(names):
      raise ConfigError(f"{klass.__name__}.hyperparams must be a tuple of Hyper with distinct "
                        f"names; got {[getattr(h, 'name', h) for h in own]}")
    for h in own:
      if h.name in fields:
        raise ConfigError(f"{klass.__name__} declares hyperparameter {h.name!r}, which is "
                          "already an ExperimentConfig field (the same flag); rename it")
      out[h.name] = h
  return out


def collect(owners: Mapping[str, type]) -> Dict[str, Tuple[Hyper, Tuple[str, ...]]]:
  """{flag name: (Hyper, algorithm names declaring it)} over `owners` ({algorithm name: class}).

  Several methods may share a flag when they declare it alike (`Hyper.same_flag`); two
  different declarations of one name are refused in one line naming both."""
  out: Dict[str, Tuple[Hyper, Tuple[str, ...]]] = {}
  for owner, cls in owners.items():
    for name, h in declared(cls).items():
      if name not in out:
        out[name] = (h, (owner,))
        continue
      first, names = out[name]
      if not first.same_flag(h):
        raise ConfigError(
            f"hyperparameter --{name} is declared differently by algorithm={names[0]!r} "
            f"({first.kind.__name__}, default {first.default!r}) and algorithm={owner!r} "
            f"({h.kind.__name__}, default {h.default!r}); one flag needs the same type, "
            "default and choices: rename one")
      out[name] = (first, names + (owner,))
  return out


def known(extra: Iterable[str] = ()) -> Dict[str, Tuple[Hyper, Tuple[str, ...]]]:
  """`collect` over every name `algorithms.algorithm_class` knows (built-ins, registered) and
  the `extra` names or import specs; a bad extra spec is its one-line ConfigError."""
  from sparsefl_jax import algorithms
  owners: Dict[str, type] = {}
  for name in (*algorithms.names(), *extra):
    if name not in owners:
      owners[name] = algorithms.algorithm_class(name)
  return collect(owners)


def _undeclared(cls: type, label: str, name: str, table: Mapping[str, Hyper]) -> ConfigError:
  listed = sorted(table)
  return ConfigError(f"method_args key {name!r} is not a hyperparameter of algorithm="
                     f"{label!r}; " + (f"declared: {listed}" if listed else
                                       f"{cls.__name__} declares none"))


def check_args(cls: type, args: Mapping[str, Any], label: Optional[str] = None
               ) -> Dict[str, Any]:
  """`args` checked against what `cls` declares: typed values, or ConfigError (one line) for
  an undeclared key (listing the declared names) or a bad value."""
  table = declared(cls)
  out = {}
  for name, value in args.items():
    if name not in table:
      raise _undeclared(cls, label or cls.__name__, name, table)
    out[name] = table[name].check(value)
  return out


def with_defaults(cls: type, args: Mapping[str, Any], label: Optional[str] = None
                  ) -> Dict[str, Any]:
  """Every hyperparameter `cls` declares: the checked value from `args`, else the default."""
  given = check_args(cls, args, label)
  return {name: given.get(name, h.default) for name, h in sorted(declared(cls).items())}


def value(cls: Type, config: Any, name: str) -> Any:
  """The checked value of `cls`'s hyperparameter `name` in `config` (an ExperimentConfig or
  None); its default when the config does not set it. Backs `Algorithm.hyper`."""
  table = declared(cls)
  if name not in table:
    listed = sorted(table)
    raise ConfigError(f"{cls.__name__} declares no hyperparameter {name!r}; " +
                      (f"declared: {listed}" if listed else "it declares none"))
  args = dict(getattr(config, "method_args", ()) or ())
  return table[name].check(args.get(name, table[name].default))
