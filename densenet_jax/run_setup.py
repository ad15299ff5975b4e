"""What every kind of run sets up before its work: the model, the data, the record of its
classes, and which checkpoint (or which weights) a model is evaluated with.

Training (train.py), evaluation (evaluation.py) and prediction (predict.py) build on this; none
of it needs the optimizer.
"""

import json
import os
from typing import Optional, Sequence

import jax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from densenet_jax import checkpoints, datasets, errors, inference, input_pipeline, models
from densenet_jax import weight_sources
from densenet_jax.datasets import DataOptions, DatasetInfo
from densenet_jax.settings import ModelSettings, RunSettings

CLASSES_FILE = 'classes.json'


class RunError(errors.UserError, RuntimeError):
  """A run that cannot go on for a reason the user can act on; main.py prints it as one line."""


def build_model(model: ModelSettings, num_classes: int) -> models.DenseNet:
  axis_name = inference.AXIS_NAME if model.cross_replica_bn else None
  return models.build_model(**dict(model.fields), num_classes=num_classes, axis_name=axis_name)


def open_data(options: DataOptions) -> input_pipeline.Data:
  """The run's data. Digits and folders are prepared on first use: with several processes, by
  process 0 while the others wait."""
  spec = datasets.spec(options.dataset, options.folder)
  if spec.prepared_on_first_use and jax.process_count() > 1:
    if jax.process_index() == 0:
      input_pipeline.Data(options)
    multihost_utils.sync_global_devices('folder dataset prepared')
  return input_pipeline.Data(options)


def check_writable(workdir: str):
  """Fails at once, not at the first checkpoint, if workdir cannot be written."""
  probe = epath.Path(workdir) / f'.write_test_{jax.process_index()}'
  try:
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text('ok')
    probe.unlink()
  except OSError as e:
    raise RunError(f'workdir {workdir} is not writable: {e}') from e


def write_classes(workdir: str, data: input_pipeline.Data):
  """workdir/classes.json: the class names, input shape, normalization and (folders) the eval
  transform, so that --mode=predict works after the data has moved."""
  info = data.info
  record = {'dataset': info.name, 'class_names': list(info.class_names),
            'image_shape': list(info.image_shape), 'normalization': list(info.normalization)}
  if data.spec.folder is not None:
    record['folder_transform'] = data.view.folder_transform
  if jax.process_index() == 0:
    partial = epath.Path(workdir) / f'.{CLASSES_FILE}.partial'
    partial.write_text(json.dumps(record, indent=1))
    partial.replace(epath.Path(workdir) / CLASSES_FILE)


def read_classes(workdir: str) -> Optional[dict]:
  """What a run's workdir records of its data (`write_classes`), or None if it has none."""
  path = epath.Path(workdir) / CLASSES_FILE
  return json.loads(path.read_text()) if path.exists() else None


def selection(eval_results: dict) -> tuple:
  """(split, error) that ranks checkpoints: validation's top-1 error if held out, else the
  first split's."""
  split = 'validation' if 'validation' in eval_results else next(iter(eval_results))
  return split, eval_results[split]['top1_error']


def best(history: list, steps: Optional[Sequence[int]] = None) -> dict:
  """The eval with the lowest selection error (among `steps`, if given); of equal errors the
  latest, as the checkpoint manager keeps (orbax's BestN keeps the last of a tie)."""
  candidates = [h for h in history if steps is None or h['step'] in steps]
  return min(reversed(candidates), key=lambda h: selection(h['eval'])[1])


def _checkpointed(workdir: Optional[str], like: dict, which: str) -> Optional[dict]:
  """{'step', 'params', 'batch_stats'} of workdir's best or latest checkpoint, or None."""
  if not (workdir and os.path.isdir(os.path.join(workdir, 'checkpoints'))):
    return None
  ckpt = checkpoints.Checkpoints(os.path.join(workdir, 'checkpoints'))
  try:
    restored, record = ckpt.restore_variables(like)
    if restored is not None and which == 'best':
      chosen = best(record['history'], steps=ckpt.manager.all_steps())
      restored, _ = ckpt.restore_variables(like, step=chosen['step'])
  finally:
    ckpt.close()
  return restored


def headless(state: inference.InferenceState,
             settings: ModelSettings) -> inference.InferenceState:
  """`state` without its classifier: its model outputs the pooled features (num_classes=0)."""
  params = {k: v for k, v in state.params.items() if k != 'classifier'}
  return state.replace(apply_fn=build_model(settings, 0).apply, params=params)


def inference_state(settings: RunSettings, workdir: Optional[str],
                    info: DatasetInfo) -> inference.InferenceState:
  """The model with the best (settings.eval_checkpoint='best') or latest checkpoint of workdir,
  else settings.init_from's weights."""
  model = build_model(settings.model, info.num_classes)
  init = lambda: inference.init_variables(model, jax.random.key(settings.seed),
                                          info.image_shape)[0]
  shapes = jax.eval_shape(init)
  restored = _checkpointed(workdir, shapes, settings.eval_checkpoint)
  if restored is not None:
    logging.info('Evaluating step %d of %s.', int(restored['step']), workdir)
    return inference.InferenceState(step=restored['step'], apply_fn=model.apply,
                                    params=restored['params'],
                                    batch_stats=restored['batch_stats'])
  if not settings.init_from:
    raise RunError(f'nothing to evaluate: no checkpoint in workdir={workdir!r} and no '
                   'config.init_from')
  loaded = weight_sources.read(settings.init_from, shapes)  # fails, if at all, before compiling
  # The model's initial values are needed only for a new head (init compiles the whole model).
  like = shapes if weight_sources.takes_loaded_head(loaded, shapes) else init()
  variables = weight_sources.fit(settings.init_from, loaded, like)
  return inference.InferenceState(step=0, apply_fn=model.apply, **variables)
