"""The run folder's guard: one process per workdir, enforced with an advisory `flock`.

`<workdir>/.lock` holds "pid host" of the owner for the error message; the kernel releases
the lock when the owning process dies (however it dies), so a stale lock file never blocks a
later launch — that is the stale-lock detection, no pid probing needed.
"""
import fcntl
import os
import socket
from typing import Optional

from sparsefl_jax.config import ConfigError

LOCK_FILE = ".lock"


class WorkdirBusy(ConfigError):
  """Another live process holds the workdir's lock."""


class WorkdirLock:
  """Exclusive, non-blocking lock on `<workdir>/.lock`; `release()` (or process exit) frees it."""

  def __init__(self, workdir: str, name: str = LOCK_FILE):
    # name: processes of one multi-process run share the folder, each with its own lock file
    self.path = os.path.join(workdir, name)
    self._fd: Optional[int] = None

  def acquire(self) -> "WorkdirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      owner = _read_owner(fd)
      os.close(fd)
      raise WorkdirBusy(f"workdir={os.path.dirname(self.path)!r} is in use by {owner} "
                        f"(lock {self.path}); wait for that run to end or choose another "
                        "--workdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)   # closing the descriptor drops the flock
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read_owner(fd: int) -> str:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    pid, _, host = os.read(fd, 256).decode(errors="replace").strip().partition(" ")
    return f"pid {pid} on host {host}" if pid else "another process"
  except OSError:
    return "another process"
