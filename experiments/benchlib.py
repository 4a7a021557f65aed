"""What every benchmark script measures the same way: the machine's matmul peak and the
process's peak RSS."""
import statistics
import threading
import time

import jax
import jax.numpy as jnp


class RssPeak:
  """Samples this process's RSS every 10 ms in a thread; `peak_mb` is the max seen."""

  def __init__(self):
    import psutil
    self._proc = psutil.Process()
    self.peak = 0
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self) -> None:
    while not self._stop.is_set():
      self.peak = max(self.peak, self._proc.memory_info().rss)
      time.sleep(0.01)

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *a):
    self._stop.set()
    self._thread.join()

  @property
  def peak_mb(self) -> float:
    return self.peak / 2**20


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
  """GFLOP/s of a jitted float32 jnp.dot n^3 (median), the machine's reference peak."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  f(a, b).block_until_ready()
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    ts.append(time.perf_counter() - t)
  return 2 * n**3 / statistics.median(ts) / 1e9
