"""SIGTERM / SIGINT as a request to stop: the loop finishes its step, saves, and raises `Preempted`.

A second signal of either kind stops at once (KeyboardInterrupt), for a user who will not wait for
the save. On several processes the request is shared every `sync_every` steps, so all of them stop
after the same step and write one checkpoint together.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import numpy as np

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """The run stopped on a signal after saving a checkpoint; the message says where to resume."""

  def __init__(self, message: str, step: int) -> None:
    super().__init__(message)
    self.step = step


class StopSignals:
  """Context manager: while inside, SIGTERM/SIGINT set `signal_name` instead of killing."""

  def __init__(self, sync_every: int = 10) -> None:
    self.signal_name: str | None = None
    self._sync_every = sync_every
    self._previous: dict[int, Any] = {}

  def _handle(self, signum, frame) -> None:
    del frame
    if self.signal_name is not None:  # the second signal: stop now
      self._restore()
      raise KeyboardInterrupt
    self.signal_name = signal.Signals(signum).name

  def _restore(self) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def __enter__(self) -> StopSignals:
    # Python lets only the main thread install handlers; elsewhere signals keep their default.
    if threading.current_thread() is threading.main_thread():
      for signum in _SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self._restore()

  def requested(self, step: int) -> bool:
    """Whether to stop after `step`; the same answer on every process."""
    if jax.process_count() == 1:
      return self.signal_name is not None
    if step % self._sync_every:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    flags = multihost_utils.process_allgather(np.int32(self.signal_name is not None))
    if np.max(flags) and self.signal_name is None:
      self.signal_name = "a signal to another process"
    return bool(np.max(flags))
