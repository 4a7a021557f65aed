"""The per-round progress line: redrawn in place (`\\r`) on a terminal, plain lines in a log.

When the stream is not a TTY (stderr redirected to a file, a batch job), a line is written
every `every` rounds and at the last round, each ending in a newline, so logs stay readable.
"""
import sys
from typing import Any, Dict, Optional, TextIO

BAR_WIDTH = 24
LOG_LINES = 20   # every=0 in a log: about this many lines per run


class Progress:
  """Reports rows of `metrics.jsonl` as they are produced; `close()` ends the line."""

  def __init__(self, total_rounds: int, every: int = 0, stream: Optional[TextIO] = None,
               enabled: bool = True, tty: Optional[bool] = None):
    self.total = total_rounds
    self.stream = stream if stream is not None else sys.stderr
    self.enabled = enabled
    if tty is None:
      isatty = getattr(self.stream, "isatty", None)
      tty = bool(isatty and isatty())
    self.tty = tty
    self.every = every if every > 0 else max(1, total_rounds // LOG_LINES)
    self._open_line = False

  def line(self, t: int, row: Dict[str, Any]) -> str:
    """The text reported for round t (no line ending)."""
    done = int(BAR_WIDTH * t / self.total) if self.total else BAR_WIDTH
    acc = row.get("test_accuracy")
    acc_s = f"{acc:.4f}" if acc is not None else "  -   "
    mb = (row.get("cumulative_uplink_bytes", 0) + row.get("cumulative_downlink_bytes", 0)) / 1e6
    return (f"[{'#' * done}{'.' * (BAR_WIDTH - done)}] round {t}/{self.total} "
            f"loss {row.get('train_loss', float('nan')):.4f} acc {acc_s} sent {mb:.1f} MB "
            f"({row.get('seconds', 0.0):.2f} s/round)")

  def update(self, t: int, row: Dict[str, Any]) -> None:
    if not self.enabled:
      return
    if self.tty:
      self.stream.write("\r" + self.line(t, row) + "\x1b[K")   # erase a longer old line
      self._open_line = True
    elif t % self.every == 0 or t == self.total:
      self.stream.write(self.line(t, row) + "\n")
    else:
      return
    self.stream.flush()

  def close(self) -> None:
    if self._open_line:
      self.stream.write("\n")
      self.stream.flush()
      self._open_line = False
