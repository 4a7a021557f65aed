"""SIGINT/SIGTERM as a request to stop at the next round boundary (with a checkpoint).

The first signal sets a flag the training loop reads after each round; a second one of either
kind exits at once (status 128 + signal, nothing more saved: rows already written stay, the
checkpoint directory only ever holds finalised steps).
"""
import os
import signal
import sys
import threading
from typing import Dict, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
  """The run stopped on a signal after saving; `exit_code` is 128 + the signal number."""

  def __init__(self, message: str, exit_code: int):
    super().__init__(message)
    self.exit_code = exit_code


class StopRequest:
  """Installs the handlers (main thread only) and records the first signal received."""

  def __init__(self):
    self.signum: Optional[int] = None
    self._previous: Dict[int, object] = {}

  @property
  def name(self) -> str:
    return signal.Signals(self.signum).name if self.signum else ""

  def install(self) -> "StopRequest":
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum: int, frame) -> None:
    del frame
    if self.signum is not None:
      sys.stderr.write(f"\nerror: second signal ({signal.Signals(signum).name}): stopped at "
                       "once; resume from the last checkpoint with --resume\n")
      sys.stderr.flush()
      os._exit(128 + signum)
    self.signum = signum
    sys.stderr.write(f"\n{signal.Signals(signum).name} received: finishing the current round "
                     "and saving a checkpoint (send it again to stop at once)\n")
    sys.stderr.flush()
