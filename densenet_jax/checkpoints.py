"""Orbax checkpoints of the train state: the latest N and the best one are both kept.

Each checkpoint holds the train state (step, params, BN statistics, optimizer state, dropout key)
and a JSON record (epoch, eval metrics, best step so far). The data position is the step: the
input pipeline replays the stream from any step.

Faults. Orbax writes a checkpoint into a temporary directory and renames it when it is complete,
so a process killed while saving leaves a temporary directory that is never restored (the run
that writes here removes it when it starts). A checkpoint that looks complete but cannot be read
(e.g. a truncated file) is skipped with a warning when an older one can be read, and renamed
`<step>.unreadable-<time>` so that the step can be saved again; nothing is deleted. A state with
a NaN or Inf is never saved, and a failed write (disk full, read-only file system) or read is a
CheckpointError whose one-line message names the cause (a write that fails in the background is
reported by the next save or wait).
"""

import os
import re
import time
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from densenet_jax import errors

SELECTION_METRIC = 'selection_error'  # the metric that ranks checkpoints: lower is better


class CheckpointError(errors.UserError, RuntimeError):
  """A checkpoint that cannot be written or read."""


def state_tree(state) -> dict:
  """The saved part of a TrainState (apply_fn and tx are code, not data).

  The dropout key is saved as its raw key data, uint32[2]: the layout of the legacy
  `jax.random.PRNGKey` keys that checkpoints written before typed keys hold, so those restore
  (and resume) bit for bit.
  """
  return {'step': state.step, 'params': state.params, 'batch_stats': state.batch_stats,
          'opt_state': state.opt_state,
          'dropout_rng': np.asarray(jax.random.key_data(state.dropout_rng))}


def root_cause(error: BaseException) -> str:
  """One line for an error raised deep inside orbax or tensorstore: the OSError behind it if
  there is one (e.g. '[Errno 28] No space left on device: PATH'), else its first sentence."""
  cause = error
  while cause is not None:
    if isinstance(cause, OSError) and cause.errno is not None:
      return str(cause)
    cause = cause.__cause__ or cause.__context__
  text = str(error)
  code = re.search(r"\[os_error_code='(\d+)'\]", text)  # tensorstore's file errors
  path = re.search(r'local file "([^"]+)"', text)
  if code:
    return f'[Errno {code.group(1)}] {os.strerror(int(code.group(1)))}' + (
        f': {path.group(1)!r}' if path else '')
  text = text.split(' [tensorstore_spec')[0]  # tensorstore appends kilobytes of JSON
  return ' '.join(text.split()) or type(error).__name__


def _non_finite_leaves(tree) -> list:
  return [jax.tree_util.keystr(path) for path, x in jax.tree.leaves_with_path(tree)
          if np.issubdtype(np.asarray(x).dtype, np.inexact) and not np.all(np.isfinite(x))]


class Checkpoints:
  """A CheckpointManager that keeps the `keep` latest checkpoints and the best one.

  `cleanup=True` (only for the one run that writes to `directory`) removes the temporary
  directories of saves that a killed process left behind.
  """

  def __init__(self, directory: str, keep: int = 3, asynchronous: bool = True,
               cleanup: bool = False):
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=keep),
        ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: -m[SELECTION_METRIC], n=1,
                                      keep_checkpoints_without_metrics=False),
    ])
    # Directories are made before save() returns: if that fails (disk full, read-only), the
    # error is raised there, and no background thread is left waiting for them (orbax's wait
    # for a directory that never comes lasts minutes and holds the process at exit).
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, enable_async_checkpointing=asynchronous,
        cleanup_tmp_directories=cleanup,
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
    directory = os.fspath(directory)
    self.directory = directory if '://' in directory else os.path.abspath(directory)  # gs://
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=options,
                                           item_names=('state', 'record'))
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many types)
      raise CheckpointError(f'cannot open checkpoint directory {self.directory}: '
                            f'{root_cause(e)}') from e

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, state, record: dict, selection_error: Optional[float] = None):
    """Saves a host (unreplicated) state; `selection_error` ranks it for 'best'.

    Raises CheckpointError, without writing, if the state holds a NaN or Inf.
    """
    step = int(jax.device_get(state.step))
    tree = state_tree(state)
    bad = _non_finite_leaves(tree)
    if bad:
      raise CheckpointError(f'not saving step {step}: {bad[0]} holds NaN or Inf '
                            f'({len(bad)} arrays do)')
    metrics = None if selection_error is None else {SELECTION_METRIC: float(selection_error)}
    try:
      self.manager.save(step, metrics=metrics, force=True, args=ocp.args.Composite(
          state=ocp.args.StandardSave(tree), record=ocp.args.JsonSave(record)))
    except Exception as e:  # pylint: disable=broad-except  (orbax raises many types)
      raise self._write_error(e) from e

  def restore(self, state, step: Optional[int] = None):
    """Restores `step` (default: the latest readable one) into a state of the same structure.

    Returns (state, record), or (state, None) if there is no checkpoint.
    """
    return self._readable(lambda s: self._restore(state, s), step, state)

  def restore_variables(self, variables: dict, step: Optional[int] = None):
    """Restores only the step, params and batch_stats of `step` (default: the latest readable
    one) into `variables` ({'params', 'batch_stats'}, arrays or shapes of the model's): what
    evaluation and prediction need, without the optimizer's state or its library.

    Returns ({'step', 'params', 'batch_stats'} as numpy arrays, record), or (None, None) if
    there is no checkpoint.
    """
    return self._readable(lambda s: self._restore_variables(variables, s), step, None)

  def _readable(self, restore_one, step: Optional[int], default):
    if step is not None:
      try:
        return restore_one(step)
      except Exception as e:  # pylint: disable=broad-except
        raise CheckpointError(f'cannot read checkpoint {step} in {self.directory}: '
                              f'{root_cause(e)}') from e
    unreadable = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = restore_one(step)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Checkpoint %d in %s cannot be read (%s); trying the one before it.',
                        step, self.directory, root_cause(e))
        unreadable.append((step, e))
        continue
      self._set_aside([s for s, _ in unreadable])
      return restored
    if unreadable:  # none is readable: rather a config that does not match than corruption
      step, e = unreadable[0]
      raise CheckpointError(f'no checkpoint in {self.directory} can be read into this model '
                            f'(step {step}: {root_cause(e)}); use another workdir to start '
                            f'afresh') from e
    return default, None

  def _restore(self, state, step: int):
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_tree(state))
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
    tree = restored['state']
    tree['dropout_rng'] = jax.random.wrap_key_data(tree['dropout_rng'])
    return state.replace(**tree), restored['record']

  def _restore_variables(self, variables: dict, step: int):
    template = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype),
                            {'step': np.int32(0), 'params': variables['params'],
                             'batch_stats': variables['batch_stats']})
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            template, restore_args=ocp.checkpoint_utils.construct_restore_args(template),
            partial_restore=True),
        record=ocp.args.JsonRestore()))
    return restored['state'], restored['record']

  def _set_aside(self, steps: list):
    """Renames unreadable checkpoints (once every process has tried them) so that their steps
    can be saved again."""
    if not steps:
      return
    multiprocess = jax.process_count() > 1
    if multiprocess:
      multihost_utils.sync_global_devices('checkpoints: unreadable steps tried')
    if jax.process_index() == 0:
      for step in steps:
        path = epath.Path(self.directory) / str(step)
        aside = path.parent / f'{step}.unreadable-{int(time.time())}'
        path.rename(aside)
        logging.warning('Moved unreadable checkpoint %s to %s.', path, aside)
    if multiprocess:
      multihost_utils.sync_global_devices('checkpoints: unreadable steps set aside')
    self.manager.reload()

  def _write_error(self, error: BaseException) -> CheckpointError:
    return CheckpointError(f'cannot write checkpoints to {self.directory}: {root_cause(error)}')

  def wait(self):
    """Blocks until every save has been written; raises CheckpointError if one failed."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(e) from e

  def close(self):
    self.wait()
    self.manager.close()
