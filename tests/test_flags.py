"""Discoverable flags: --helpfull lists every accepted value; the lists match the registries."""
import dataclasses
import os
import subprocess
import sys

import pytest

from sparsefl_jax import algorithms, config, data, models
from sparsefl_jax.config import ExperimentConfig
from sparsefl_jax.federated import optimizers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHOICE_FIELDS = [f for f in dataclasses.fields(ExperimentConfig) if f.metadata.get("choices")]


def _run_script(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "run.py"), *args],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


@pytest.fixture(scope="module")
def helpfull():
  proc = _run_script("--helpfull")
  assert proc.returncode == 1 and "--algorithm" in proc.stdout, proc.stderr[-2000:]  # absl's
  return proc.stdout


def test_config_choices_mirror_the_registries():
  assert set(config.MODELS) == set(models.MODELS)
  assert set(config.DATASETS) == set(data.DATASETS)
  assert set(config.PARTITIONS) == set(data.PARTITIONS)
  assert set(config.SERVER_OPTIMIZERS) == {""} | set(optimizers.SERVER_OPTIMIZERS)


@pytest.mark.parametrize("name", ["model", "dataset", "partition", "server_optimizer",
                                  "client_map", "comm_encoding"])
def test_string_settings_with_a_fixed_set_are_choices(name):
  assert name in [f.name for f in CHOICE_FIELDS]


def test_algorithm_choices_come_from_the_registry(helpfull):
  flat = "".join(helpfull.split())
  assert f"--algorithm:<{'|'.join(algorithms.names())}>:" in flat


def test_every_builtin_declares_its_name_and_description_in_its_own_file():
  for name in algorithms.ALGORITHMS:
    cls = algorithms.algorithm_class(name)
    assert cls.name == name and vars(cls).get("description"), name
    assert cls.__module__.startswith("sparsefl_jax.algorithms."), name


def test_helpfull_lists_every_choice(helpfull):
  flat = "".join(helpfull.split())   # absl wraps long lines, even inside a value list
  for field in CHOICE_FIELDS:
    listed = f"--{field.name}:<{'|'.join(field.metadata['choices'])}>:"
    assert listed in flat, f"--helpfull does not list the choices of --{field.name}"


def test_helpfull_describes_each_algorithm_in_one_line(helpfull):
  flat = "".join(helpfull.split())   # absl wraps at spaces and hyphens
  for name, text in algorithms.descriptions().items():
    assert "".join(f"{name} = {text}".split()) in flat, name


@pytest.mark.parametrize("flag, value", [("algorithm", "fedfoo"), ("partition", "shards"),
                                         ("server_optimizer", "adamw")])
def test_bad_choice_exits_2_with_one_line_naming_the_accepted_values(tmp_path, flag, value):
  proc = _run_script(f"--{flag}={value}", f"--workdir={tmp_path}")
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1, proc.stderr
  choices = (algorithms.names() if flag == "algorithm" else
             next(f for f in CHOICE_FIELDS if f.name == flag).metadata["choices"])
  assert f"{flag}={value!r}" in lines[0]
  assert str(list(choices)) in lines[0]


def test_config_validate_names_the_accepted_values():
  with pytest.raises(config.ConfigError, match=r"model='resnet99' is not one of \['linear'"):
    ExperimentConfig(model="resnet99").validate()
