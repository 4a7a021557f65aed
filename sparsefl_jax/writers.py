"""TensorBoard event files for the scalars of `metrics.jsonl`, written without TensorFlow.

One tag per numeric field of a row, named exactly like the field (so `density/<layer>` rows
form one TensorBoard group), at step = the row's `round`. Events go to `<workdir>/tensorboard/`;
view them with `tensorboard --logdir runs/`.
"""
import os
from numbers import Number
from typing import Any, Dict, Iterator, Optional, Tuple

TENSORBOARD_DIR = "tensorboard"
# Row fields that are not per-round scalars: the step itself and the sampled client ids.
NOT_LOGGED = ("round", "clients")


def scalar_items(row: Dict[str, Any]) -> Iterator[Tuple[str, float]]:
  """(tag, value) for every numeric scalar of a metrics row except the step and client ids."""
  for key, value in row.items():
    if key in NOT_LOGGED or isinstance(value, bool) or not isinstance(value, Number):
      continue
    yield key, float(value)


class TensorBoardWriter:
  """Appends each metrics row to TensorBoard event files in `<workdir>/tensorboard/`.

  `first_round` is the first round this process writes: events from an earlier (interrupted)
  process at that round or later are purged by TensorBoard's reader (a `SessionLog.START`
  at `purge_step`), so a resumed run shows each round once.
  """

  def __init__(self, workdir: str, first_round: int = 1):
    from tensorboardX import SummaryWriter   # imported only when events are written
    self.logdir = os.path.join(workdir, TENSORBOARD_DIR)
    # The suffix keeps a resumed run's file apart from the first one even within a second.
    self._writer = SummaryWriter(self.logdir, purge_step=first_round,
                                 filename_suffix=f".{os.getpid()}.r{first_round}")

  def write(self, row: Dict[str, Any]) -> None:
    step = int(row["round"])
    for tag, value in scalar_items(row):
      self._writer.add_scalar(tag, value, global_step=step)
    self._writer.flush()   # a row per round: on disk before an interruption can lose it

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def make_writer(workdir: str, enabled: bool, first_round: int) -> Optional[TensorBoardWriter]:
  """The TensorBoard writer, or None when disabled."""
  return TensorBoardWriter(workdir, first_round) if enabled else None


def read_scalars(logdir: str) -> Dict[str, Dict[int, float]]:
  """{tag: {step: value}} as TensorBoard itself loads `logdir` (purged steps dropped).

  Uses tensorboard's own event reader (the `tensorboard` package, a test dependency).
  """
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
