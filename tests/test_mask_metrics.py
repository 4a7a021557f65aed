"""--mask_metrics: SparsyFed's mask metrics (regrowth, deactivation, mask IoU, layer densities)
for every method, checked against numpy on the models before and after a round."""
import dataclasses

import jax
import numpy as np
import pytest

from sparsefl_jax import ExperimentConfig, algorithms, train
from sparsefl_jax.algorithms.topk import TopK

SMALL = dict(dataset="synthetic", model="mlp_small", synthetic_shape="6,6,1",
             synthetic_classes=4, synthetic_examples=12, synthetic_test=20, num_clients=3,
             batch_size=6, lr=0.1, rounds=2, progress=False, tensorboard=False,
             workdir="/tmp/unused_mask_metrics")


def _one_round(cfg):
  exp = train.build_experiment(cfg)
  before = jax.tree.map(np.asarray, exp.init_state.params)
  state, m = exp.round_step(exp.init_state, exp.client_data, exp.train_key)
  return before, jax.tree.map(np.asarray, state.params), jax.device_get(m)


def _nonzero(tree):
  return np.concatenate([np.ravel(x) != 0 for x in jax.tree.leaves(tree)])


def test_fedavg_one_client_regrowth_and_iou_match_numpy():
  # One client, weights uplink, no server optimizer: the new global model IS the upload, so
  # the client's regrowth is "zero before, non-zero after" of the global model (numpy).
  cfg = ExperimentConfig(**SMALL, algorithm="fedavg", clients_per_round=1, mask_metrics=True)
  before, after, m = _one_round(cfg)
  a, b = _nonzero(before), _nonzero(after)
  assert np.sum(~a & b) > 0   # zero-initialised biases start moving: a test that can fail
  np.testing.assert_allclose(m["regrowth"], np.sum(~a & b))
  np.testing.assert_allclose(m["deactivation"], np.sum(a & ~b))
  np.testing.assert_allclose(m["mask_iou"], np.sum(a & b) / np.sum(a | b), rtol=1e-6)
  for path, leaf in jax.tree_util.tree_flatten_with_path(after)[0]:
    if leaf.ndim >= 2:   # a kernel: its density key
      layer = "/".join(str(getattr(k, "key", k)) for k in path[:-1])
      np.testing.assert_allclose(m["density/" + layer], np.mean(leaf != 0), rtol=1e-6)


def test_off_by_default():
  _, _, m = _one_round(ExperimentConfig(**SMALL, algorithm="fedavg", clients_per_round=2))
  assert not {"regrowth", "deactivation", "mask_iou"} & set(m)


@dataclasses.dataclass(frozen=True)
class _SilentTopK(TopK):
  """Top-K without its own mask metrics: the engine's --mask_metrics must supply them."""

  def client_metrics(self, global_params, upload, client_state):
    return {}

  def server_metrics(self, old_params, new_params, algo_state):
    return {}


def test_engine_metrics_equal_the_methods_own(monkeypatch):
  monkeypatch.setattr(algorithms, "_REGISTERED", dict(algorithms._REGISTERED))
  algorithms.register_algorithm("silent_topk", _SilentTopK)
  base = dict(SMALL, clients_per_round=3, sparsity=0.6)
  _, _, own = _one_round(ExperimentConfig(**base, algorithm="topk"))
  _, _, engine = _one_round(ExperimentConfig(**base, algorithm="silent_topk",
                                             mask_metrics=True))
  keys = {k for k in own if k in ("regrowth", "deactivation", "mask_iou")
          or k.startswith("density/")}
  assert len(keys) >= 4
  for k in keys:
    np.testing.assert_allclose(engine[k], own[k], rtol=1e-6, err_msg=k)


def test_delta_uplink_counts_the_model_the_delta_describes():
  from sparsefl_jax.algorithms.base import Algorithm, Upload
  from sparsefl_jax.federated.round import uploaded_model
  g = {"w": np.array([0.0, 1.0, 2.0])}
  up = Upload({"w": np.array([0.5, -1.0, 0.0])})
  np.testing.assert_array_equal(uploaded_model(Algorithm(uplink="delta"), g, up)["w"],
                                [0.5, 0.0, 2.0])
  np.testing.assert_array_equal(uploaded_model(Algorithm(), g, up)["w"], up.values["w"])
