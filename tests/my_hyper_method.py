"""A method in a user's file that declares its hyperparameters with the class.

FedAvg whose new global model is multiplied (my_mode='multiply') or divided
(my_mode='divide') by `my_scale` after every round. The hyperparameters become the flags
--my_scale and --my_mode of experiments/run.py and keys of `ExperimentConfig.method_args`,
with no edit of `sparsefl_jax`; tests/test_method_hyperparams.py runs it.
"""
import dataclasses

import jax

from sparsefl_jax.algorithms import FedAvg, Hyper


@dataclasses.dataclass(frozen=True)
class MyHyperMethod(FedAvg):
  """The example-weighted mean of the client models, scaled by `scale` after each round."""
  scale: float = 1.0
  mode: str = "multiply"

  name = "my_hyper_method"
  hyperparams = (
      Hyper("my_scale", 1.0, "Factor applied to the new global model every round.",
            low=0.0, high=10.0, include_low=False),
      Hyper("my_mode", "multiply", "Whether the model is multiplied or divided by my_scale.",
            choices=("multiply", "divide")),
  )

  @classmethod
  def from_config(cls, config) -> "MyHyperMethod":
    return cls(scale=cls.hyper(config, "my_scale"), mode=cls.hyper(config, "my_mode"))

  def server_post(self, params, algo_state, t):
    del t
    factor = self.scale if self.mode == "multiply" else 1.0 / self.scale
    return jax.tree.map(lambda w: factor * w, params), algo_state


@dataclasses.dataclass(frozen=True)
class MyHyperChild(MyHyperMethod):
  """Inherits my_scale and my_mode, and declares one more (unused) switch."""
  name = "my_hyper_child"
  hyperparams = (Hyper("my_verbose", False, "An extra switch the child declares."),)


@dataclasses.dataclass(frozen=True)
class MyScaleAsInt(FedAvg):
  """Declares --my_scale as an int: naming it next to MyHyperMethod (which declares a float
  my_scale) is refused, since one flag cannot have two types."""
  name = "my_scale_as_int"
  hyperparams = (Hyper("my_scale", 1, "An integer scale.", low=1),)
