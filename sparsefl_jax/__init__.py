"""sparsefl_jax: sparse federated learning simulated in JAX, one jitted program per round.

Build and run a round in your own code:

    from sparsefl_jax import ExperimentConfig, build_experiment
    exp = build_experiment(ExperimentConfig(dataset="digits", model="linear", rounds=3,
                                            num_clients=4, clients_per_round=2))
    state = exp.init_state
    state, metrics = exp.round_step(state, exp.client_data, exp.train_key)

or assemble the pieces yourself with `build_round_step`, `RoundConfig`, `init_server_state`.
"""
from sparsefl_jax.algorithms import ALGORITHMS, Algorithm, Upload, get_algorithm
from sparsefl_jax.config import ConfigError, ExperimentConfig
from sparsefl_jax.federated.client import LocalConfig
from sparsefl_jax.federated.evaluation import make_eval_fn, pad_eval_split
from sparsefl_jax.federated.optimizers import (ClientLRSchedule, client_optimizer,
                                               server_optimizer)
from sparsefl_jax.federated.round import (RoundConfig, build_round_step, init_server_state,
                                          jit_round_step)
from sparsefl_jax.federated.sampling import sample_clients
from sparsefl_jax.federated.state import ClientData, ServerState
from sparsefl_jax.train import Experiment, build_experiment, run

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS", "Algorithm", "ClientData", "ClientLRSchedule", "ConfigError", "Experiment",
    "ExperimentConfig", "LocalConfig", "RoundConfig", "ServerState", "Upload",
    "build_experiment", "build_round_step", "client_optimizer", "get_algorithm",
    "init_server_state", "jit_round_step", "make_eval_fn", "pad_eval_split", "run",
    "sample_clients", "server_optimizer",
]
