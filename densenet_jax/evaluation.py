"""Evaluation: the Evaluator that training calls at every eval, and `evaluate(config, workdir)`
(--mode=evaluate), which scores the best (or latest) checkpoint of a run, or config.init_from's
weights, on every eval split of the dataset.
"""

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from densenet_jax import config_validation, devices, inference, input_pipeline, run_setup
from densenet_jax import weight_sources
from densenet_jax.settings import RunSettings

PER_CLASS_MAX_CLASSES = 100  # per-class recall and confusion matrix up to this many classes


class Evaluator:
  """Every eval split's batches (built once, re-read at each eval) and the pmapped eval step.

  With at most PER_CLASS_MAX_CLASSES classes, each call also leaves in `per_class` every
  split's per-class recall and confusion matrix, with the class names.
  """

  def __init__(self, data: input_pipeline.Data, eval_batch_size: int):
    info = data.info
    self.class_names = list(info.class_names)
    self.confusion = info.num_classes <= PER_CLASS_MAX_CLASSES
    self.per_class = None
    self.p_eval_step = jax.pmap(functools.partial(
        inference.eval_step, transform=data.device_transform(train=False),
        top5=info.reports_top5, confusion=self.confusion), axis_name=inference.AXIS_NAME)
    topology = devices.Topology.of_this_process(eval_batch_size)
    self.splits = {split: data.eval_iterator(split, topology)[0] for split in info.eval_splits}

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


def evaluate(config: ml_collections.ConfigDict, workdir: Optional[str]) -> dict:
  """{'step', 'eval', 'per_class'}: the best (or latest) checkpoint of workdir, or
  config.init_from's weights, evaluated on every eval split."""
  config_validation.validate(config, jax.device_count())
  settings = RunSettings.from_config(config)
  weight_sources.fetch(settings.init_from)
  data = run_setup.open_data(settings.data)
  state = run_setup.inference_state(settings, workdir, data.info)
  evaluator = Evaluator(data, settings.eval_batch_size)
  results = evaluator(devices.replicate(state))
  return {'step': int(state.step), 'eval': results, 'per_class': evaluator.per_class}


def format_evaluation(evaluation: dict) -> str:
  """One line per split: its errors in percent and its loss; then, where computed, each
  class's recall and the confusion matrix (rows: true class, columns: predicted)."""
  lines = []
  for split, values in evaluation['eval'].items():
    errors = ' '.join(f'{k} {100 * v:.2f}%' for k, v in values.items() if k.endswith('error'))
    lines.append(f'{split} ({values["count"]} images, step {evaluation["step"]}): {errors} '
                 f'loss {values["loss"]:.4f}')
  for split, per_class in (evaluation.get('per_class') or {}).items():
    names = per_class['class_names']
    width = max(len(n) for n in names)
    lines.append(f'{split}: recall per class, then the confusion matrix (row: true, column: '
                 'predicted)')
    for name, recall, row in zip(names, per_class['recall'], per_class['confusion_matrix']):
      shown = '-' if recall is None else f'{100 * recall:.2f}%'
      lines.append(f'  {name:>{width}} {shown:>7} | ' + ' '.join(f'{c:>4}' for c in row))
  return '\n'.join(lines)
