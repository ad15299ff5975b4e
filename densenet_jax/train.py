"""The training loop: `train_and_evaluate(config, workdir)`.

The train step (densenet_jax.steps.train_step) is pmapped over all local devices; each global
batch is split evenly over all devices of all processes (devices.Topology). Checkpoints are
written at every eval and when SIGTERM/SIGINT stops training, and restored automatically when a
run is started again on the same workdir; see checkpoints.py for what happens to incomplete or
unreadable ones. The model, data and classes.json come from run_setup.py, the evals from
evaluation.py.
"""

import dataclasses
import functools
import itertools
import json
import math
import os
import time
from typing import Callable, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from densenet_jax import architectures, checkpoints, config_validation, costs, devices
from densenet_jax import inference, metric_writer, preemption, run_setup, steps, weight_sources
from densenet_jax.evaluation import Evaluator
from densenet_jax.run_setup import RunError
from densenet_jax.settings import RunSettings


class Interrupted(RunError):
  """Training stopped on a signal after a checkpoint of its last step was written."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from workdir's checkpoints if any) and writes workdir/results.json.

  SIGTERM or SIGINT: the current step is checkpointed and Interrupted is raised; a restarted run
  continues exactly where it stopped (same data, augmentation, dropout and optimizer state).
  """
  config_validation.validate(config, jax.device_count())
  return train(RunSettings.from_config(config), workdir)


def train(settings: RunSettings, workdir: str) -> dict:
  """train_and_evaluate's loop, on a validated config's settings."""
  start_time = time.time()
  run_setup.check_writable(workdir)
  weight_sources.fetch(settings.init_from)
  # 10-crop is --mode=evaluate's: the evals during training are single-crop.
  data = run_setup.open_data(dataclasses.replace(settings.data, ten_crop=False))
  topology = devices.Topology.of_this_process(settings.batch_size)
  steps_per_epoch = _steps_per_epoch(topology, data.info)
  total_steps = settings.num_epochs * steps_per_epoch
  eval_every = max(1, int(round(settings.eval_every_epochs * steps_per_epoch)))
  state, learning_rate_fn = _make_state(settings, data.info, steps_per_epoch)
  num_params = costs.count_params({'params': state.params})
  ckpt = checkpoints.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                 keep=settings.keep_checkpoints, cleanup=True)
  state, history = _restore_or_initialize(settings.init_from, ckpt, state, workdir)
  run_setup.write_classes(workdir, data)
  start_step = int(state.step)
  writer = metric_writer.MetricWriter(workdir, enabled=jax.process_index() == 0)
  if start_step == 0:
    writer.write_text('config', settings.config_json)
  train_batches = devices.prefetch_to_device(data.train_iterator(topology, start_step))
  evaluator = Evaluator(data, settings.eval_batch_size)
  p_state = devices.replicate(state)
  del state
  first_batch = next(train_batches)
  p_train_step = _compile_train_step(data, learning_rate_fn, p_state, first_batch)
  train_batches = itertools.chain([first_batch], train_batches)
  log = _TrainLog(writer, settings.batch_size, steps_per_epoch, total_steps)
  logging.info('%s: %s parameters, %d steps of %d images (%d per epoch), %d devices.',
               settings.model.architecture.name, f'{num_params:,}', total_steps,
               settings.batch_size, steps_per_epoch, jax.device_count())

  cross_replica_bn = settings.model.cross_replica_bn
  stop = preemption.StopRequest()
  try:
    for step in range(start_step + 1, total_steps + 1):
      p_state, metrics = p_train_step(p_state, next(train_batches))
      log.append(metrics)
      is_eval = step % eval_every == 0 or step == total_steps
      if is_eval:
        train_summary = log.flush(step, ckpt)
        p_state = _evaluate_and_checkpoint(p_state, step / steps_per_epoch, train_summary,
                                           evaluator, cross_replica_bn, writer, ckpt, history)
      elif step % settings.log_every_steps == 0:
        log.flush(step, ckpt)
      if stop.requested(step):
        _checkpoint_and_stop(p_state, step, is_eval, cross_replica_bn, log, ckpt, history, stop)
  finally:
    stop.restore()
    writer.flush()
    ckpt.close()
  return _write_results(settings, workdir, history, num_params, time.time() - start_time,
                        evaluator.per_class)


# ---------------------------------------------------------------------------------------------
# Setup

def _steps_per_epoch(topology: devices.Topology, info) -> int:
  try:
    return topology.steps_per_epoch(info.num_train)
  except ValueError as e:
    raise RunError(f'config.batch_size={topology.global_batch_size}: {info.name}: {e}') from e


def _make_state(settings: RunSettings, info, steps_per_epoch: int):
  model = run_setup.build_model(settings.model, info.num_classes)
  opt = settings.optimizer
  learning_rate_fn = steps.learning_rate_schedule(opt.learning_rate, steps_per_epoch,
                                                  opt.lr_decay_epochs, opt.lr_decay_factor)
  tx = steps.sgd_nesterov(learning_rate_fn, opt.momentum, opt.weight_decay)
  state = steps.create_train_state(model, jax.random.key(settings.seed), info.image_shape, tx)
  return state, learning_rate_fn


def _restore_or_initialize(init_from: str, ckpt: checkpoints.Checkpoints, state, workdir: str):
  """(state, eval history): the latest checkpoint's, else init_from's weights or new."""
  state, record = ckpt.restore(state)
  if record is None:
    if init_from:
      variables = {'params': state.params, 'batch_stats': state.batch_stats}
      state = state.replace(**weight_sources.load_into(init_from, variables))
    return state, []
  checksum = sum(float(np.abs(x).sum()) for x in jax.tree.leaves(state.params))
  logging.info('Resumed from step %d of %s (sum of |params| %.9g).', int(state.step), workdir,
               checksum)
  return state, record['history']


def _compile_train_step(data, learning_rate_fn, p_state, batch) -> Callable:
  """The pmapped train step, with the dataset's device transform (normalization and the
  run's augmentation), compiled for these arguments with the platform's XLA options
  (steps.compiler_options).

  A pmap compiled for several processes cannot be called with each process's local arrays, so
  there the step stays as it is (compiled at its first call): only XLA:CPU has options, and a
  multi-process CPU run trains the same but without the memory-efficient mode's saving.
  """
  p_train_step = jax.pmap(
      functools.partial(steps.train_step, learning_rate_fn=learning_rate_fn,
                        transform=data.device_transform(train=True),
                        top5=data.info.reports_top5),
      axis_name=inference.AXIS_NAME, donate_argnums=(0,))
  options = steps.compiler_options(jax.default_backend())
  if not options or jax.process_count() > 1:
    return p_train_step
  compiled = p_train_step.lower(p_state, batch).compile(options)
  steps.release_freed_heap()
  return compiled


# ---------------------------------------------------------------------------------------------
# The loop's parts: logging, eval + checkpoint, stop on a signal

class _TrainLog:
  """The train metrics of the steps since the last log line, checked and written together."""

  def __init__(self, writer, batch_size: int, steps_per_epoch: int, total_steps: int):
    self.writer, self.batch_size = writer, batch_size
    self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
    self.window, self.window_start = [], time.time()

  def append(self, metrics: dict):
    self.window.append(metrics)

  def check_finite(self, step: int, ckpt: checkpoints.Checkpoints):
    """Raises RunError naming the first step of the window whose loss or gradient was not
    finite (the window holds the steps up to `step`)."""
    self.window = jax.device_get(self.window)
    finite = [bool(m['finite'][0]) for m in self.window]
    if not all(finite):
      bad = finite.index(False)
      raise RunError(f'non-finite loss or gradient at step {step - len(finite) + 1 + bad} (loss '
                     f'{float(self.window[bad]["loss"][0])}); stopped without saving: the last '
                     f'checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is kept')

  def flush(self, step: int, ckpt: checkpoints.Checkpoints) -> dict:
    """Checks, writes and logs the window's mean metrics; returns them and starts a new window."""
    self.check_finite(step, ckpt)
    summary = {k: float(np.mean([m[k][0] for m in self.window])) for k in self.window[0]
               if k != 'finite'}
    elapsed = time.time() - self.window_start
    summary['images_per_sec'] = len(self.window) * self.batch_size / elapsed
    self.writer.write_scalars(step, {f'train/{k}': v for k, v in summary.items()})
    eta = (self.total_steps - step) * elapsed / len(self.window)
    logging.info('step %d/%d epoch %.2f | loss %.4f top1_error %.4f lr %.4g | %.0f img/s | '
                 'eta %s', step, self.total_steps, step / self.steps_per_epoch, summary['loss'],
                 summary['top1_error'], summary['learning_rate'], summary['images_per_sec'],
                 _format_seconds(eta))
    self.window, self.window_start = [], time.time()
    return summary


_p_average_batch_stats = jax.pmap(inference.average_batch_stats, axis_name=inference.AXIS_NAME)


def _host_state(p_state, cross_replica_bn: bool):
  """(p_state, its host copy) to save or evaluate. With per-device BN statistics
  (cross_replica_bn=False) they are averaged first, so a checkpoint between evals changes them."""
  if not cross_replica_bn:
    p_state = p_state.replace(batch_stats=_p_average_batch_stats(p_state.batch_stats))
  return p_state, devices.unreplicate(p_state)


def _evaluate_and_checkpoint(p_state, epoch: float, train_summary: dict, evaluator: Evaluator,
                             cross_replica_bn: bool, writer, ckpt: checkpoints.Checkpoints,
                             history: list):
  """Evaluates, logs, appends to `history` and saves a checkpoint ranked by its selection
  error; returns the state to train on."""
  p_state, saved = _host_state(p_state, cross_replica_bn)
  step = int(saved.step)
  eval_results = evaluator(p_state)
  for split, values in eval_results.items():
    writer.write_scalars(step, {f'{split}/{k}': v for k, v in values.items()})
    logging.info('step %d eval %s (%d images): %s', step, split, values['count'],
                 ' '.join(f'{k} {v:.4f}' for k, v in values.items() if k != 'count'))
  history.append({'step': step, 'epoch': epoch, 'eval': eval_results, 'train': train_summary})
  ckpt.save(saved, {'history': history}, selection_error=run_setup.selection(eval_results)[1])
  return p_state


def _checkpoint_and_stop(p_state, step: int, just_saved: bool, cross_replica_bn: bool,
                         log: _TrainLog,
                         ckpt: checkpoints.Checkpoints, history: list,
                         stop: preemption.StopRequest):
  """Saves `step` (unless its eval just did), waits for the write and raises Interrupted."""
  if not just_saved:  # the history keeps only eval steps: it is unchanged
    log.check_finite(step, ckpt)
    ckpt.save(_host_state(p_state, cross_replica_bn)[1], {'history': history})
  ckpt.wait()
  signum = stop.received()
  raise Interrupted(f'stopped by {signum.name} after step {step}, whose checkpoint is in '
                    f'{ckpt.directory}; run the same command again to resume', signum)


# ---------------------------------------------------------------------------------------------
# Results

def built_and_paper(settings: RunSettings) -> dict:
  """results.json's `architecture` (the network built) and `paper` (the paper's error for it on
  this dataset, or None where that network and dataset are not a row of Table 2 or 3)."""
  architecture = settings.model.architecture
  return {'architecture': architecture.describe(),
          'paper': architectures.paper_result(architecture, settings.data.dataset,
                                              settings.data.augment)}


def _write_results(settings: RunSettings, workdir: str, history: list, num_params: int,
                   wall_time: float, per_class: Optional[dict]) -> dict:
  """results.json: final and best evals, the final eval's per-class recall and confusion matrix
  (None if not evaluated in this process or too many classes), the built network and the
  paper's number for it."""
  results = {'final': history[-1], 'final_per_class': per_class,
             'best': run_setup.best(history),
             'selected_by': run_setup.selection(history[-1]['eval'])[0],
             **built_and_paper(settings), 'num_params': num_params, 'wall_time_sec': wall_time,
             'history': history, 'config': settings.config}
  if jax.process_index() == 0:
    try:
      (epath.Path(workdir) / 'results.json').write_text(json.dumps(results, indent=2))
    except OSError as e:
      raise RunError(f'cannot write {workdir}/results.json: {e}') from e
  logging.info('final %s', json.dumps(results['final']['eval']))
  return results


def _format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  hours, rest = divmod(int(seconds), 3600)
  return f'{hours}h{rest // 60:02d}m' if hours else f'{rest // 60}m{rest % 60:02d}s'
