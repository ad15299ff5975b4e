"""Training and evaluation: `train_and_evaluate(config, workdir)` and `evaluate(config, workdir)`.

The train step (densenet_jax.steps.train_step) is pmapped over all local devices; each global
batch is split evenly over all devices of all processes (devices.Topology). Checkpoints are
written at every eval and when SIGTERM/SIGINT stops training, and restored automatically when a
run is started again on the same workdir; see checkpoints.py for what happens to incomplete or
unreadable ones.
"""

import functools
import itertools
import json
import math
import os
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from jax.experimental import multihost_utils
import numpy as np
from absl import logging
from etils import epath

from densenet_jax import architectures, checkpoints, config_validation, convert, costs, devices
from densenet_jax import folder_listing, input_pipeline, metric_writer, models, preemption, steps


class RunError(RuntimeError):
  """A run that cannot go on for a reason the user can act on; main.py prints it as one line."""


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
  start_time = time.time()
  config_validation.validate(config, jax.device_count())
  _check_writable(workdir)
  info = dataset_info_of(config)
  topology = devices.Topology.of_this_process(config.batch_size)
  steps_per_epoch = _steps_per_epoch(topology, info)
  total_steps = config.num_epochs * steps_per_epoch
  eval_every = max(1, int(round(config.eval_every_epochs * steps_per_epoch)))
  state, learning_rate_fn = _make_state(config, info, steps_per_epoch)
  num_params = costs.count_params({'params': state.params})
  ckpt = checkpoints.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                 keep=config.keep_checkpoints, cleanup=True)
  state, history = _restore_or_initialize(config, ckpt, state, workdir)
  _write_classes(config, workdir, info)
  start_step = int(state.step)
  writer = metric_writer.MetricWriter(workdir, enabled=jax.process_index() == 0)
  if start_step == 0:
    writer.write_text('config', config.to_json_best_effort(indent=2))
  train_batches = devices.prefetch_to_device(input_pipeline.create_train_iterator(
      config.dataset, data_dir=config.data_dir, topology=topology, seed=config.seed,
      start_step=start_step, augment=config.augment, **data_options(config)))
  evaluator = Evaluator(config, info)
  p_state = devices.replicate(state)
  del state
  first_batch = next(train_batches)
  p_train_step = _compile_train_step(config, learning_rate_fn, info, p_state, first_batch)
  train_batches = itertools.chain([first_batch], train_batches)
  log = _TrainLog(writer, config.batch_size, steps_per_epoch, total_steps)
  logging.info('%s: %s parameters, %d steps of %d images (%d per epoch), %d devices.',
               architecture_of(config).name, f'{num_params:,}', total_steps, config.batch_size,
               steps_per_epoch, jax.device_count())

  stop = preemption.StopRequest()
  try:
    for step in range(start_step + 1, total_steps + 1):
      p_state, metrics = p_train_step(p_state, next(train_batches))
      log.append(metrics)
      is_eval = step % eval_every == 0 or step == total_steps
      if is_eval:
        train_summary = log.flush(step, ckpt)
        p_state = _evaluate_and_checkpoint(p_state, step / steps_per_epoch, train_summary,
                                           evaluator, config, writer, ckpt, history)
      elif step % config.log_every_steps == 0:
        log.flush(step, ckpt)
      if stop.requested(step):
        _checkpoint_and_stop(p_state, step, is_eval, config, log, ckpt, history, stop)
  finally:
    stop.restore()
    writer.flush()
    ckpt.close()
  return _write_results(config, workdir, history, num_params, time.time() - start_time,
                        evaluator.per_class)


def evaluate(config: ml_collections.ConfigDict, workdir: Optional[str]) -> dict:
  """{'step', 'eval'}: the best (or latest) checkpoint of workdir, or config.init_from's
  weights, evaluated on every eval split."""
  config_validation.validate(config, jax.device_count())
  info = dataset_info_of(config)
  state = state_for_evaluation(config, workdir, info)
  evaluator = Evaluator(config, info, ten_crop=config.ten_crop)
  results = evaluator(devices.replicate(state))
  return {'step': int(state.step), 'eval': results, 'per_class': evaluator.per_class}


def state_for_evaluation(config, workdir: Optional[str], info: input_pipeline.DatasetInfo):
  """The best (or latest) checkpoint of workdir, else config.init_from's weights."""
  state, _ = _make_state(config, info, steps_per_epoch=1)
  return _restore_for_evaluation(config, workdir, state)


CLASSES_FILE = 'classes.json'


def read_classes(workdir: str) -> Optional[dict]:
  """What a run's workdir records of its data (`_write_classes`), or None if it has none."""
  path = epath.Path(workdir) / CLASSES_FILE
  return json.loads(path.read_text()) if path.exists() else None


def _write_classes(config, workdir: str, info: input_pipeline.DatasetInfo):
  """workdir/classes.json: the class names, input shape, normalization and (folders) the eval
  transform, so that --mode=predict works after the data has moved."""
  record = {'dataset': config.dataset, 'class_names': list(info.class_names),
            'image_shape': list(info.image_shape), 'normalization': list(info.normalization)}
  if folder_listing.is_folder(config.dataset):
    record['folder_transform'] = input_pipeline.folder_transform(
        data_options(config)['folder_options'], config.image_size)
  if jax.process_index() == 0:
    partial = epath.Path(workdir) / f'.{CLASSES_FILE}.partial'
    partial.write_text(json.dumps(record, indent=1))
    partial.replace(epath.Path(workdir) / CLASSES_FILE)


# ---------------------------------------------------------------------------------------------
# Setup

def architecture_of(config: ml_collections.ConfigDict) -> architectures.Architecture:
  """The network config.model describes (its name is the run's model name)."""
  return architectures.from_fields(config.model)


def create_model_from_config(config, num_classes: int) -> models.DenseNet:
  axis_name = steps.AXIS_NAME if config.cross_replica_bn else None
  return models.build_model(**config.model, num_classes=num_classes, axis_name=axis_name)


def _reports_top5(info: input_pipeline.DatasetInfo) -> bool:
  return info.num_classes > 10


def _check_writable(workdir: str):
  """Fails at once, not at the first checkpoint, if workdir cannot be written."""
  probe = epath.Path(workdir) / f'.write_test_{jax.process_index()}'
  try:
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise RunError(f'workdir {workdir} is not writable: {e}') from e


def data_options(config) -> dict:
  """The dataset options that every input pipeline call of a run takes."""
  folder_options = (input_pipeline.FolderOptions(**config.folder)
                    if folder_listing.is_folder(config.dataset) else None)
  return dict(holdout_validation=config.holdout_validation, image_size=config.image_size,
              folder_options=folder_options)


def dataset_info_of(config) -> input_pipeline.DatasetInfo:
  """The dataset's sizes and classes. A folder is prepared on first use: with several processes,
  by process 0 while the others wait."""
  info = functools.partial(input_pipeline.dataset_info, config.dataset, config.data_dir,
                           **data_options(config))
  try:
    if folder_listing.is_folder(config.dataset) and jax.process_count() > 1:
      if jax.process_index() == 0:
        info()
      multihost_utils.sync_global_devices('folder dataset prepared')
    return info()
  except FileNotFoundError as e:  # not prepared: the message says how to prepare it
    raise RunError(str(e)) from e


def _steps_per_epoch(topology: devices.Topology, info: input_pipeline.DatasetInfo) -> int:
  try:
    return topology.steps_per_epoch(info.num_train)
  except ValueError as e:
    raise RunError(f'config.batch_size={topology.global_batch_size}: {info.name}: {e}') from e


def _make_state(config, info, steps_per_epoch: int):
  model = create_model_from_config(config, info.num_classes)
  learning_rate_fn = steps.learning_rate_schedule(config.learning_rate, steps_per_epoch,
                                                  config.lr_decay_epochs, config.lr_decay_factor)
  tx = steps.sgd_nesterov(learning_rate_fn, config.momentum, config.weight_decay)
  state = steps.create_train_state(model, jax.random.key(config.seed), info.image_shape, tx)
  return state, learning_rate_fn


def _restore_or_initialize(config, ckpt: checkpoints.Checkpoints, state, workdir: str):
  """(state, eval history): the latest checkpoint's, else config.init_from's weights or new."""
  state, record = ckpt.restore(state)
  if record is None:
    if config.init_from:
      state = convert.load_initial_weights(config.init_from, state)
    return state, []
  checksum = sum(float(np.abs(x).sum()) for x in jax.tree.leaves(state.params))
  logging.info('Resumed from step %d of %s (sum of |params| %.9g).', int(state.step), workdir,
               checksum)
  return state, record['history']


def _restore_for_evaluation(config, workdir: Optional[str], state):
  """The best (config.eval_checkpoint='best') or latest checkpoint, else init_from's weights."""
  record = None
  if workdir and os.path.isdir(os.path.join(workdir, 'checkpoints')):
    ckpt = checkpoints.Checkpoints(os.path.join(workdir, 'checkpoints'))
    state, record = ckpt.restore(state)
    if record is not None and config.eval_checkpoint == 'best':
      best = _best(record['history'], steps=ckpt.manager.all_steps())
      state, record = ckpt.restore(state, step=best['step'])
    ckpt.close()
  if record is None:
    if not config.init_from:
      raise RunError(f'nothing to evaluate: no checkpoint in workdir={workdir!r} and no '
                     'config.init_from')
    state = convert.load_initial_weights(config.init_from, state)
  return state


def _compile_train_step(config, learning_rate_fn, info, p_state, batch) -> Callable:
  """The pmapped train step, with the dataset's device transform (normalization and the
  config's augmentation), compiled for these arguments with the platform's XLA options
  (steps.compiler_options).

  A pmap compiled for several processes cannot be called with each process's local arrays, so
  there the step stays as it is (compiled at its first call): only XLA:CPU has options, and a
  multi-process CPU run trains the same but without the memory-efficient mode's saving.
  """
  transform = input_pipeline.device_transform(
      info, train=True, seed=config.seed, augment=config.augment,
      folder_options=data_options(config)['folder_options'])
  p_train_step = jax.pmap(
      functools.partial(steps.train_step, learning_rate_fn=learning_rate_fn,
                        transform=transform, top5=_reports_top5(info)),
      axis_name=steps.AXIS_NAME, donate_argnums=(0,))
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


PER_CLASS_MAX_CLASSES = 100  # per-class recall and confusion matrix up to this many classes


class Evaluator:
  """Every eval split's batches (built once, re-read at each eval) and the pmapped eval step.

  With at most PER_CLASS_MAX_CLASSES classes, each call also leaves in `per_class` every
  split's per-class recall and confusion matrix, with the class names.
  """

  def __init__(self, config, info: input_pipeline.DatasetInfo, ten_crop: bool = False):
    self.class_names = list(info.class_names)
    self.confusion = info.num_classes <= PER_CLASS_MAX_CLASSES
    self.per_class = None
    transform = input_pipeline.device_transform(
        info, train=False, folder_options=data_options(config)['folder_options'])
    self.p_eval_step = jax.pmap(functools.partial(steps.eval_step, transform=transform,
                                                  top5=_reports_top5(info),
                                                  confusion=self.confusion),
                                axis_name=steps.AXIS_NAME)
    topology = devices.Topology.of_this_process(config.eval_batch_size)
    self.splits = {split: input_pipeline.create_eval_iterator(
        config.dataset, split, data_dir=config.data_dir, topology=topology, ten_crop=ten_crop,
        eval_resize=config.eval_resize, **data_options(config))[0]
                   for split in info.eval_splits}

  def __call__(self, p_state) -> dict:
    """Top-1/top-5 error and loss on every eval split, each example counted exactly once."""
    results, per_class = {}, {}
    for split, batches in self.splits.items():
      totals = None
      for batch in devices.prefetch_to_device(batches):
        sums = self.p_eval_step(p_state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
      totals = devices.unreplicate(totals)
      count = float(totals.pop('count'))
      if self.confusion:
        per_class[split] = self._per_class(np.rint(totals.pop('confusion')).astype(int))
      results[split] = {k: float(v) / count for k, v in totals.items()}
      results[split]['count'] = int(count)
    self.per_class = per_class or None
    return results

  def _per_class(self, confusion: np.ndarray) -> dict:
    """Recall of each class (None for a class with no examples) and the confusion matrix."""
    examples = confusion.sum(1)
    recall = [float(confusion[i, i] / n) if n else None for i, n in enumerate(examples)]
    return {'class_names': self.class_names, 'recall': recall,
            'confusion_matrix': confusion.tolist()}


_p_average_batch_stats = jax.pmap(steps.average_batch_stats, axis_name=steps.AXIS_NAME)


def _host_state(p_state, cross_replica_bn: bool):
  """(p_state, its host copy) to save or evaluate. With per-device BN statistics
  (cross_replica_bn=False) they are averaged first, so a checkpoint between evals changes them."""
  if not cross_replica_bn:
    p_state = p_state.replace(batch_stats=_p_average_batch_stats(p_state.batch_stats))
  return p_state, devices.unreplicate(p_state)


def _evaluate_and_checkpoint(p_state, epoch: float, train_summary: dict, evaluator: Evaluator,
                             config, writer, ckpt: checkpoints.Checkpoints, history: list):
  """Evaluates, logs, appends to `history` and saves a checkpoint ranked by its selection
  error; returns the state to train on."""
  p_state, saved = _host_state(p_state, config.cross_replica_bn)
  step = int(saved.step)
  eval_results = evaluator(p_state)
  for split, values in eval_results.items():
    writer.write_scalars(step, {f'{split}/{k}': v for k, v in values.items()})
    logging.info('step %d eval %s (%d images): %s', step, split, values['count'],
                 ' '.join(f'{k} {v:.4f}' for k, v in values.items() if k != 'count'))
  history.append({'step': step, 'epoch': epoch, 'eval': eval_results, 'train': train_summary})
  ckpt.save(saved, {'history': history}, selection_error=_selection(eval_results)[1])
  return p_state


def _checkpoint_and_stop(p_state, step: int, just_saved: bool, config, log: _TrainLog,
                         ckpt: checkpoints.Checkpoints, history: list,
                         stop: preemption.StopRequest):
  """Saves `step` (unless its eval just did), waits for the write and raises Interrupted."""
  if not just_saved:  # the history keeps only eval steps: it is unchanged
    log.check_finite(step, ckpt)
    ckpt.save(_host_state(p_state, config.cross_replica_bn)[1], {'history': history})
  ckpt.wait()
  signum = stop.received()
  raise Interrupted(f'stopped by {signum.name} after step {step}, whose checkpoint is in '
                    f'{ckpt.directory}; run the same command again to resume', signum)


# ---------------------------------------------------------------------------------------------
# Results

def _selection(eval_results: dict):
  """The split used to pick the best checkpoint: validation if held out, else the first."""
  split = 'validation' if 'validation' in eval_results else next(iter(eval_results))
  return split, eval_results[split]['top1_error']


def _best(history: list, steps: Optional[Sequence[int]] = None) -> dict:
  """The eval with the lowest selection error (among `steps`, if given); of equal errors the
  latest, as the checkpoint manager keeps (orbax's BestN keeps the last of a tie)."""
  candidates = [h for h in history if steps is None or h['step'] in steps]
  return min(reversed(candidates), key=lambda h: _selection(h['eval'])[1])


def built_and_paper(config) -> dict:
  """results.json's `architecture` (the network built) and `paper` (the paper's error for it on
  this dataset, or None where that network and dataset are not a row of Table 2 or 3)."""
  architecture = architecture_of(config)
  return {'architecture': architecture.describe(),
          'paper': architectures.paper_result(architecture, config.dataset, config.augment)}


def _write_results(config, workdir: str, history: list, num_params: int, wall_time: float,
                   per_class: Optional[dict]) -> dict:
  """results.json: final and best evals, the final eval's per-class recall and confusion matrix
  (None if not evaluated in this process or too many classes), the built network and the
  paper's number for it."""
  results = {'final': history[-1], 'final_per_class': per_class, 'best': _best(history),
             'selected_by': _selection(history[-1]['eval'])[0], **built_and_paper(config),
             'num_params': num_params, 'wall_time_sec': wall_time, 'history': history,
             'config': json.loads(config.to_json_best_effort())}
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
