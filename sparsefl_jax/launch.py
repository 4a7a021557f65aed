r"""Starts N processes of one command on this machine, as N hosts would run it.

  python -m sparsefl_jax.launch --num_processes=2 --devices_per_process=2 -- \
      experiments/run.py --num_devices=4 --workdir=runs/two ...

Each process gets `JAX_COORDINATOR_ADDRESS` (127.0.0.1 and a free port), `JAX_NUM_PROCESSES`,
`JAX_PROCESS_ID` (read by `sparsefl_jax.distributed`) and, on CPU, `XLA_FLAGS=
--xla_force_host_platform_device_count=<devices_per_process>`; output goes to the console
prefixed with the process id, or to `<log_dir>/process_<i>.log`. When any process fails, the
others are stopped (they would otherwise wait for it in a collective until JAX's timeout), and
`--timeout` bounds the whole run. For tests and local checks; on real hosts start one process
per host with the same environment variables (or run.py's flags) instead.
"""
import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence


def free_port() -> int:
  """A TCP port nobody listens on right now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(process_id: int, num_processes: int, port: int,
                devices_per_process: Optional[int], base: Optional[Dict[str, str]] = None
                ) -> Dict[str, str]:
  """The environment of process `process_id` of a local multi-process run."""
  env = dict(os.environ if base is None else base)
  env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes),
             JAX_PROCESS_ID=str(process_id))
  if devices_per_process:
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(
        flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
  return env


def start(cmd: Sequence[str], num_processes: int, devices_per_process: Optional[int] = None,
          log_dir: Optional[str] = None, env: Optional[Dict[str, str]] = None,
          cwd: Optional[str] = None) -> List[subprocess.Popen]:
  """Starts the processes (each in its own session, so `stop` also reaches its children)."""
  port = free_port()
  procs = []
  for i in range(num_processes):
    out = (open(os.path.join(log_dir, f"process_{i}.log"), "w") if log_dir
           else subprocess.PIPE)
    procs.append(subprocess.Popen(
        list(cmd), env=process_env(i, num_processes, port, devices_per_process, env),
        stdout=out, stderr=subprocess.STDOUT, cwd=cwd, start_new_session=True,
        text=log_dir is None))
    if log_dir:
      out.close()
  return procs


def stop(procs: Sequence[subprocess.Popen], sig: int = signal.SIGKILL) -> None:
  """Sends `sig` to each process's group (the process and its children) and reaps them."""
  for p in procs:
    if p.poll() is None:
      try:
        os.killpg(p.pid, sig)
      except ProcessLookupError:
        pass
  for p in procs:
    try:
      p.wait(timeout=30)
    except subprocess.TimeoutExpired:
      os.killpg(p.pid, signal.SIGKILL)
      p.wait()


def wait(procs: Sequence[subprocess.Popen], timeout: float) -> List[int]:
  """Waits for every process; stops all when one fails or the timeout passes. Returns the
  exit statuses (-9 for a stopped process)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    codes = [p.poll() for p in procs]
    if all(c is not None for c in codes):
      return codes
    if any(c not in (None, 0) for c in codes):
      break
    time.sleep(0.05)
  stop(procs)
  return [p.returncode for p in procs]


def _pump(proc: subprocess.Popen, prefix: str) -> None:
  for line in proc.stdout:
    sys.stdout.write(f"{prefix}{line}")
    sys.stdout.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=0,
                      help="CPU: simulated devices per process (0 = leave XLA_FLAGS alone)")
  parser.add_argument("--timeout", type=float, default=3600.0)
  parser.add_argument("--log_dir", default="")
  parser.add_argument("command", nargs=argparse.REMAINDER,
                      help="a Python script and its arguments (after --)")
  args = parser.parse_args(argv)
  cmd = list(args.command)
  if cmd and cmd[0] == "--":
    cmd = cmd[1:]
  if not cmd:
    parser.error("give the command to run after --")
  if args.num_processes < 1:
    parser.error(f"num_processes={args.num_processes} must be >= 1")
  if cmd[0].endswith(".py"):
    cmd = [sys.executable] + cmd
  if args.log_dir:
    os.makedirs(args.log_dir, exist_ok=True)
  procs = start(cmd, args.num_processes, args.devices_per_process or None,
                args.log_dir or None)
  pumps = []
  if not args.log_dir:
    pumps = [threading.Thread(target=_pump, args=(p, f"[{i}] "), daemon=True)
             for i, p in enumerate(procs)]
    for t in pumps:
      t.start()
  try:
    codes = wait(procs, args.timeout)
  except KeyboardInterrupt:
    stop(procs, signal.SIGINT)
    codes = [p.returncode for p in procs]
  for t in pumps:
    t.join(timeout=5)
  bad = [(i, c) for i, c in enumerate(codes) if c != 0]
  if bad:
    sys.stderr.write(f"error: processes {bad} (id, status) failed\n")
    return max(c if c and c > 0 else 1 for _, c in bad)
  return 0


if __name__ == "__main__":
  sys.exit(main())
