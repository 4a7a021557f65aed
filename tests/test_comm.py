"""Communication accounting: encodings, ZeroFL's CSR sizes, FedSparsify."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax import comm
from sparsefl_jax.sparsity import masks as masks_lib


def test_encoded_bytes_formulas():
  assert comm.encoded_bytes(10, 100, "dense") == 400
  assert comm.encoded_bytes(10, 100, "csr") == 4 * 10 + 4 * 10 + 4 * 2
  assert comm.encoded_bytes(10, 100, "csr", rows=5) == 80 + 24
  assert comm.encoded_bytes(10, 100, "bitmask") == 13 + 40
  assert comm.encoded_bytes(0, 8, "bitmask") == 1
  assert int(comm.encoded_bytes(jnp.int32(10), 100, "csr")) == 88
  assert set(comm.ENCODINGS) == {"auto", "dense", "csr", "bitmask"}
  # auto: the cheapest of the three (dense 400, csr 88, bitmask 53 at 10 of 100).
  assert comm.encoded_bytes(10, 100, "auto") == 53
  assert comm.encoded_bytes(1, 100, "auto") == 16          # csr below ~3% density
  assert comm.encoded_bytes(100, 100, "auto") == 400       # dense when dense
  assert int(comm.encoded_bytes(jnp.int32(1), 100, "auto")) == 16


def test_unknown_encoding():
  with pytest.raises(ValueError, match="'coo'.*auto, dense, csr, bitmask"):
    comm.encoded_bytes(1, 1, "coo")
  with pytest.raises(ValueError, match="accepted"):
    comm.tree_bytes({"a": jnp.ones(3)}, "gzip")


def sparse_tree(seed=0):
  rng = np.random.RandomState(seed)
  a = rng.randn(5, 7).astype(np.float32)
  a[rng.rand(5, 7) < 0.7] = 0
  b = rng.randn(9).astype(np.float32)
  c = np.zeros((3, 3), np.float32)
  return {"a": a, "b": b, "c": c}


@pytest.mark.parametrize("encoding", ["auto", "dense", "csr", "bitmask"])
def test_tree_bytes_matches_explicit_count(encoding):
  tree = sparse_tree()
  want = 0
  for x in tree.values():
    nnz = sum(1 for v in x.ravel() if v != 0)
    costs = {"dense": 4 * x.size, "csr": 8 * nnz + 8,
             "bitmask": math.ceil(x.size / 8) + 4 * nnz}
    want += min(costs.values()) if encoding == "auto" else costs[encoding]
  jtree = jax.tree.map(jnp.asarray, tree)
  assert int(comm.tree_bytes(jtree, encoding)) == want
  assert comm.tree_bytes_host(tree, encoding) == want
  assert int(jax.jit(lambda t: comm.tree_bytes(t, encoding))(jtree)) == want
  # vmap over clients.
  trees = [sparse_tree(s) for s in range(3)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  per_client = jax.jit(jax.vmap(lambda t: comm.tree_bytes(t, encoding)))(
      stacked)
  np.testing.assert_array_equal(
      per_client, [comm.tree_bytes_host(t, encoding) for t in trees])


def test_tree_nnz_and_filter():
  tree = sparse_tree()
  assert int(comm.tree_nnz(jax.tree.map(jnp.asarray, tree))) == sum(
      int(np.count_nonzero(x)) for x in tree.values())
  only_a = lambda path, leaf: path == "a"  # noqa: E731
  assert comm.tree_size(tree, only_a) == 35
  assert int(comm.tree_bytes(tree, "dense", only_a)) == 140


def resnet18_cifar_shapes():
  """(name, shape, is_sparse_3x3) for CIFAR ResNet-18 with a 3x3 stem."""
  out = [("stem", (3, 3, 3, 64), False), ("stem_bn_scale", (64,), False),
         ("stem_bn_bias", (64,), False)]
  c_in = 64
  for stage, c in enumerate((64, 128, 256, 512)):
    for block in range(2):
      cin = c_in if block == 0 else c
      pre = f"s{stage}b{block}"
      out += [(pre + "_conv1", (3, 3, cin, c), True),
              (pre + "_bn1_scale", (c,), False),
              (pre + "_bn1_bias", (c,), False),
              (pre + "_conv2", (3, 3, c, c), True),
              (pre + "_bn2_scale", (c,), False),
              (pre + "_bn2_bias", (c,), False)]
      if block == 0 and cin != c:
        out += [(pre + "_short", (1, 1, cin, c), False),
                (pre + "_short_bn_scale", (c,), False),
                (pre + "_short_bn_bias", (c,), False)]
    c_in = c
  out += [("fc_kernel", (512, 10), False), ("fc_bias", (10,), False)]
  return out


def test_resnet18_param_count():
  shapes = resnet18_cifar_shapes()
  sizes = [math.prod(s) for _, s, _ in shapes]
  assert sum(sizes) == 11_173_962
  assert sum(math.prod(s) for _, s, sp in shapes if sp) == 10_985_472
  assert sum(1 for *_, sp in shapes if sp) == 16


def test_zerofl_csr_size_resnet18():
  """ZeroFL Table: 95% sparsity, r_mask = 0 -> 5.9 MB per client upload.

  3x3 convs except the stem at 5% density (k = ceil(0.05 * n)), every other
  tensor sent whole; every tensor encoded as vectorised CSR.
  """
  shapes = resnet18_cifar_shapes()
  total = 0
  dense = 0
  for _, shape, sparse in shapes:
    n = math.prod(shape)
    nnz = math.ceil(0.05 * n) if sparse else n
    total += comm.encoded_bytes(nnz, n, "csr")
    dense += comm.encoded_bytes(nnz, n, "dense")
  # Decimal MB (10**6 bytes) fits: 5.90 MB.
  assert abs(total / comm.MB - 5.9) / 5.9 < 0.03
  # The binary reading (MiB) does not: 5.63 MiB is 4.6% off.
  assert abs(total / comm.MIB - 5.9) / 5.9 > 0.03
  # Dense: 44.70 MB or 42.63 MiB against the reported 43.7: both readings
  # are ~2.3-2.5% off, so the dense figure cannot tell them apart.
  assert abs(dense / comm.MB - 43.7) / 43.7 < 0.03
  assert abs(dense / comm.MIB - 43.7) / 43.7 < 0.03
  assert dense == 4 * 11_173_962


def test_zerofl_csr_from_arrays_small():
  """The tree path agrees with the count path on actual sparse arrays."""
  rng = np.random.RandomState(0)
  tree = {"conv": jnp.asarray(rng.randn(3, 3, 16, 32), jnp.float32),
          "bn": jnp.asarray(rng.randn(32), jnp.float32)}
  sparse = masks_lib.apply_masks(
      tree, {"conv": jnp.abs(tree["conv"]) >= jnp.sort(
          jnp.abs(tree["conv"]).ravel())[-231], "bn": jnp.ones(32, bool)})
  want = comm.encoded_bytes(231, 4608, "csr") + comm.encoded_bytes(
      32, 32, "csr")
  assert int(comm.tree_bytes(sparse, "csr")) == want


def test_fedsparsify_cost():
  # Dense FedAvg on FMNIST: 10 clients, 118,282 params, 200 rounds.
  per_round = comm.fedsparsify_cost_bits(118_282, [118_282] * 10)
  assert per_round == 32 * 2 * 10 * 118_282
  assert per_round * 200 / 32 / 1e6 == pytest.approx(473.128)
  # With uploaded masks (FedSparsify-Local): + K * N bits.
  with_masks = comm.fedsparsify_cost_bits(1000, [100, 200, 300],
                                          num_params=5000,
                                          masks_uploaded=True)
  assert with_masks == 32 * (3 * 1000 + 600) + 3 * 5000
  # jnp version (inside the jitted round) agrees.
  f = jax.jit(lambda g, c: comm.fedsparsify_cost_bits(
      g, c, num_params=5000, masks_uploaded=True))
  got = f(jnp.int32(1000), jnp.array([100, 200, 300], jnp.int32))
  assert float(got) == pytest.approx(with_masks)
  assert comm.megabits(with_masks) == pytest.approx(with_masks / 1e6)
