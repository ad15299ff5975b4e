"""Orbax checkpoints of the train state: the latest N and the best one are both kept.

Each checkpoint holds the train state (step, params, BN statistics, optimizer state, dropout key)
and a JSON record (epoch, eval metrics, best step so far). The data position is the step: the
input pipeline replays the stream from any step.
"""

import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

SELECTION_METRIC = 'selection_error'  # the metric that ranks checkpoints: lower is better


def state_tree(state) -> dict:
  """The saved part of a TrainState (apply_fn and tx are code, not data)."""
  return {'step': state.step, 'params': state.params, 'batch_stats': state.batch_stats,
          'opt_state': state.opt_state, 'dropout_rng': state.dropout_rng}


class Checkpoints:
  """A CheckpointManager that keeps the `keep` latest checkpoints and the best one."""

  def __init__(self, directory: str, keep: int = 3, asynchronous: bool = True):
    policy = ocp.checkpoint_managers.AnyPreservationPolicy([
        ocp.checkpoint_managers.LatestN(n=keep),
        ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: -m[SELECTION_METRIC], n=1,
                                      keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy,
                                           enable_async_checkpointing=asynchronous)
    self.directory = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'record'))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, state, record: dict, selection_error: Optional[float] = None):
    """Saves a host (unreplicated) state; `selection_error` ranks it for 'best'."""
    metrics = None if selection_error is None else {SELECTION_METRIC: float(selection_error)}
    step = int(jax.device_get(state.step))
    self.manager.save(step, metrics=metrics, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state_tree(state)), record=ocp.args.JsonSave(record)))

  def restore(self, state, step: Optional[int] = None):
    """Restores `step` (default: latest) into a state with the same structure.

    Returns (state, record), or (state, None) if there is no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      return state, None
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state_tree(state))
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
    return state.replace(**restored['state']), restored['record']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
