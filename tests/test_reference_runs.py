"""Every method's short reference run reproduces its recorded metrics and final parameters.

The fixtures (`tests/fixtures/reference/`, written by `python tests/reference_runs.py --write`)
guard refactors such as a new algorithm contract: on the CPU and jax version they were
recorded with, the replay must be bit-identical (every metrics field but `seconds`, every
parameter bit). XLA:CPU picks other kernels on other CPU models, so there the check is a
float tolerance instead, and the test says so.
"""
import json
import os

import numpy as np
import pytest

import reference_runs as ref

SAME_MACHINE = (os.path.exists(os.path.join(ref.FIXTURES, "machine.json")) and
                json.load(open(os.path.join(ref.FIXTURES, "machine.json"))) == ref.machine())


def _close(a, b, path=""):
  """Exact on the recording machine, else within float tolerance (ints and lists exact)."""
  if isinstance(a, dict):
    assert sorted(a) == sorted(b), (path, sorted(set(a) ^ set(b)))
    for k in a:
      _close(a[k], b[k], f"{path}/{k}")
  elif isinstance(a, float) or isinstance(b, float):
    if SAME_MACHINE:
      assert a == b, (path, a, b)
    else:
      assert a == pytest.approx(b, rel=1e-4, abs=1e-6), (path, a, b)
  else:
    assert a == b, (path, a, b)


@pytest.mark.parametrize("name", sorted(ref.RUNS))
def test_reference_run_is_reproduced(name, tmp_path):
  rows, params = ref.run_one(name, str(tmp_path / name))
  with open(os.path.join(ref.FIXTURES, f"{name}.jsonl")) as f:
    want_rows = [json.loads(line) for line in f]
  want = np.load(os.path.join(ref.FIXTURES, f"{name}.npz"))
  assert len(rows) == len(want_rows)
  for got, exp in zip(rows, want_rows):
    _close(json.loads(json.dumps(got)), exp, f"round {exp['round']}")
  assert sorted(params) == sorted(want.files)
  for k in want.files:
    if SAME_MACHINE:
      np.testing.assert_array_equal(params[k], want[k], err_msg=k)
    else:
      np.testing.assert_allclose(params[k], want[k], rtol=1e-4, atol=1e-5, err_msg=k)
