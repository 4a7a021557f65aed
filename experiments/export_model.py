r"""Export a run's pruned global model as sparse tensors and check it serves the same predictions.

  python experiments/export_model.py --workdir=runs/fedsparsify/global_0.9 [--out=model.npz] \
      [--benchmark] [--bench_batch=256] [--repeats=20]

Loads config.json and the latest checkpoint of --workdir, writes every parameter tensor in CSR
form (2-D view: all axes but the last are rows; `<path>/data|indices|indptr|shape` in an .npz,
uncompressed) plus the dense model state (BatchNorm statistics), reloads the file, checks its
test accuracy equals the checkpoint's, and prints non-zeros and sizes. --benchmark times CPU
inference of fully connected models (fmnist_fc, mlp_small, linear): the jitted dense JAX model,
the same network in dense NumPy (one BLAS thread) and in scipy.sparse CSR.
"""
import json
import os
import statistics
import sys
import time
from typing import Callable, Dict

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One BLAS thread: scipy's CSR product is single-threaded, and spinning BLAS threads on a
# shared CPU make the dense NumPy timing erratic.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from sparsefl_jax import comm  # noqa: E402
from sparsefl_jax.checkpoint import Checkpointer  # noqa: E402
from sparsefl_jax.config import config_from_json  # noqa: E402
from sparsefl_jax.data import preprocess  # noqa: E402
from sparsefl_jax.models.mlp import MLP, Linear  # noqa: E402
from sparsefl_jax.tree_paths import path_str  # noqa: E402
from sparsefl_jax.train import build_experiment  # noqa: E402

flags.DEFINE_string("workdir", None, "Run folder with config.json and checkpoints/.")
flags.DEFINE_string("out", "", "Output .npz (default: <workdir>/sparse_model.npz).")
flags.DEFINE_bool("benchmark", False, "Time dense vs sparse CPU inference (FC models only).")
flags.DEFINE_integer("bench_batch", 256, "Examples per inference call in the benchmark.")
flags.DEFINE_integer("repeats", 20, "Timed passes over the benchmark batches (median kept).")
FLAGS = flags.FLAGS


def flat_with_paths(tree) -> Dict[str, np.ndarray]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {path_str(p): np.asarray(x) for p, x in leaves}


def to_csr(x: np.ndarray) -> sp.csr_matrix:
  """CSR of the 2-D view (prod(shape[:-1]), shape[-1]); a 1-D tensor is one row."""
  return sp.csr_matrix(x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1))


def export(params, model_state, path: str) -> None:
  arrays = {}
  for name, x in flat_with_paths(params).items():
    m = to_csr(x)
    arrays.update({f"params/{name}/data": m.data.astype(np.float32),
                   f"params/{name}/indices": m.indices.astype(np.int32),
                   f"params/{name}/indptr": m.indptr.astype(np.int32),
                   f"params/{name}/shape": np.asarray(x.shape, np.int64)})
  for name, x in flat_with_paths(model_state).items():
    arrays[f"state/{name}"] = x
  np.savez(path, **arrays)


def load(path: str, params_like, state_like):
  """Rebuilds dense trees shaped like the given ones from an exported .npz."""
  z = np.load(path)

  def dense(name):
    shape = tuple(z[f"params/{name}/shape"])
    cols = shape[-1] if shape else 1
    m = sp.csr_matrix((z[f"params/{name}/data"], z[f"params/{name}/indices"],
                       z[f"params/{name}/indptr"]), shape=(int(np.prod(shape[:-1])), cols))
    return m.toarray().reshape(shape)

  names = list(flat_with_paths(params_like))
  params = jax.tree.unflatten(jax.tree.structure(params_like), [dense(n) for n in names])
  snames = list(flat_with_paths(state_like))
  state = jax.tree.unflatten(jax.tree.structure(state_like), [z[f"state/{n}"] for n in snames])
  return params, state


def fc_forward(layers, x: np.ndarray, matmul: Callable) -> np.ndarray:
  """The MLP forward pass (ReLU between layers) with a pluggable x @ W."""
  for i, (w, b) in enumerate(layers):
    x = matmul(x, w) + b
    if i < len(layers) - 1:
      x = np.maximum(x, 0.0)
  return x


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def benchmark(exp, params, batch: int, repeats: int) -> None:
  if not isinstance(exp.model, (MLP, Linear)):
    print(f"benchmark: sparse inference is implemented for fully connected models only "
          f"(model={exp.config.model})")
    return
  batch_fn = preprocess.make_batch_fn(exp.dataset)
  n = min(len(exp.dataset.test_y), 8 * batch)
  x = np.asarray(batch_fn(jnp.asarray(exp.dataset.test_x[:n]), jax.random.PRNGKey(0), False))
  x = x.reshape(n, -1)
  batches = [x[i:i + batch] for i in range(0, n, batch)]
  names = sorted(params, key=lambda s: int(s[2:]) if s.startswith("fc") and s[2:].isdigit()
                 else 0)
  dense_layers = [(np.asarray(params[k]["kernel"]), np.asarray(params[k]["bias"]))
                  for k in names]
  # x @ W with W sparse: keep Wᵀ in CSR (rows = outputs) and compute (Wᵀ xᵀ)ᵀ.
  sparse_layers = [(sp.csr_matrix(w.T), b) for w, b in dense_layers]
  sparse_mm = lambda a, wt: (wt @ a.T).T
  apply = jax.jit(lambda p, a: exp.model.apply({"params": p}, a))   # the MLP flattens
  jparams = jax.tree.map(jnp.asarray, params)
  ref = np.concatenate([np.asarray(apply(jparams, b)) for b in batches])
  for layers, mm in ((dense_layers, np.matmul), (sparse_layers, sparse_mm)):
    got = np.concatenate([fc_forward(layers, b, mm) for b in batches])
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3)
  runs = {
      "jax dense (jit)": lambda: [apply(jparams, b).block_until_ready() for b in batches],
      "numpy dense": lambda: [fc_forward(dense_layers, b, np.matmul) for b in batches],
      "scipy CSR": lambda: [fc_forward(sparse_layers, b, sparse_mm) for b in batches],
  }
  print(f"benchmark: {n} test examples in batches of {batch}, median of {repeats} passes "
        f"(shared CPU; relative numbers only)")
  for label, fn in runs.items():
    sec = median_seconds(fn, repeats)
    print(f"  {label:16s} {n / sec:12,.0f} examples/s")


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)   # keep orbax's INFO lines off the console
  with open(os.path.join(FLAGS.workdir, "config.json")) as f:
    cfg = config_from_json(json.load(f)).replace(workdir=FLAGS.workdir)
  exp = build_experiment(cfg)
  state, rnd = Checkpointer(os.path.join(FLAGS.workdir, "checkpoints")).restore(exp.init_state)
  if state is None:
    sys.exit(f"error: no checkpoint in {FLAGS.workdir}/checkpoints")
  params = jax.device_get(exp.algorithm.eval_params(state.params, state.algo_state))
  model_state = jax.device_get(state.model_state)
  out = FLAGS.out or os.path.join(FLAGS.workdir, "sparse_model.npz")
  export(params, model_state, out)

  total = comm.tree_size(params)
  nnz = int(comm.tree_nnz(params))
  stats = sum(int(np.size(x)) for x in jax.tree.leaves(model_state))
  print(f"{cfg.algorithm} s_T={cfg.sparsity} round {rnd}: {nnz:,} non-zero of {total:,} "
        f"trainable parameters (density {nnz / total:.4f}; +{stats:,} BN statistics)")
  print(f"  dense fp32: {4 * (total + stats) / 1e6:.3f} MB; exported CSR {out}: "
        f"{os.path.getsize(out) / 1e6:.3f} MB (values+indices {8 * nnz / 1e6:.3f} MB)")

  params2, state2 = load(out, params, model_state)
  evaluate = lambda p, s: exp.evaluate(p, s, state.algo_state, *exp.test_batches)
  acc = float(evaluate(state.params, state.model_state)["accuracy"])
  acc2 = float(evaluate(jax.tree.map(jnp.asarray, params2),
                        jax.tree.map(jnp.asarray, state2))["accuracy"])
  print(f"  test accuracy: checkpoint {acc:.4f}, reloaded export {acc2:.4f}")
  if acc != acc2:
    sys.exit("error: the exported model does not reproduce the checkpoint's accuracy")
  if FLAGS.benchmark:
    benchmark(exp, params, FLAGS.bench_batch, FLAGS.repeats)


if __name__ == "__main__":
  flags.mark_flag_as_required("workdir")
  app.run(main)
