"""Training and evaluation: `train_and_evaluate(config, workdir)` and `evaluate(config, workdir)`.

The train step (densenet_jax.steps.train_step) is pmapped over all local devices; each global
batch is split evenly over all devices of all processes. Checkpoints are written every eval and
restored automatically when a run is started again on the same workdir.
"""

import functools
import json
import math
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from densenet_jax import checkpoints, input_pipeline, models, steps
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
  """The first device's copy of a replicated pytree, on the host."""
  return jax.device_get(jax.tree_util.tree_map(lambda x: x[0], tree))


def _make_state(config, model, info, steps_per_epoch):
  learning_rate_fn = steps.learning_rate_schedule(config.learning_rate, steps_per_epoch,
                                                  config.lr_decay_epochs, config.lr_decay_factor)
  tx = steps.sgd_nesterov(learning_rate_fn, config.momentum, config.weight_decay)
  state = steps.create_train_state(model, jax.random.PRNGKey(config.seed), info.image_shape, tx)
  return state, learning_rate_fn


def _load_initial_weights(config, state, model, info):
  """Starts from imported (torchvision/Keras) or checkpointed weights; a new head if needed."""
  if not config.init_from:
    return state
  from densenet_jax import convert  # optional dependencies (torch, keras) load only when asked
  if os.path.isdir(config.init_from):
    restored, _ = checkpoints.Checkpoints(config.init_from).restore(state)
    variables = {'params': restored.params, 'batch_stats': restored.batch_stats}
  else:
    _, variables = convert.load_pretrained(config.init_from)
  params, batch_stats = dict(variables['params']), dict(variables['batch_stats'])
  if params['classifier']['kernel'].shape != state.params['classifier']['kernel'].shape:
    logging.info('Head has %s classes here, %s in %s: re-initializing the classifier.',
                 info.num_classes, params['classifier']['kernel'].shape[-1], config.init_from)
    params['classifier'] = state.params['classifier']
  expected = jax.tree_util.tree_structure(state.params)
  if jax.tree_util.tree_structure(params) != expected:
    raise ValueError(f'init_from={config.init_from!r} holds a different architecture than '
                     f'model {config.model.name!r}')
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from workdir's checkpoints if any) and writes workdir/results.json."""
  start_time = time.time()
  os.makedirs(workdir, exist_ok=True)
  info = input_pipeline.dataset_info(config.dataset, config.data_dir,
                                     holdout_validation=config.holdout_validation,
                                     image_size=config.image_size)
  devices = jax.local_devices()
  if config.batch_size % jax.device_count():
    raise ValueError(f'batch_size={config.batch_size} does not divide evenly over '
                     f'{jax.device_count()} devices')
  steps_per_epoch = info.num_train // config.batch_size
  total_steps = config.num_epochs * steps_per_epoch
  model = create_model_from_config(config, info.num_classes)
  state, learning_rate_fn = _make_state(config, model, info, steps_per_epoch)
  num_params = models.count_params({'params': state.params})

  ckpt = checkpoints.Checkpoints(os.path.join(workdir, 'checkpoints'),
                                 keep=config.keep_checkpoints)
  state, record = ckpt.restore(state)
  history = []
  if record is None:
    state = _load_initial_weights(config, state, model, info)
  else:
    history = record['history']
    logging.info('Resumed from step %d of %s.', int(state.step), workdir)
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

  train_metrics, window_start, window_steps = [], time.time(), 0
  for step in range(start_step + 1, total_steps + 1):
    p_state, metrics = p_train_step(p_state, next(train_iter))
    train_metrics.append(metrics)
    window_steps += 1
    if step % config.log_every_steps == 0 or step % eval_every == 0 or step == total_steps:
      summary = {k: float(np.mean([m[k][0] for m in train_metrics]))
                 for k in train_metrics[0] if k != 'finite'}
      if not all(bool(m['finite'][0]) for m in train_metrics):
        raise FloatingPointError(f'non-finite loss or gradient at or before step {step} '
                                 f'(loss {summary["loss"]}); the last good checkpoint is kept')
      elapsed = time.time() - window_start
      summary['images_per_sec'] = window_steps * config.batch_size / elapsed
      writer.write_scalars(step, {f'train/{k}': v for k, v in summary.items()})
      eta = (total_steps - step) * elapsed / window_steps
      logging.info('step %d/%d epoch %.2f | loss %.4f top1_error %.4f lr %.4g | %.0f img/s | '
                   'eta %s', step, total_steps, step / steps_per_epoch, summary['loss'],
                   summary['top1_error'], summary['learning_rate'], summary['images_per_sec'],
                   _format_seconds(eta))
      train_metrics, window_start, window_steps = [], time.time(), 0

    if step % eval_every == 0 or step == total_steps:
      if not config.cross_replica_bn:
        p_state = p_state.replace(batch_stats=p_average_stats(p_state.batch_stats))
      eval_results = _evaluate_splits(p_eval_step, p_state, config, info)
      for split, values in eval_results.items():
        writer.write_scalars(step, {f'{split}/{k}': v for k, v in values.items()})
        logging.info('step %d eval %s (%d images): %s', step, split, values['count'],
                     ' '.join(f'{k} {v:.4f}' for k, v in values.items() if k != 'count'))
      _, selection_error = _selection(eval_results)
      history.append({'step': step, 'epoch': step / steps_per_epoch, 'eval': eval_results,
                      'train': summary})
      ckpt.save(unreplicate(p_state), {'history': history}, selection_error=selection_error)
  writer.flush()
  ckpt.wait()
  ckpt.close()

  results = _results(config, history, num_params, time.time() - start_time)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2)
  logging.info('final %s', json.dumps(results['final']['eval']))
  return results


def _results(config, history, num_params, wall_time):
  final = history[-1]
  best = min(history, key=lambda h: _selection(h['eval'])[1])
  return {'final': final, 'best': best, 'selected_by': _selection(final['eval'])[0],
          'num_params': num_params, 'wall_time_sec': wall_time,
          'config': json.loads(config.to_json_best_effort())}


def evaluate(config: ml_collections.ConfigDict, workdir: Optional[str]) -> dict:
  """Evaluates the best (or latest) checkpoint of workdir, or config.init_from's weights."""
  info = input_pipeline.dataset_info(config.dataset, config.data_dir,
                                     holdout_validation=config.holdout_validation,
                                     image_size=config.image_size)
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
      raise ValueError(f'nothing to evaluate: no checkpoint in workdir={workdir!r} and no '
                       'config.init_from')
    state = _load_initial_weights(config, state, model, info)
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
