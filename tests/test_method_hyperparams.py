"""Hyperparameters declared with the method: flags, method_args, config.json, resume, errors.

tests/my_hyper_method.py is a user's file: MyHyperMethod declares my_scale (a float in
(0, 10]) and my_mode (multiply|divide); nothing in sparsefl_jax names them.
"""
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags

from sparsefl_jax import algorithms, train
from sparsefl_jax.algorithms import FedAvg, Hyper, hyper
from sparsefl_jax.config import (ConfigError, ExperimentConfig, config_from_json,
                                 config_to_json, parse_flagfile)

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SPEC = "my_hyper_method:MyHyperMethod"
SMALL = dict(dataset="synthetic", model="linear", synthetic_shape="4,4,1",
             synthetic_classes=3, synthetic_examples=8, synthetic_test=8, num_clients=2,
             clients_per_round=2, batch_size=4, rounds=1, progress=False, tensorboard=False,
             checkpoint_every=1)
SMALL_FLAGS = [f"--{k}={v}" for k, v in SMALL.items() if k not in ("progress", "tensorboard")
               ] + ["--noprogress", "--notensorboard"]


@pytest.fixture(autouse=True)
def _tests_on_path(monkeypatch):
  monkeypatch.syspath_prepend(TESTS)
  monkeypatch.setattr(algorithms, "_REGISTERED", {})   # no registration leaks out


def _method():
  import my_hyper_method
  return my_hyper_method


def _one_line(text: str) -> str:
  lines = [l for l in text.splitlines() if l.strip()]
  assert len(lines) == 1, text
  return lines[0]


# ---- Hyper itself ---------------------------------------------------------------------------
def test_check_types_values_and_names_the_range_in_one_line():
  table = hyper.declared(_method().MyHyperMethod)
  scale, mode = table["my_scale"], table["my_mode"]
  assert scale.check(2) == 2.0 and isinstance(scale.check(2), float)
  assert scale.check("0.5") == 0.5 and scale.check(10) == 10.0   # (0, 10]: 10 is accepted
  for bad, message in [(12, "my_scale=12.0 must lie in (0, 10]"),
                       (0.0, "my_scale=0.0 must lie in (0, 10]"),
                       ("abc", "my_scale='abc' must be a float in (0, 10]"),
                       (True, "my_scale=True must be a float in (0, 10]"),
                       (float("nan"), "my_scale=nan must be a float in (0, 10]")]:
    with pytest.raises(ConfigError) as e:
      scale.check(bad)
    assert str(e.value) == message
  assert mode.check("divide") == "divide"
  with pytest.raises(ConfigError, match=r"^my_mode='bogus' is not one of \['multiply', "
                     r"'divide'\]$"):
    mode.check("bogus")
  count = Hyper("my_count", 3, "A count.", low=1)
  assert count.check("4") == 4 and count.check(5.0) == 5
  with pytest.raises(ConfigError, match=r"^my_count=0 must be >= 1$"):
    count.check(0)
  with pytest.raises(ConfigError, match=r"^my_count=2.5 must be an int >= 1$"):
    count.check(2.5)
  flag = Hyper("my_flag", False, "A switch.")
  assert flag.check("true") is True and flag.check(False) is False


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="my_x", default=20.0, help="", low=0, high=10),
     r"Hyper\('my_x'\): the default is refused: my_x=20.0 must lie in \[0, 10\]"),
    (dict(name="MyX", default=1, help=""), r"must be a lower-case identifier"),
    (dict(name="my_x", default=[1], help=""), r"must be a bool, int, float or str"),
    (dict(name="my_x", default="a", help="", low=0), r"low/high bound numbers"),
])
def test_a_bad_declaration_is_refused(kwargs, message):
  with pytest.raises(ConfigError, match=message):
    Hyper(**kwargs)


def test_subclasses_inherit_and_fields_cannot_be_redeclared():
  child = hyper.declared(_method().MyHyperChild)
  assert list(child) == ["my_scale", "my_mode", "my_verbose"]

  @dataclasses.dataclass(frozen=True)
  class Clash(FedAvg):
    hyperparams = (Hyper("beta", 1.5, "Already an ExperimentConfig field."),)
  with pytest.raises(ConfigError, match="'beta', which is already an ExperimentConfig field"):
    hyper.declared(Clash)


def test_two_classes_declaring_one_name_differently_is_one_line_error():   # (f)
  m = _method()
  shared = hyper.collect({"a": m.MyHyperMethod, "b": m.MyHyperChild})
  assert shared["my_scale"][1] == ("a", "b") and shared["my_verbose"][1] == ("b",)
  with pytest.raises(ConfigError) as e:
    hyper.collect({"a": m.MyHyperMethod, "b": m.MyScaleAsInt})
  assert _one_line(str(e.value)) == (
      "hyperparameter --my_scale is declared differently by algorithm='a' (float, default "
      "1.0) and algorithm='b' (int, default 1); one flag needs the same type, default and "
      "choices: rename one")


# ---- ExperimentConfig.method_args -----------------------------------------------------------
def test_method_args_accepts_a_dict_and_is_sorted_and_hashable():
  cfg = ExperimentConfig(algorithm=SPEC, method_args={"my_scale": 2.0, "my_mode": "divide"})
  assert cfg.method_args == (("my_mode", "divide"), ("my_scale", 2.0))
  assert hash(cfg) == hash(cfg.replace())
  assert cfg.replace(method_args={"my_scale": 3}).method_args == (("my_scale", 3),)
  assert ExperimentConfig().method_args == ()
  assert cfg.validate() is cfg
  assert dict(cfg.replace(method_args={}).with_method_defaults().method_args) == {
      "my_mode": "multiply", "my_scale": 1.0}
  m = _method()
  assert m.MyHyperMethod.hyper(cfg, "my_scale") == 2.0
  assert m.MyHyperMethod.hyper(ExperimentConfig(algorithm=SPEC), "my_mode") == "multiply"
  with pytest.raises(ConfigError, match=r"MyHyperMethod declares no hyperparameter 'nope'; "
                     r"declared: \['my_mode', 'my_scale'\]"):
    m.MyHyperMethod.hyper(cfg, "nope")


@pytest.mark.parametrize("algorithm, args, message", [   # (d) through the library
    (SPEC, {"my_scale": 10.5}, r"^my_scale=10.5 must lie in \(0, 10\]$"),
    (SPEC, {"my_mode": "cube"}, r"^my_mode='cube' is not one of \['multiply', 'divide'\]$"),
    (SPEC, {"my_scal": 1.0}, r"^method_args key 'my_scal' is not a hyperparameter of "
     r"algorithm='my_hyper_method:MyHyperMethod'; declared: \['my_mode', 'my_scale'\]$"),
    ("fedavg", {"my_scale": 1.0}, r"^method_args key 'my_scale' is not a hyperparameter of "
     r"algorithm='fedavg'; FedAvg declares none$"),
])
def test_validate_refuses_bad_method_args_in_one_line(algorithm, args, message):
  with pytest.raises(ConfigError, match=message):
    ExperimentConfig(algorithm=algorithm, method_args=args).validate()


def test_config_json_round_trip_and_older_files():   # (e)
  cfg = ExperimentConfig(algorithm=SPEC, method_args={"my_scale": 0.5, "my_mode": "divide"})
  values = json.loads(json.dumps(config_to_json(cfg), allow_nan=False))
  assert values["method_args"] == {"my_mode": "divide", "my_scale": 0.5}
  assert config_from_json(values) == cfg
  del values["method_args"]   # a config.json written before method_args existed
  assert config_from_json(values).method_args == ()


def test_non_finite_float_hyperparameter_round_trips_as_strict_json():

  @dataclasses.dataclass(frozen=True)
  class Unbounded(FedAvg):
    hyperparams = (Hyper("my_temperature", 1.0, "Unbounded float."),)
  algorithms.register_algorithm("unbounded", Unbounded)
  cfg = ExperimentConfig(algorithm="unbounded", method_args={"my_temperature": math.inf})
  text = json.dumps(config_to_json(cfg), allow_nan=False)
  assert '"my_temperature": "inf"' in text
  assert config_from_json(json.loads(text)) == cfg


# ---- flagfiles (c) --------------------------------------------------------------------------
def test_flagfile_lines_naming_hyperparameters_go_into_method_args(tmp_path):
  inner = tmp_path / "inner.flags"
  inner.write_text("--my_mode=divide\n")
  path = tmp_path / "mine.flags"
  path.write_text(f"# a user's method\n--algorithm={SPEC}\n--rounds=2\n--my_scale=0.25\n"
                  "--flagfile=inner.flags\n")
  assert parse_flagfile(str(path)) == {"algorithm": SPEC, "rounds": 2, "method_args": {
      "my_scale": 0.25, "my_mode": "divide"}}
  cfg = ExperimentConfig.from_flagfile(str(path), method_args={"my_scale": 4.0}).validate()
  assert cfg.method_args == (("my_mode", "divide"), ("my_scale", 4.0))
  child = tmp_path / "child.flags"
  child.write_text("--algorithm=my_hyper_method:MyHyperChild\n--my_verbose\n")
  assert parse_flagfile(str(child))["method_args"] == {"my_verbose": True}


def test_flagfile_errors_stay_one_line(tmp_path):
  unknown = tmp_path / "unknown.flags"
  unknown.write_text(f"--algorithm={SPEC}\n--my_scael=0.5\n")
  with pytest.raises(ConfigError, match=r"unknown\.flags: unknown flag --my_scael$"):
    parse_flagfile(str(unknown))
  bad = tmp_path / "bad.flags"
  bad.write_text(f"--algorithm={SPEC}\n--my_scale=big\n")
  with pytest.raises(ConfigError, match=r"bad\.flags: my_scale='big' must be a float in "
                     r"\(0, 10\]$"):
    parse_flagfile(str(bad))
  other = tmp_path / "other.flags"   # declared by the file's spec, but the run is fedavg
  other.write_text(f"--algorithm={SPEC}\n--my_scale=0.5\n--algorithm=fedavg\n")
  with pytest.raises(ConfigError, match=r"'my_scale' is not a hyperparameter of "
                     r"algorithm='fedavg'"):
    ExperimentConfig.from_flagfile(str(other)).validate()


# ---- the library path (a) -------------------------------------------------------------------
def _one_round(cfg):
  exp = train.build_experiment(cfg)
  state, _ = exp.round_step(exp.init_state, exp.client_data, exp.train_key)
  return exp, jax.device_get(state.params)


def test_hyperparameters_change_the_result_through_build_experiment(tmp_path):
  base = ExperimentConfig(**SMALL, workdir=str(tmp_path))
  _, ref = _one_round(base)
  exp, default = _one_round(base.replace(algorithm=SPEC))
  assert exp.algorithm.scale == 1.0 and exp.algorithm.mode == "multiply"
  jax.tree.map(np.testing.assert_array_equal, default, ref)
  exp, half = _one_round(base.replace(algorithm=SPEC, method_args={"my_scale": 0.5}))
  assert exp.algorithm.scale == 0.5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 0.5 * b, rtol=1e-6), half, ref)
  _, divided = _one_round(base.replace(algorithm=SPEC, method_args={
      "my_scale": 2.0, "my_mode": "divide"}))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), divided, half)


def test_run_records_every_hyperparameter_and_refuses_a_changed_one_on_resume(tmp_path):
  cfg = ExperimentConfig(**{**SMALL, "rounds": 2}, algorithm=SPEC,
                         method_args={"my_scale": 0.5}, workdir=str(tmp_path / "r"))
  train.run(cfg, max_rounds=1)
  with open(tmp_path / "r" / "config.json") as f:
    saved = json.load(f)
  assert saved["method_args"] == {"my_mode": "multiply", "my_scale": 0.5}   # defaults too
  assert config_from_json(saved) == cfg.with_method_defaults()
  with pytest.raises(ConfigError, match=r"--resume with method_args=.*'my_scale', 0.25.*"
                     r"used method_args=.*'my_scale', 0.5"):
    train.run(cfg.replace(resume=True, method_args={"my_scale": 0.25}))
  assert train.run(cfg.replace(resume=True))["round"] == 2


# ---- experiments/run.py (b, c, d) -----------------------------------------------------------
def _run_py(*args):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]), JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "run.py"), *args],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_run_py_takes_the_hyperparameters_as_flags(tmp_path):
  proc = _run_py(f"--algorithm={SPEC}", "--my_scale=0.5", "--my_mode=divide", *SMALL_FLAGS,
                 f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "done: 1 rounds" in proc.stdout
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["method_args"] == {"my_mode": "divide", "my_scale": 0.5}


def test_run_py_reads_hyperparameters_from_a_flagfile(tmp_path):
  path = tmp_path / "mine.flags"
  path.write_text("\n".join(["--algorithm=my_hyper_method:MyHyperChild", "--my_scale=2",
                             "--my_verbose", *SMALL_FLAGS]) + "\n")
  proc = _run_py(f"--flagfile={path}", f"--workdir={tmp_path / 'w'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  with open(tmp_path / "w" / "config.json") as f:
    assert json.load(f)["method_args"] == {"my_mode": "multiply", "my_scale": 2.0,
                                           "my_verbose": True}


def test_run_py_resumes_a_run_the_library_started(tmp_path):
  """The library run set no hyperparameter; run.py passes them all at their defaults: the
  same values, so the resume goes ahead."""
  cfg = ExperimentConfig(**{**SMALL, "rounds": 2}, algorithm=SPEC, workdir=str(tmp_path))
  train.run(cfg, max_rounds=1)
  proc = _run_py(f"--algorithm={SPEC}", *SMALL_FLAGS, "--rounds=2", "--resume",
                 f"--workdir={tmp_path}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "done: 2 rounds" in proc.stdout
  bad = _run_py(f"--algorithm={SPEC}", *SMALL_FLAGS, "--rounds=2", "--resume", "--my_scale=3",
                f"--workdir={tmp_path}")
  assert bad.returncode == 2 and "--resume with method_args=" in _one_line(bad.stderr)


@pytest.mark.parametrize("args, message", [
    ([f"--algorithm={SPEC}", "--my_scale=20"], "error: my_scale=20.0 must lie in (0, 10]"),
    ([f"--algorithm={SPEC}", "--my_mode=cube"],
     "my_mode='cube' is not one of ['multiply', 'divide']"),
    ([f"--algorithm={SPEC}", "--my_scale=0.5", "--algorithm=fedavg"],
     "error: --my_scale is a hyperparameter of algorithm ['my_hyper_method:MyHyperMethod'], "
     "not of algorithm='fedavg' (it declares none)"),
    ([f"--algorithm={SPEC}", "--algorithm=my_hyper_method:MyScaleAsInt"],
     "error: hyperparameter --my_scale is declared differently by algorithm="
     "'my_hyper_method:MyHyperMethod' (float, default 1.0) and algorithm="
     "'my_hyper_method:MyScaleAsInt' (int, default 1)"),
    (["--algorithm=my_hyper_method:Nope"], "module 'my_hyper_method' has no 'Nope'"),
])
def test_run_py_errors_are_one_line_exit_2(tmp_path, args, message):   # (d), (f)
  proc = _run_py(*args, *SMALL_FLAGS, f"--workdir={tmp_path}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert message in _one_line(proc.stderr)


def test_helpfull_lists_an_import_spec_methods_hyperparameters():
  proc = _run_py(f"--algorithm={SPEC}", "--helpfull")
  assert proc.returncode == 1, proc.stderr[-2000:]   # absl's exit status for --helpfull
  flat = "".join(proc.stdout.split())
  assert "--my_mode:<multiply|divide>:" in flat and "Accepted:(0,10]." in flat


def _load_run_py():
  spec = importlib.util.spec_from_file_location(
      "run_py_under_test", os.path.join(ROOT, "experiments", "run.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_flags_of_known_algorithms_fill_method_args_and_refuse_other_algorithms():
  """What run.py does for a built-in that declares hyperparameters (a registered name
  stands in for one): its flags exist whatever --algorithm is, and one set for an
  algorithm that does not declare it is refused."""
  run_py = _load_run_py()
  algorithms.register_algorithm("scaled", _method().MyHyperMethod)
  fv = flags.FlagValues()
  run_py.define_flags(["run.py"], fv)
  assert fv["my_scale"].default == 1.0 and fv["my_mode"].flag_type() == "string enum"
  fv(["run.py", f"--algorithm={SPEC}", "--my_mode=divide"])
  assert run_py.config_from_flags(fv).method_args == (("my_mode", "divide"),
                                                      ("my_scale", 1.0))
  fv.unparse_flags()
  fv(["run.py", "--my_scale=0.5"])   # --algorithm stays fedavg
  with pytest.raises(ConfigError, match=r"^--my_scale is a hyperparameter of algorithm "
                     r"\['scaled'\], not of algorithm='fedavg' \(it declares none\)"):
    run_py.config_from_flags(fv)
