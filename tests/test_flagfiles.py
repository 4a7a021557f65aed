"""Every shipped flagfile parses into a valid config; paper settings dry-run on mock data."""
import glob
import os

import pytest
import tensorflow_datasets as tfds

from sparsefl_jax import ExperimentConfig, train
from sparsefl_jax.config import ConfigError, parse_flagfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILES = sorted(glob.glob(os.path.join(ROOT, "experiments", "**", "*.flags"),
                             recursive=True))
DRY_RUN = dict(num_clients=4, clients_per_round=2, rounds=1, partition="iid",
               val_fraction=0.0, progress=False, eval_batch_size=8)


@pytest.mark.parametrize("path", FLAGFILES, ids=os.path.basename)
def test_flagfile_is_a_valid_config(path):
  ExperimentConfig.from_flagfile(path).validate()


def test_flagfile_parser_rejects_unknown_flags(tmp_path):
  bad = tmp_path / "bad.flags"
  bad.write_text("# comment\n--rounds=3\n--no_such_flag=1\n")
  with pytest.raises(ConfigError, match="unknown flag --no_such_flag"):
    parse_flagfile(str(bad))
  good = tmp_path / "good.flags"
  good.write_text("--noprogress\n--rounds=3\n")
  assert parse_flagfile(str(good)) == {"progress": False, "rounds": 3}


@pytest.mark.parametrize("name", [
    "zerofl_femnist",
    pytest.param("zerofl_cifar10", marks=pytest.mark.slow),   # ResNet-18 compile on CPU
])
def test_paper_setting_dry_runs_on_mock_data(tmp_path, name):
  path = os.path.join(ROOT, "experiments", "flags", f"{name}.flags")
  (tmp_path / "tfds").mkdir()   # data_dir must exist (it is never created)
  cfg = ExperimentConfig.from_flagfile(path, data_dir=str(tmp_path / "tfds"),
                                       workdir=str(tmp_path / "w"), **DRY_RUN)
  # 4 clients x 32 examples: every client holds at least the flagfile's batch_size=32.
  with tfds.testing.mock_data(num_examples=128):
    row = train.run(cfg)
  assert row["round"] == 1 and 0.0 <= row["test_accuracy"] <= 1.0
