"""run_setup.py: which eval picks the best checkpoint, classes.json, and the state evaluation
and prediction use (a run's best or latest checkpoint, else init_from's weights)."""

import json

import jax
import numpy as np
import optax
import pytest

from configs import digits
from densenet_jax import checkpoints, inference, run_setup, steps
from densenet_jax.datasets import DatasetInfo
from densenet_jax.settings import RunSettings


def history(*errors, split='test'):
  return [{'step': 10 * (i + 1), 'eval': {split: {'top1_error': e}}} for i, e in enumerate(errors)]


def test_selection_prefers_validation_and_best_takes_the_latest_of_a_tie():
  assert run_setup.selection({'test': {'top1_error': 0.2}}) == ('test', 0.2)
  assert run_setup.selection({'validation': {'top1_error': 0.3},
                              'test': {'top1_error': 0.1}}) == ('validation', 0.3)
  evals = history(0.5, 0.2, 0.3, 0.2)
  assert run_setup.best(evals)['step'] == 40  # a tie: the later, as orbax's BestN keeps
  assert run_setup.best(evals, steps=[10, 30])['step'] == 30  # among the checkpoints kept


def settings(**overrides) -> RunSettings:
  config = digits.get_config()
  config.model.depth, config.model.growth_rate, config.image_size = 10, 4, 8
  config.update(overrides)
  return RunSettings.from_config(config)


INFO = DatasetInfo('digits', 10, (8, 8, 1), 0, {}, (), tuple('0123456789'), (16.0, (0.0,), (1.0,)))


def saved_run(tmp_path, run: RunSettings, errors):
  """A workdir with one checkpoint per eval of `errors`, params shifted by the step."""
  model = run_setup.build_model(run.model, INFO.num_classes)
  state = steps.create_train_state(model, jax.random.key(run.seed), INFO.image_shape,
                                   steps.sgd_nesterov(optax.constant_schedule(0.1), 0.9, 0.0))
  evals = history(*errors)
  ckpt = checkpoints.Checkpoints(str(tmp_path / 'checkpoints'), keep=5)
  for i, (entry, error) in enumerate(zip(evals, errors)):
    shifted = state.replace(step=np.int32(entry['step']),
                            params=jax.tree.map(lambda p, s=entry['step']: p + s, state.params))
    ckpt.save(jax.device_get(shifted), {'history': evals[:i + 1]}, selection_error=error)
  ckpt.close()
  return state


@pytest.mark.parametrize('which,step', [('best', 20), ('latest', 30)])
def test_inference_state_reads_the_best_or_latest_checkpoint(tmp_path, which, step):
  run = settings(eval_checkpoint=which)
  state = saved_run(tmp_path, run, [0.5, 0.1, 0.3])
  restored = run_setup.inference_state(run, str(tmp_path), INFO)
  assert isinstance(restored, inference.InferenceState) and int(restored.step) == step
  np.testing.assert_array_equal(restored.params['classifier']['bias'],
                                state.params['classifier']['bias'] + step)


def test_inference_state_without_a_checkpoint_needs_init_from(tmp_path):
  with pytest.raises(run_setup.RunError, match='nothing to evaluate: no checkpoint in'):
    run_setup.inference_state(settings(), str(tmp_path / 'empty'), INFO)
  # A run directory as init_from: its latest checkpoint's weights, step 0.
  state = saved_run(tmp_path / 'source', settings(), [0.5, 0.1])
  restored = run_setup.inference_state(settings(init_from=str(tmp_path / 'source')),
                                       str(tmp_path / 'empty'), INFO)
  assert int(restored.step) == 0
  np.testing.assert_array_equal(restored.params['classifier']['bias'],
                                state.params['classifier']['bias'] + 20)


def test_classes_json_round_trip_is_none_without_a_run(tmp_path):
  assert run_setup.read_classes(str(tmp_path)) is None
  (tmp_path / run_setup.CLASSES_FILE).write_text(json.dumps({'class_names': ['a']}))
  assert run_setup.read_classes(str(tmp_path)) == {'class_names': ['a']}
