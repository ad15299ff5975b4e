"""checkpoints.py: save and restore, exact resume of the state, unreadable or killed checkpoints
set aside, non-finite states refused, failed writes as one-line errors, and the variables-only
restore that evaluation and prediction use."""

import contextlib
import errno
import functools
import logging
import os
import shutil

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from densenet_jax import checkpoints, models, steps
import helpers


@pytest.fixture(scope='module')
def state():
  model = models.create_model('densenet_bc100_k12', depth=10, growth_rate=2, num_classes=3)
  tx = steps.sgd_nesterov(optax.constant_schedule(0.1), 0.9, 1e-4)
  return jax.device_get(steps.create_train_state(model, jax.random.key(0), (8, 8, 1), tx))


def at_step(state, step):
  """A distinct state per step: params shifted by the step."""
  return state.replace(step=np.int32(step),
                       params=jax.tree.map(lambda p: p + step, state.params))


def save(directory, state, step_numbers, **kwargs):
  ckpt = checkpoints.Checkpoints(directory, keep=5, **kwargs)
  for step in step_numbers:
    ckpt.save(at_step(state, step), {'history': [step]}, selection_error=1.0 / step)
  ckpt.close()


def truncate_arrays(path):
  for root, _, files in os.walk(path / 'state'):
    for name in files:
      if '/d' in root:  # the array chunks
        os.truncate(os.path.join(root, name), os.path.getsize(os.path.join(root, name)) // 2)


CORRUPTIONS = {
    'truncated array files': truncate_arrays,
    'garbled record': lambda path: (path / 'record' / 'metadata').write_text('{"hist'),
    'missing state metadata': lambda path: (path / 'state' / '_METADATA').unlink(),
}


def test_a_checkpoint_with_a_legacy_key_restores_and_resumes_bitwise(tmp_path):
  """Checkpoints written before typed keys hold dropout_rng as a uint32[2] jax.random.PRNGKey
  (train.py made the state from one): restored, it is the same key, and the next step with
  dropout is bitwise the step the legacy state takes."""
  model = models.create_model('densenet_bc100_k12', depth=10, growth_rate=2, num_classes=3,
                              dropout_rate=0.5)
  lr_fn = optax.constant_schedule(0.1)
  tx = steps.sgd_nesterov(lr_fn, 0.9, 1e-4)
  legacy = steps.create_train_state(model, jax.random.PRNGKey(0), (8, 8, 1), tx)
  assert legacy.dropout_rng.dtype == np.uint32 and legacy.dropout_rng.shape == (2,)
  manager = ocp.CheckpointManager(str(tmp_path), item_names=('state', 'record'))
  manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave({
      'step': legacy.step, 'params': legacy.params, 'batch_stats': legacy.batch_stats,
      'opt_state': legacy.opt_state, 'dropout_rng': legacy.dropout_rng}),
      record=ocp.args.JsonSave({'history': []})))
  manager.wait_until_finished()
  manager.close()

  template = steps.create_train_state(model, jax.random.key(1), (8, 8, 1), tx)
  ckpt = checkpoints.Checkpoints(str(tmp_path))
  restored, record = ckpt.restore(template)
  ckpt.close()
  assert record == {'history': []}
  assert jax.dtypes.issubdtype(restored.dropout_rng.dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(jax.random.key_data(restored.dropout_rng), legacy.dropout_rng)
  step = jax.jit(functools.partial(steps.train_step, learning_rate_fn=lr_fn, axis_name=None))
  rng = np.random.default_rng(0)
  batch = {'image': rng.normal(size=(4, 8, 8, 1)).astype(np.float32),
           'label': np.arange(4, dtype=np.int32) % 3}
  expected, resumed = step(legacy, batch)[0], step(restored, batch)[0]
  for a, b in zip(jax.tree.leaves(expected.params), jax.tree.leaves(resumed.params)):
    np.testing.assert_array_equal(a, b)
  other = step(restored.replace(dropout_rng=jax.random.key(7)), batch)[0]  # the key matters
  assert not all(np.array_equal(a, b) for a, b in
                 zip(jax.tree.leaves(expected.params), jax.tree.leaves(other.params)))


@pytest.mark.parametrize('corruption', list(CORRUPTIONS))
def test_unreadable_latest_and_killed_save_are_skipped(tmp_path, state, caplog, corruption):
  directory = tmp_path / 'checkpoints'
  save(directory, state, [1, 2, 3])
  shutil.copytree(directory / '3', directory / '4.orbax-checkpoint-tmp-1700000000')  # kill -9
  CORRUPTIONS[corruption](directory / '3')

  ckpt = checkpoints.Checkpoints(directory, keep=5, cleanup=True)
  with caplog.at_level(logging.WARNING):
    restored, record = ckpt.restore(state)
  assert int(restored.step) == 2 and record == {'history': [2]}
  np.testing.assert_array_equal(restored.params['classifier']['bias'],
                                at_step(state, 2).params['classifier']['bias'])
  assert f'Checkpoint 3 in {directory} cannot be read' in caplog.text
  names = sorted(os.listdir(directory))
  assert names[:2] == ['1', '2'] and names[2].startswith('3.unreadable-') and len(names) == 3

  ckpt.save(at_step(state, 3), {'history': [3]})  # the step can be saved again
  ckpt.close()
  with contextlib.closing(checkpoints.Checkpoints(directory)) as ckpt:
    assert int(ckpt.restore(state)[0].step) == 3


def test_nothing_is_moved_when_no_checkpoint_can_be_read(tmp_path, state):
  directory = tmp_path / 'checkpoints'
  save(directory, state, [1, 2])
  other = state.replace(params={**state.params, 'extra': np.zeros(3, np.float32)})
  with contextlib.closing(checkpoints.Checkpoints(directory)) as ckpt, pytest.raises(
      checkpoints.CheckpointError,
      match=r'no checkpoint in .* can be read into this model \(step 2: '):
    ckpt.restore(other)  # another model: not corruption
  truncate_arrays(directory / '1')
  truncate_arrays(directory / '2')
  with contextlib.closing(checkpoints.Checkpoints(directory)) as ckpt, pytest.raises(
      checkpoints.CheckpointError, match='use another workdir to start afresh'):
    ckpt.restore(state)
  assert sorted(os.listdir(directory)) == ['1', '2']


def test_a_non_finite_state_is_never_saved(tmp_path, state):
  directory = tmp_path / 'checkpoints'
  save(directory, state, [1])
  bad = at_step(state, 2)
  bad = bad.replace(params={**bad.params, 'classifier': {
      **bad.params['classifier'], 'bias': np.full_like(bad.params['classifier']['bias'], np.nan)}})
  ckpt = checkpoints.Checkpoints(directory)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"not saving step 2: \['params'\]\['classifier'\]\['bias'\] holds NaN"):
    ckpt.save(bad, {'history': [2]})
  ckpt.close()
  assert helpers.complete_steps(tmp_path) == [1]


@pytest.mark.parametrize('code,methods', [(errno.EROFS, helpers.WRITES),
                                          (errno.ENOSPC, helpers.WRITES),
                                          (errno.ENOSPC, ('write_text', 'write_bytes'))])
def test_failed_writes_are_one_line_errors_and_keep_the_last_checkpoint(tmp_path, state,
                                                                         monkeypatch, code,
                                                                         methods):
  directory = tmp_path / 'checkpoints'
  save(directory, state, [1])
  # directories, or files only
  helpers.fail_writes(monkeypatch, str(directory / '2'), code, methods)
  ckpt = checkpoints.Checkpoints(directory)
  with pytest.raises(checkpoints.CheckpointError) as error:
    ckpt.save(at_step(state, 2), {'history': [2]})
    ckpt.wait()
  assert str(error.value).startswith(f'cannot write checkpoints to {directory}: [Errno {code}] '
                                     f"{os.strerror(code)}: '{directory / '2'}")
  assert '\n' not in str(error.value)
  assert helpers.complete_steps(tmp_path) == [1]
  monkeypatch.undo()
  with contextlib.closing(checkpoints.Checkpoints(directory)) as ckpt:
    assert int(ckpt.restore(state)[0].step) == 1


def test_root_cause_of_a_tensorstore_write_error_is_one_line():
  # The shape of what tensorstore raised when a real 200 kB tmpfs filled up (abridged).
  error = ValueError(
      'RESOURCE_EXHAUSTED: Error writing "opt_state.1.0.trace.head_norm.bias/0" in OCDBT '
      'database at local file "/full/run/checkpoints/44.orbax-checkpoint-tmp/state/": Failed to '
      'write 311 bytes to file 5: No space left on device [tensorstore_spec=\'{"driver":'
      '"zarr"}\'] [os_error_code=\'28\']')
  assert checkpoints.root_cause(RuntimeError('save\n failed')) == 'save failed'
  assert checkpoints.root_cause(error) == (
      "[Errno 28] No space left on device: '/full/run/checkpoints/44.orbax-checkpoint-tmp/state/'")




def test_restore_variables_reads_only_the_step_params_and_statistics(tmp_path, state):
  """What evaluation and prediction read: the chosen step's params and BN statistics into a
  template of shapes (no optimizer state, no optax), equal to what was saved."""
  directory = tmp_path / 'checkpoints'
  save(directory, state, [1, 2])
  shapes = jax.eval_shape(lambda: {'params': state.params, 'batch_stats': state.batch_stats})
  with contextlib.closing(checkpoints.Checkpoints(directory)) as ckpt:
    latest, record = ckpt.restore_variables(shapes)
    first, _ = ckpt.restore_variables(shapes, step=1)
  assert int(latest['step']) == 2 and record == {'history': [2]} and int(first['step']) == 1
  assert sorted(latest) == ['batch_stats', 'params', 'step']
  for restored, step in ((latest, 2), (first, 1)):
    expected = at_step(state, step)
    for a, b in zip(jax.tree.leaves(expected.params), jax.tree.leaves(restored['params'])):
      np.testing.assert_array_equal(a, b)
    for a, b in zip(jax.tree.leaves(state.batch_stats), jax.tree.leaves(restored['batch_stats'])):
      np.testing.assert_array_equal(a, b)
  with contextlib.closing(checkpoints.Checkpoints(tmp_path / 'empty')) as ckpt:
    assert ckpt.restore_variables(shapes) == (None, None)
