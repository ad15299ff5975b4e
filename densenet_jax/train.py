"""Training and evaluation: `train_and_evaluate(config, workdir)` and `evaluate(config, workdir)`.

The train step (densenet_jax.steps.train_step) is pmapped over all local devices; each global
batch is split evenly over all devices of all processes. Checkpoints are written at every eval
and when SIGTERM/SIGINT stops training, and restored automatically when a run is started again
on the same workdir; see checkpoints.py for what happens to incomplete or unreadable ones.
"""

import functools
import json
import math
import os
import signal
import threading
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from densenet_jax import checkpoints, config_validation, input_pipeline, models, steps
from densenet_jax import metric_writer


def create_model_from_config(config, num_classes: int) -> models.DenseNet:
  overrides = {k: v for k, v in config.model.items() if k != 'name'}
  axis_name = steps.AXIS_NAME if config.cross_replica_bn else None
  return models.create_model(config.model.name, num_classes=num_classes, axis_name=axis_name,
                             **overrides)


def replicate(tree, devices):
  """Copies a host pytree to every local device, laid out for jax.pmap (leading device axis)."""
  return jax.tree_util.tree_map(lambda x: np.stack([np.asarray(x)] * len(devices)), tree)


def unreplicate(tree):
  """The first local device's copy of a replicated pytree, on the host.

  A copy, not `x[0]`: indexing runs a computation over the local devices, and with several
  processes on CPU these per-process collectives were seen to hang (1 run in 6).
  """
  return jax.tree_util.tree_map(
      lambda x: np.asarray(x.addressable_data(0)).reshape(x.shape[1:]), tree)


def _make_state(config, model, info, steps_per_epoch):
  learning_rate_fn = steps.learning_rate_schedule(config.learning_rate, steps_per_epoch,
                                                  config.lr_decay_epochs, config.lr_decay_factor)
  tx = steps.sgd_nesterov(learning_rate_fn, config.momentum, config.weight_decay)
  state = steps.create_train_state(model, jax.random.PRNGKey(config.seed), info.image_shape, tx)
  return state, learning_rate_fn


def load_initial_weights(init_from: str, state):
  """`state` with the weights of a torchvision/Keras file or a checkpoint directory.

  A classifier of another shape (another number of classes) is not loaded: the state's freshly
  initialized head is kept (fine-tuning).
  """
  from densenet_jax import convert  # optional dependencies (torch, keras) load only when asked
  if os.path.isdir(init_from):
    restored, _ = checkpoints.Checkpoints(init_from).restore(state)
    variables = {'params': restored.params, 'batch_stats': restored.batch_stats}
  else:
    _, variables = convert.load_pretrained(init_from)
  params, batch_stats = dict(variables['params']), dict(variables['batch_stats'])
  head, new_head = params['classifier']['kernel'].shape, state.params['classifier']['kernel'].shape
  if head != new_head:
    logging.info('%s has a %d-class classifier, the model %d classes: new classifier.',
                 init_from, head[-1], new_head[-1])
    params['classifier'] = state.params['classifier']
  if jax.tree_util.tree_structure(params) != jax.tree_util.tree_structure(state.params):
    raise ValueError(f'init_from={init_from!r} holds another architecture than the model')
  return state.replace(params=params, batch_stats=batch_stats)


def _evaluate_splits(p_eval_step, state, config, info, ten_crop=False):
  """Top-1/top-5 error and loss on every eval split, each example counted exactly once."""
  results = {}
  for split in info.eval_splits:
    batches, _ = input_pipeline.create_eval_iterator(
        config.dataset, split, data_dir=config.data_dir, global_batch_size=config.eval_batch_size,
        holdout_validation=config.holdout_validation, ten_crop=ten_crop,
        eval_resize=config.eval_resize, image_size=config.image_size)
    totals = None
    for batch in input_pipeline.prefetch_to_device(iter(batches)):
      sums = p_eval_step(state, batch)
      totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    totals = unreplicate(totals)
    count = float(totals.pop('count'))
    results[split] = {k: float(v) / count for k, v in totals.items()}
    results[split]['count'] = int(count)
  return results


def _selection(eval_results: dict):
  """The split used to pick the best checkpoint: validation if held out, else the first."""
  split = 'validation' if 'validation' in eval_results else next(iter(eval_results))
  return split, eval_results[split]['top1_error']


class RunError(RuntimeError):
  """A run that cannot go on for a reason the user can act on; main.py prints it as one line."""


class Interrupted(RunError):
  """Training stopped on a signal after a checkpoint of its last step was written."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


class _StopRequest:
  """SIGTERM or SIGINT asks the training loop to checkpoint and stop after the current step.

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

  def restore(self):
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}


def _check_writable(workdir: str):
  """Fails at once, not at the first checkpoint, if workdir cannot be written."""
  probe = epath.Path(workdir) / f'.write_test_{jax.process_index()}'
  try:
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise RunError(f'workdir {workdir} is not writable: {e}') from e


def _dataset_info(config) -> input_pipeline.DatasetInfo:
  try:
    return input_pipeline.dataset_info(config.dataset, config.data_dir,
                                       holdout_validation=config.holdout_validation,
                                       image_size=config.image_size)
  except FileNotFoundError as e:  # not prepared: the message says how to prepare it
    raise RunError(str(e)) from e


def _check_finite(window: list, step: int, ckpt: checkpoints.Checkpoints):
  """Raises RunError naming the first step of the window (host metrics of the steps up to
  `step`) whose loss or gradient was not finite."""
  finite = [bool(m['finite'][0]) for m in window]
  if not all(finite):
    bad = step - len(window) + 1 + finite.index(False)
    raise RunError(f'non-finite loss or gradient at step {bad} (loss '
                   f'{float(window[finite.index(False)]["loss"][0])}); stopped without saving: '
                   f'the last checkpoint (step {ckpt.latest_step()}) in {ckpt.directory} is kept')


def _with_compiler_options(p_step: Callable, *args) -> Callable:
  """p_step compiled for args with the platform's XLA options (steps.compiler_options).

  A pmap compiled for several processes cannot be called with each process's local arrays, so
  there p_step stays as it is: only XLA:CPU has options, and a multi-process CPU run trains the
  same but without the memory-efficient mode's saving.
  """
  options = steps.compiler_options(jax.default_backend())
  if not options or jax.process_count() > 1:
    return p_step
  return p_step.lower(*args).compile(options)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from workdir's checkpoints if any) and writes workdir/results.json.

  SIGTERM or SIGINT: the current step is checkpointed and Interrupted is raised; a restarted run
  continues exactly where it stopped (same data, augmentation, dropout and optimizer state).
  """
  start_time = time.time()
  config_validation.validate(config, jax.device_count())
  _check_writable(workdir)
  info = _dataset_info(config)
  devices = jax.local_devices()
  steps_per_epoch = info.num_train // config.batch_size
  total_steps = config.num_epochs * steps_per_epoch
  model = create_model_from_config(config, info.num_classes)
  state, learning_rate_fn = _make_state(config, model, info, steps_per_epoch)
  num_params = models.count_params({'params': state.params})

  ckpt = checkpoints.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                 keep=config.keep_checkpoints, cleanup=True)
  state, record = ckpt.restore(state)
  history = []
  if record is None:
    if config.init_from:
      state = load_initial_weights(config.init_from, state)
  else:
    history = record['history']
    checksum = sum(float(np.abs(x).sum()) for x in jax.tree_util.tree_leaves(state.params))
    logging.info('Resumed from step %d of %s (sum of |params| %.9g).', int(state.step), workdir,
                 checksum)
  start_step = int(state.step)

  top5 = info.num_classes > 10
  p_train_step = jax.pmap(
      functools.partial(steps.train_step, learning_rate_fn=learning_rate_fn, top5=top5),
      axis_name=steps.AXIS_NAME, donate_argnums=(0,))
  p_eval_step = jax.pmap(functools.partial(steps.eval_step, top5=top5),
                         axis_name=steps.AXIS_NAME)
  p_average_stats = jax.pmap(steps.average_batch_stats, axis_name=steps.AXIS_NAME)

  writer = metric_writer.MetricWriter(workdir, enabled=jax.process_index() == 0)
  if start_step == 0:
    writer.write_text('config', config.to_json_best_effort(indent=2))
  train_iter = input_pipeline.prefetch_to_device(input_pipeline.create_train_iterator(
      config.dataset, data_dir=config.data_dir, global_batch_size=config.batch_size,
      seed=config.seed, start_step=start_step, augment=config.augment,
      holdout_validation=config.holdout_validation, image_size=config.image_size))
  p_state = replicate(state, devices)
  del state
  eval_every = max(1, int(round(config.eval_every_epochs * steps_per_epoch)))
  logging.info('%s: %s parameters, %d steps of %d images (%d per epoch), %d devices.',
               config.model.name, f'{num_params:,}', total_steps, config.batch_size,
               steps_per_epoch, jax.device_count())

  def host_state(p_state):
    """The state to save or evaluate; per-device BN statistics are averaged first (with
    cross_replica_bn=False, so a checkpoint between evals changes the BN statistics)."""
    if not config.cross_replica_bn:
      p_state = p_state.replace(batch_stats=p_average_stats(p_state.batch_stats))
    return p_state, unreplicate(p_state)

  stop = _StopRequest()
  try:
    window, window_start = [], time.time()  # the metrics of the steps since the last log
    for step in range(start_step + 1, total_steps + 1):
      batch = next(train_iter)
      if step == start_step + 1:
        p_train_step = _with_compiler_options(p_train_step, p_state, batch)
      p_state, metrics = p_train_step(p_state, batch)
      window.append(metrics)
      is_eval = step % eval_every == 0 or step == total_steps
      if step % config.log_every_steps == 0 or is_eval:
        window = jax.device_get(window)
        _check_finite(window, step, ckpt)
        summary = {k: float(np.mean([m[k][0] for m in window])) for k in window[0]
                   if k != 'finite'}
        elapsed = time.time() - window_start
        summary['images_per_sec'] = len(window) * config.batch_size / elapsed
        writer.write_scalars(step, {f'train/{k}': v for k, v in summary.items()})
        eta = (total_steps - step) * elapsed / len(window)
        logging.info('step %d/%d epoch %.2f | loss %.4f top1_error %.4f lr %.4g | %.0f img/s | '
                     'eta %s', step, total_steps, step / steps_per_epoch, summary['loss'],
                     summary['top1_error'], summary['learning_rate'], summary['images_per_sec'],
                     _format_seconds(eta))
        window, window_start = [], time.time()

      if is_eval:
        p_state, saved = host_state(p_state)
        eval_results = _evaluate_splits(p_eval_step, p_state, config, info)
        for split, values in eval_results.items():
          writer.write_scalars(step, {f'{split}/{k}': v for k, v in values.items()})
          logging.info('step %d eval %s (%d images): %s', step, split, values['count'],
                       ' '.join(f'{k} {v:.4f}' for k, v in values.items() if k != 'count'))
        _, selection_error = _selection(eval_results)
        history.append({'step': step, 'epoch': step / steps_per_epoch, 'eval': eval_results,
                        'train': summary})
        ckpt.save(saved, {'history': history}, selection_error=selection_error)

      if stop.requested(step):
        if not is_eval:  # the history keeps only eval steps: it is unchanged
          _check_finite(jax.device_get(window), step, ckpt)
          p_state, saved = host_state(p_state)
          ckpt.save(saved, {'history': history})
        ckpt.wait()
        signum = stop.signum or signal.SIGTERM  # several processes: the preemption service's
        raise Interrupted(f'stopped by {signal.Signals(signum).name} after step {step}, whose '
                          f'checkpoint is in {ckpt.directory}; run the same command again to '
                          'resume', signum)
  finally:
    stop.restore()
    writer.flush()
    ckpt.close()

  results = _results(config, history, num_params, time.time() - start_time)
  if jax.process_index() == 0:
    try:
      (epath.Path(workdir) / 'results.json').write_text(json.dumps(results, indent=2))
    except OSError as e:
      raise RunError(f'cannot write {workdir}/results.json: {e}') from e
  logging.info('final %s', json.dumps(results['final']['eval']))
  return results


def _results(config, history, num_params, wall_time):
  final = history[-1]
  best = min(history, key=lambda h: _selection(h['eval'])[1])
  return {'final': final, 'best': best, 'selected_by': _selection(final['eval'])[0],
          'num_params': num_params, 'wall_time_sec': wall_time, 'history': history,
          'config': json.loads(config.to_json_best_effort())}


def evaluate(config: ml_collections.ConfigDict, workdir: Optional[str]) -> dict:
  """Evaluates the best (or latest) checkpoint of workdir, or config.init_from's weights."""
  config_validation.validate(config, jax.device_count())
  info = _dataset_info(config)
  model = create_model_from_config(config, info.num_classes)
  state, _ = _make_state(config, model, info, steps_per_epoch=1)
  record = None
  if workdir and os.path.isdir(os.path.join(workdir, 'checkpoints')):
    ckpt = checkpoints.Checkpoints(os.path.join(workdir, 'checkpoints'))
    state, record = ckpt.restore(state)
    if record is not None and config.eval_checkpoint == 'best':
      best = min(record['history'], key=lambda h: _selection(h['eval'])[1])
      state, record = ckpt.restore(state, step=best['step'])
    ckpt.close()
  if record is None:
    if not config.init_from:
      raise RunError(f'nothing to evaluate: no checkpoint in workdir={workdir!r} and no '
                     'config.init_from')
    state = load_initial_weights(config.init_from, state)
  p_eval_step = jax.pmap(functools.partial(steps.eval_step, top5=info.num_classes > 10),
                         axis_name=steps.AXIS_NAME)
  results = _evaluate_splits(p_eval_step, replicate(state, jax.local_devices()), config, info,
                             ten_crop=config.ten_crop)
  for split, values in results.items():
    print(f'{split} ({values["count"]} images, step {int(state.step)}): ' +
          ' '.join(f'{k} {100 * v:.2f}%' for k, v in values.items() if k.endswith('error')) +
          f' loss {values["loss"]:.4f}')
  return results


def _format_seconds(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  hours, rest = divmod(int(seconds), 3600)
  return f'{hours}h{rest // 60:02d}m' if hours else f'{rest // 60}m{rest % 60:02d}s'
