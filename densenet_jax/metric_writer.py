"""TensorBoard event files for training and eval metrics (written by process 0 only)."""

import os

import tensorflow as tf


class MetricWriter:
  """Scalars and text under workdir/tensorboard; a no-op when not enabled."""

  def __init__(self, workdir: str, enabled: bool = True):
    self._writer = (tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))
                    if enabled else None)

  def write_scalars(self, step: int, scalars: dict):
    if self._writer is None:
      return
    with self._writer.as_default():
      for name, value in scalars.items():
        tf.summary.scalar(name, value, step=step)

  def write_text(self, name: str, text: str):
    if self._writer is None:
      return
    with self._writer.as_default():
      tf.summary.text(name, text, step=0)

  def flush(self):
    if self._writer is not None:
      self._writer.flush()
