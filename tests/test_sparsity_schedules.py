"""Sparsity schedules against hand-computed values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sparsefl_jax.sparsity import schedules


def eq1(t, s0, st, t0, big_t, f, n):
  """FedSparsify Eq. 1 written out in plain Python with our boundaries."""
  if t >= big_t:
    return st
  tf = f * (t // f)
  if tf <= t0:
    return s0
  return st + (s0 - st) * (1 - (tf - t0) / (big_t - t0)) ** n


def test_fedsparsify_table():
  sched = schedules.PolynomialSchedule(0.9, 200, start_round=1, exponent=3)
  # A few values worked out by hand: s_t = 0.9 * (1 - (1 - (t-1)/199)^3).
  hand = {0: 0.0, 1: 0.0, 2: 0.9 * (1 - (198 / 199) ** 3),
          100: 0.9 * (1 - (100 / 199) ** 3), 199: 0.9 * (1 - (1 / 199) ** 3),
          200: 0.9, 250: 0.9}
  for t, want in hand.items():
    assert math.isclose(float(sched(t)), want, rel_tol=1e-5, abs_tol=1e-7), t
  for t in range(0, 210):
    want = eq1(t, 0.0, 0.9, 1, 200, 1, 3)
    assert math.isclose(float(sched(t)), want, rel_tol=1e-5, abs_tol=1e-6), t


def test_frequency_and_initial_sparsity():
  sched = schedules.PolynomialSchedule(
      0.8, 50, initial_sparsity=0.2, start_round=3, frequency=5, exponent=2)
  values = [float(sched(t)) for t in range(60)]
  for t, v in enumerate(values):
    assert math.isclose(v, eq1(t, 0.2, 0.8, 3, 50, 5, 2), abs_tol=1e-6), t
  assert values[5] == values[9] and values[10] > values[9]
  assert values[0] == pytest.approx(0.2)
  assert values[49] < 0.8 and values[50] == pytest.approx(0.8)


def test_monotone_and_bounded():
  sched = schedules.PolynomialSchedule(0.95, 100)
  v = np.asarray(jax.vmap(sched)(jnp.arange(0, 120)))
  assert (np.diff(v) >= -1e-7).all()
  assert v.min() >= 0.0 and v.max() <= 0.95 + 1e-7


def test_traced_round_inside_jit():
  sched = schedules.PolynomialSchedule(0.9, 200)

  @jax.jit
  def run(t):
    return sched(t), sched.is_update_round(t)

  for t in (1, 2, 57, 200):
    s, upd = run(jnp.int32(t))
    assert math.isclose(float(s), eq1(t, 0.0, 0.9, 1, 200, 1, 3),
                        rel_tol=1e-6, abs_tol=1e-7)
    assert bool(upd) == (t > 1)
  # Frozen dataclasses are hashable, so they can be static jit arguments.
  f = jax.jit(lambda sc, t: sc(t), static_argnums=0)
  assert float(f(sched, 200)) == pytest.approx(0.9)
  # A fori_loop counter drives it just as well.
  total = jax.jit(lambda: jax.lax.fori_loop(
      0, 201, lambda t, acc: acc + sched(t), jnp.float32(0)))()
  want = sum(eq1(t, 0.0, 0.9, 1, 200, 1, 3) for t in range(201))
  assert float(total) == pytest.approx(want, rel=1e-5)


def test_constant_and_one_shot():
  c = schedules.ConstantSchedule(0.95)
  assert float(c(0)) == pytest.approx(0.95)
  assert float(jax.jit(c)(jnp.int32(7))) == pytest.approx(0.95)
  o = schedules.OneShotSchedule(0.5, at_round=10)
  assert [float(o(t)) for t in (0, 9, 10, 11)] == [0.0, 0.0, 0.5, 0.5]
  assert bool(o.is_update_round(10)) and not bool(o.is_update_round(11))


@pytest.mark.parametrize("kwargs, match", [
    (dict(final_sparsity=1.0, total_rounds=10), "final_sparsity"),
    (dict(final_sparsity=-0.1, total_rounds=10), "final_sparsity"),
    (dict(final_sparsity=0.5, total_rounds=1), "total_rounds"),
    (dict(final_sparsity=0.5, total_rounds=10, start_round=10),
     "total_rounds"),
    (dict(final_sparsity=0.5, total_rounds=10, frequency=0), "frequency"),
    (dict(final_sparsity=0.5, total_rounds=10, exponent=0.5), "exponent"),
    (dict(final_sparsity=0.5, total_rounds=10, initial_sparsity=1.2),
     "initial_sparsity"),
])
def test_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    schedules.PolynomialSchedule(**kwargs)
  with pytest.raises(ValueError, match=r"\[0, 1\)"):
    schedules.ConstantSchedule(1.5)
