"""preemption.py: a signal asks training to stop after the current step; the handlers that were
there before are put back."""

import os
import signal

from densenet_jax import preemption


def test_a_signal_is_noted_and_the_previous_handler_restored():
  previous = signal.getsignal(signal.SIGTERM)
  # Whatever this worker's SIGINT handler is (a library run by an earlier test in this process
  # may have left SIG_IGN), restore() puts it back.
  previous_sigint = signal.getsignal(signal.SIGINT)
  stop = preemption.StopRequest()
  try:
    assert not stop.requested(step=1)
    os.kill(os.getpid(), signal.SIGTERM)  # handled in this (the main) thread before kill returns
    assert stop.requested(step=2) and stop.received() == signal.SIGTERM
    # The first signal put the previous handlers back: a second one acts as it did before.
    assert signal.getsignal(signal.SIGTERM) is previous
  finally:
    stop.restore()
  assert signal.getsignal(signal.SIGINT) is previous_sigint


def test_sigint_is_noted_too():
  stop = preemption.StopRequest()
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.requested(step=1) and stop.received() == signal.SIGINT
  finally:
    stop.restore()
