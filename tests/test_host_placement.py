"""--data_placement=host: cohorts streamed from host storage give bit-identical runs.

References: the engine's in-jit sampler (`sample_clients` inside the round), plain numpy
padding of the stacked arrays, and the device-resident run itself (every metrics field but
wall-clock seconds, every bit of the final state).
"""
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax import ExperimentConfig, train
from sparsefl_jax.config import ConfigError
from sparsefl_jax.data import host_placement as hp
from sparsefl_jax.federated import sharding
from sparsefl_jax.federated.sampling import sample_clients
from reference_runs import comparable_rows

TINY = dict(dataset="synthetic", model="mlp_small", synthetic_shape="6,6,1",
            synthetic_classes=4, synthetic_examples=12, synthetic_test=40, num_clients=7,
            clients_per_round=3, batch_size=5, local_epochs=2, lr=0.2, momentum=0.5,
            rounds=3, progress=False, eval_every=1, checkpoint_every=0, tensorboard=False,
            partition="dirichlet", alpha=0.5, seed=1, data_seed=2, init_seed=3,
            sampling_seed=4)


def _ragged(seed=0, p=6, m=9, shape=(3, 2), dtype=np.uint8):
  """Stacked zero-padded arrays with ragged counts (as FederatedDataset holds them)."""
  rng = np.random.default_rng(seed)
  counts = rng.integers(1, m + 1, p).astype(np.int32)
  counts[0] = m
  x = np.zeros((p, m) + shape, dtype)
  y = np.zeros((p, m), np.int32)
  for i, n in enumerate(counts):
    x[i, :n] = rng.integers(1, 250, (n,) + shape).astype(dtype)
    y[i, :n] = rng.integers(0, 5, n)
  return x, y, counts


@pytest.mark.parametrize("p,k", [(7, 3), (50, 10), (5, 5), (200, 1)])
def test_host_sampler_equals_in_jit_sampler(p, k):
  key = jax.random.fold_in(jax.random.PRNGKey(4), 2)
  jitted = jax.jit(lambda key, t: sample_clients(key, t, p, k))
  for t in (1, 2, 3, 17, 1000):
    got = hp.host_sample_clients(key, t, p, k)
    want = np.asarray(jitted(key, jnp.int32(t)))
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int32 and len(set(got.tolist())) == k
    assert got.min() >= 0 and got.max() < p


def test_array_and_flat_sources_gather_the_padded_rows(tmp_path):
  x, y, counts = _ragged()
  ids = np.asarray([3, 0, 5, 3, 1], np.int32)   # repeats: dummies are client 0 rows
  arrays = hp.ArrayClients(x, y, counts)
  flat = hp.write_flat(str(tmp_path / "flat"), x, y, counts, num_classes=5)
  for src in (arrays, flat):
    gx, gy = src.gather(ids)
    np.testing.assert_array_equal(gx, x[ids])   # numpy reference: the padded stack
    np.testing.assert_array_equal(gy, y[ids])
    assert gx.dtype == np.uint8 and gy.dtype == np.int32
    np.testing.assert_array_equal(src.counts, counts)
    assert (src.num_clients, src.max_examples, src.example_shape) == (6, 9, (3, 2))
  # the folder is plain .npy: memory-mappable, examples back to back
  xm = np.load(str(tmp_path / "flat" / "x.npy"), mmap_mode="r")
  assert xm.shape == (int(counts.sum()), 3, 2)
  np.testing.assert_array_equal(xm[counts[0]:counts[0] + counts[1]], x[1, :counts[1]])
  flat.close()


def test_float64_source_gathers_what_the_device_holds():
  x, y, counts = _ragged(dtype=np.float64)
  gx, _ = hp.ArrayClients(x, y, counts).gather(np.asarray([1, 2]))
  on_device = jnp.asarray(x)[jnp.asarray([1, 2])]   # ClientData.from_arrays' conversion
  assert gx.dtype == on_device.dtype
  np.testing.assert_array_equal(gx, np.asarray(on_device))


def test_flat_writer_and_reader_errors(tmp_path):
  w = hp.FlatWriter(str(tmp_path / "a"), 5, (2,))
  with pytest.raises(ValueError, match=r"expected \(n >= 1, \(2,\)\)"):
    w.add(np.zeros((2, 3), np.uint8), np.zeros(2, np.int32))
  w.add(np.ones((3, 2), np.uint8), np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="3 examples added, total_examples=5"):
    w.close()
  with pytest.raises(ValueError, match="meta.json missing"):
    hp.FlatClients(str(tmp_path / "nothing"))
  w2 = hp.FlatWriter(str(tmp_path / "b"), 3, (2,))
  w2.add(np.ones((3, 2), np.uint8), np.zeros(3, np.int32))
  with pytest.raises(ValueError, match="max_examples=2 is below the largest client"):
    w2.close(max_examples=2)


def test_shard_clients_one_device_fetches_everything():
  seen = []

  def fetch(rows):
    seen.append(rows)
    return np.arange(12).reshape(4, 3), np.arange(4)

  shapes = (jax.ShapeDtypeStruct((4, 3), np.int64), jax.ShapeDtypeStruct((4,), np.int64))
  a, b = sharding.shard_clients(shapes, None, fetch)
  assert seen == [slice(None)]
  np.testing.assert_array_equal(a, np.arange(12).reshape(4, 3))




def _state_digests(workdir):
  """sha256 of every array of the newest checkpoint (dtype, shape and bytes), as saved."""
  ckpt = os.path.join(workdir, "checkpoints")
  last = max(int(s) for s in os.listdir(ckpt) if s.isdigit())
  with open(os.path.join(ckpt, str(last), "meta", "metadata")) as f:
    digests = json.load(f)["sha256"]
  assert any(k.startswith("params/") for k in digests)
  return last, digests


def _same_runs(a, b):
  assert comparable_rows(a) == comparable_rows(b)
  assert _state_digests(a) == _state_digests(b)   # every bit of the final server state


CASES = {
    "fedavg": dict(algorithm="fedavg"),                                      # vmap
    "fedsparsify_local_map": dict(algorithm="fedsparsify_local", sparsity=0.6,
                                  client_map="map", prune_start_round=0),    # streamed votes
    "snip_chunked": dict(algorithm="snip", sparsity=0.5, client_map="chunked"),  # probe
}


@pytest.fixture(scope="module")
def device_runs(tmp_path_factory):
  """The device-resident runs every host-placement run is compared with (run on demand)."""
  root, done = tmp_path_factory.mktemp("device"), {}

  def get(name):
    if name not in done:
      cfg = ExperimentConfig(**TINY, **CASES[name], workdir=str(root / name))
      train.run(cfg)
      done[name] = cfg
    return done[name]

  return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_host_placement_is_bit_identical_to_device(tmp_path, device_runs, name):
  dev = device_runs(name)
  host = dev.replace(data_placement="host", workdir=str(tmp_path / "host"))
  train.run(host)
  _same_runs(dev.workdir, host.workdir)


def test_resume_may_switch_placement(tmp_path, device_runs):
  """data_placement changes no result, so a resumed run may switch it."""
  whole = device_runs("fedavg")
  part = whole.replace(workdir=str(tmp_path / "part"), checkpoint_every=1)
  train.run(part, max_rounds=2)
  train.run(part.replace(resume=True, data_placement="host"))
  _same_runs(whole.workdir, part.workdir)


def test_prefetch_prepares_the_next_round_and_drops_stale_ones():
  cfg = ExperimentConfig(**TINY, data_placement="host", workdir="/unused")
  exp = train.build_experiment(cfg)
  step = exp.round_step
  assert isinstance(step, hp.HostRoundStep)
  state0 = exp.init_state
  s1, m1 = step(state0, exp.client_data, exp.train_key)
  assert list(step._pending) == [2]            # round 2 is being prepared during round 1
  cohort2, _ = step._pending[2].result()
  want2 = hp.host_sample_clients(state0.sampling_key, 2, 7, 3)
  np.testing.assert_array_equal(np.asarray(cohort2.ids), want2)
  x, _ = exp.client_data.gather(want2)
  np.testing.assert_array_equal(np.asarray(cohort2.x), x)
  # the same round again (as after a restore): the stale round-2 prefetch is dropped
  exp2 = train.build_experiment(cfg)
  again, m1b = step(exp2.init_state, exp.client_data, exp.train_key)
  assert list(step._pending) == [2]
  chex.assert_trees_all_equal(jax.device_get(m1), jax.device_get(m1b))
  assert [ld.round for ld in step.loads] == [1, 1]
  assert all(ld.prepare_s > 0 and ld.bytes > 0 for ld in step.loads)
  step.close()


def test_bad_placement_is_one_line():
  with pytest.raises(ConfigError, match=r"data_placement='disk' is not one of \['device', "
                     r"'host'\]"):
    ExperimentConfig(**TINY, data_placement="disk", workdir="/x").validate()
  with pytest.raises(ConfigError, match="client_source is read only with data_placement"):
    train.build_experiment(ExperimentConfig(**TINY, workdir="/x"),
                           client_source=hp.ArrayClients(*_ragged()))


DIGITS = dict(dataset="digits", model="mlp_small", num_clients=20, clients_per_round=4,
              batch_size=25, local_epochs=1, lr=0.1, rounds=2, progress=False, eval_every=1,
              checkpoint_every=0, tensorboard=False, partition="lda", alpha=0.5, seed=1,
              data_seed=2, init_seed=3, sampling_seed=4)


def test_host_data_dir_trains_from_disk_bit_identically(tmp_path):
  """--host_data_dir: the training split read per cohort from a flat folder on disk equals
  the in-memory run (the dataset supplies only test split, classes and normalisation)."""
  dev = ExperimentConfig(**DIGITS, workdir=str(tmp_path / "device"))
  ds = train.build_dataset(dev)
  folder = str(tmp_path / "flat")
  hp.write_flat(folder, ds.train_x, ds.train_y, ds.counts, num_classes=ds.num_classes)
  disk = dev.replace(data_placement="host", host_data_dir=folder,
                     workdir=str(tmp_path / "disk"))
  train.run(dev)
  train.run(disk)
  _same_runs(dev.workdir, disk.workdir)
  with pytest.raises(ConfigError, match=r"num_clients=21 must lie in \[1, 20\]"):
    train.run(disk.replace(num_clients=21, workdir=str(tmp_path / "more")))
  with pytest.raises(ConfigError, match=r"host_data_dir='.*' is read only with "
                     r"data_placement='host' \(got 'device'\)"):
    disk.replace(data_placement="device").validate()
  with pytest.raises(ConfigError, match=r"holds examples of shape \(8, 8, 1\), but "
                     r"dataset='synthetic' has \(6, 6, 1\)"):
    train.run(disk.replace(dataset="synthetic", synthetic_shape="6,6,1",
                           workdir=str(tmp_path / "shape")))
