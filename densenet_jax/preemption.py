"""Stop on a signal: SIGTERM or SIGINT asks training to checkpoint and stop after a step."""

import os
import signal
import threading

import jax
from jax.experimental import multihost_utils


class StopRequest:
  """Notes SIGTERM or SIGINT so that the training loop can stop after the current step.

  One process: Python handlers note the signal; a second signal acts at once, as usual.
  Several processes must all save the same step: JAX's preemption service, which handles SIGTERM
  once jax.distributed is initialized, picks a step that every process reaches (a signal to any
  one process stops them all); SIGINT is passed on to it as SIGTERM.
  """

  def __init__(self):
    self.signum = None
    self._multiprocess = jax.process_count() > 1
    self._previous = {}
    if threading.current_thread() is threading.main_thread():  # else handlers cannot be set
      signals = (signal.SIGINT,) if self._multiprocess else (signal.SIGTERM, signal.SIGINT)
      self._previous = {s: signal.signal(s, self._handle) for s in signals}

  def _handle(self, signum, frame):
    del frame
    self.signum = signum
    self.restore()
    if self._multiprocess:
      os.kill(os.getpid(), signal.SIGTERM)

  def requested(self, step: int) -> bool:
    """Whether to stop after `step`: a host-side check, no device sync."""
    if self._multiprocess:
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signum is not None

  def received(self) -> signal.Signals:
    """The signal that stopped training (several processes: the preemption service's)."""
    return signal.Signals(self.signum or signal.SIGTERM)

  def restore(self):
    """Puts the previous handlers back."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
