"""Faults: signals, kill -9, unreadable checkpoints, NaN losses and failed writes.

Exact resume is checked end to end through main.py: a run stopped by signals or kill -9 and
restarted ends with the bitwise state of a run that was never stopped.
"""

import concurrent.futures
import contextlib
import errno
import functools
import logging
import os
import shutil
import signal

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from etils import epath

from densenet_jax import checkpoints, models, run_setup, steps
import helpers
from experiments import tiny_tfds

DIGITS = ['--config=configs/digits.py', '--config.model.depth=10', '--config.model.growth_rate=6',
          '--config.model.dropout_rate=0.2', '--config.image_size=8', '--config.batch_size=64',
          '--config.eval_batch_size=120', '--config.log_every_steps=1']
DIGITS_STEPS_PER_EPOCH = 1437 // 64


# ---------------------------------------------------------------------------------------------
# Checkpoints (no training).

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


WRITES = ('mkdir', 'write_text', 'write_bytes', 'rename', 'touch')


def fail_writes(monkeypatch, under: str, code: int, methods=WRITES):
  """Makes the writes (epath methods, which orbax and train.py use) below the path prefix
  `under` raise OSError `code`, as a full or read-only file system does."""
  for method in methods:
    original = getattr(epath.gpath._GPath, method)  # pylint: disable=protected-access

    def failing(self, *args, _original=original, **kwargs):
      if os.fspath(self).startswith(under):
        raise OSError(code, os.strerror(code), os.fspath(self))
      return _original(self, *args, **kwargs)

    monkeypatch.setattr(epath.gpath._GPath, method, failing)  # pylint: disable=protected-access


@pytest.mark.parametrize('code,methods', [(errno.EROFS, WRITES), (errno.ENOSPC, WRITES),
                                          (errno.ENOSPC, ('write_text', 'write_bytes'))])
def test_failed_writes_are_one_line_errors_and_keep_the_last_checkpoint(tmp_path, state,
                                                                         monkeypatch, code,
                                                                         methods):
  directory = tmp_path / 'checkpoints'
  save(directory, state, [1])
  fail_writes(monkeypatch, str(directory / '2'), code, methods)  # directories, or files only
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


# ---------------------------------------------------------------------------------------------
# Training in this process (faults injected with monkeypatch).

@pytest.fixture(scope='module')
def digits_dir(tmp_path_factory):
  from densenet_jax import datasets, input_pipeline
  data_dir = str(tmp_path_factory.mktemp('digits'))
  input_pipeline.Data(datasets.DataOptions('digits', data_dir))  # prepared once, before runs
  # share it
  return data_dir


def digits_config(data_dir, **overrides):
  from configs import digits
  config = digits.get_config()
  config.model.depth, config.model.growth_rate, config.image_size = 10, 6, 8
  config.data_dir, config.eval_batch_size, config.log_every_steps = data_dir, 120, 11
  config.update(overrides)
  return config


def test_read_only_workdir_fails_before_the_data_is_opened(tmp_path, monkeypatch):
  from densenet_jax import train
  config = digits_config(str(tmp_path / 'no_data'), dataset='cifar10', num_epochs=1,
                         lr_decay_epochs=(0.5,), image_size=None)
  fail_writes(monkeypatch, str(tmp_path / 'run'), errno.EROFS)
  with pytest.raises(run_setup.RunError, match=r'^workdir .*/run is not writable: \[Errno 30\] '
                     r"Read-only file system: '.*/run'$"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))  # cifar10 is not prepared there


def test_full_disk_mid_run_stops_and_keeps_the_last_checkpoint(tmp_path, digits_dir,
                                                               monkeypatch):
  from densenet_jax import train
  workdir = tmp_path / 'run'
  fail_writes(monkeypatch, str(workdir / 'checkpoints' / str(2 * DIGITS_STEPS_PER_EPOCH)),
              errno.ENOSPC)
  with pytest.raises(checkpoints.CheckpointError,
                     match=r'^cannot write checkpoints to .*: \[Errno 28\] No space left on '):
    train.train_and_evaluate(digits_config(digits_dir, num_epochs=3, lr_decay_epochs=(2,)),
                             str(workdir))
  assert helpers.complete_steps(workdir) == [DIGITS_STEPS_PER_EPOCH]
  assert not (workdir / 'results.json').exists()


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path,
                                                                             digits_dir):
  from densenet_jax import train
  workdir = tmp_path / 'run'
  # After epoch 1 the learning rate jumps to 1e29: the loss overflows within a few steps.
  config = digits_config(digits_dir, num_epochs=2, lr_decay_epochs=(1,), lr_decay_factor=1e30)
  with pytest.raises(run_setup.RunError, match=r'non-finite loss or gradient at step (\d+)') as e:
    train.train_and_evaluate(config, str(workdir))
  bad_step = int(str(e.value).split('at step ')[1].split()[0])
  assert DIGITS_STEPS_PER_EPOCH < bad_step <= 2 * DIGITS_STEPS_PER_EPOCH
  assert f'the last checkpoint (step {DIGITS_STEPS_PER_EPOCH})' in str(e.value)
  assert helpers.complete_steps(workdir) == [DIGITS_STEPS_PER_EPOCH]
  step, saved, _ = helpers.last_checkpoint(str(workdir))
  assert step == DIGITS_STEPS_PER_EPOCH
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(saved['params']))


# ---------------------------------------------------------------------------------------------
# Exact resume through main.py.

def without_speed(record: dict) -> dict:
  """The history of a record without images/s, which depends on the machine's load."""
  return [{**h, 'train': {k: v for k, v in h['train'].items() if k != 'images_per_sec'}}
          for h in record['history']]


def stopped_step(log: str, name: str) -> int:
  marker = f'stopped by {name} after step '
  assert marker in log, log[-3000:]
  return int(log.split(marker)[1].split(',')[0])


def test_signals_and_kill_9_resume_exactly_on_digits(tmp_path, digits_dir):
  args = [*DIGITS, f'--config.data_dir={digits_dir}', '--config.num_epochs=3',
          '--config.lr_decay_epochs=(1.5,2.5)']
  run = functools.partial(helpers.start, num_devices=2)
  workdir, reference = f'--workdir={tmp_path / "run"}', f'--workdir={tmp_path / "reference"}'
  uninterrupted = concurrent.futures.ThreadPoolExecutor(1).submit(
      helpers.finish, run([*args, reference]))

  status, log = helpers.finish(run([*args, workdir]), signal_at=5, signum=signal.SIGTERM)
  assert status == 128 + signal.SIGTERM, log[-3000:]
  first = stopped_step(log, 'SIGTERM')
  assert 'run the same command again to resume' in log
  assert helpers.complete_steps(tmp_path / 'run')[-1] == first

  # kill -9 after the second eval: no chance to save; the last complete checkpoint is used.
  status, log = helpers.finish(run([*args, workdir]), signal_at=2 * DIGITS_STEPS_PER_EPOCH + 3,
                                 signum=signal.SIGKILL)
  assert status == -signal.SIGKILL and f'Resumed from step {first} ' in log
  last_complete = helpers.complete_steps(tmp_path / 'run')[-1]
  assert last_complete in (first, DIGITS_STEPS_PER_EPOCH, 2 * DIGITS_STEPS_PER_EPOCH)

  status, log = helpers.finish(run([*args, workdir]))
  assert status == 0 and f'Resumed from step {last_complete} ' in log, log[-3000:]
  status, log = uninterrupted.result()
  assert status == 0, log[-3000:]
  step, state, record = helpers.last_checkpoint(str(tmp_path / 'run'))
  ref_step, ref_state, ref_record = helpers.last_checkpoint(str(tmp_path / 'reference'))
  assert step == ref_step == 3 * DIGITS_STEPS_PER_EPOCH
  helpers.assert_bitwise_equal(state, ref_state)
  assert without_speed(record) == without_speed(ref_record)  # each eval once, same metrics
  assert [h['step'] for h in record['history']] == [22, 44, 66]


@pytest.fixture(scope='module')
def cifar_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds')
  tiny_tfds.store('cifar10', root, {'train': (np.arange(96), np.arange(96) % 10),
                                        'test': (np.arange(1000, 1030), np.arange(30) % 10)})
  return str(root)


def assert_stopped_mid_epoch_resumes_exactly(tmp_path, args, signum, signal_at,
                                             steps_per_epoch):
  """A run of main.py stopped by `signum` mid-epoch and resumed ends bitwise equal to an
  uninterrupted one (2 devices each), with the same eval history."""
  reference = concurrent.futures.ThreadPoolExecutor(1).submit(
      helpers.finish, helpers.start([*args, f'--workdir={tmp_path / "reference"}'], 2))
  status, log = helpers.finish(helpers.start([*args, f'--workdir={tmp_path / "run"}'], 2),
                                 signal_at=signal_at, signum=signum)
  assert status == 128 + signum, log[-3000:]
  stopped = stopped_step(log, signum.name)
  assert stopped % steps_per_epoch, 'stopped at an epoch end: the test wants a mid-epoch resume'
  status, log = helpers.finish(helpers.start([*args, f'--workdir={tmp_path / "run"}'], 2))
  assert status == 0 and f'Resumed from step {stopped} ' in log, log[-3000:]
  status, log = reference.result()
  assert status == 0, log[-3000:]
  _, state, record = helpers.last_checkpoint(str(tmp_path / 'run'))
  _, ref_state, ref_record = helpers.last_checkpoint(str(tmp_path / 'reference'))
  helpers.assert_bitwise_equal(state, ref_state)
  assert without_speed(record) == without_speed(ref_record)


def test_augmented_cifar_resumes_exactly_after_sigint(tmp_path, cifar_dir):
  """C10+: the device's random crops and flips replay exactly after a resume mid-epoch."""
  args = ['--config=configs/cifar.py:densenet40_k12,c10+,quick', '--config.model.growth_rate=4',
          '--config.batch_size=8', '--config.eval_batch_size=10', '--config.log_every_steps=1',
          '--config.num_epochs=2', '--config.lr_decay_epochs=(1.5,)',
          f'--config.data_dir={cifar_dir}']
  assert_stopped_mid_epoch_resumes_exactly(tmp_path, args, signal.SIGINT, signal_at=7,
                                           steps_per_epoch=12)


@pytest.fixture(scope='module')
def imagenet_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds')
  tiny_tfds.build_imagenet(root, root / 'manual')  # 12 train, 6 validation JPEGs
  return str(root)


def test_augmented_imagenet_resumes_exactly_after_sigterm(tmp_path, imagenet_dir):
  """ImageNet's host crop and the device's jitter, lighting and flip replay exactly after a
  resume mid-epoch (a tiny DenseNet at 224x224: 3 steps of 4 images an epoch)."""
  args = ['--config=configs/imagenet_densenet121.py', '--config.model.block_sizes=(1,1)',
          '--config.model.growth_rate=4', '--config.batch_size=4', '--config.eval_batch_size=6',
          '--config.log_every_steps=1', '--config.num_epochs=2', '--config.lr_decay_epochs=(1,)',
          f'--config.data_dir={imagenet_dir}']
  assert_stopped_mid_epoch_resumes_exactly(tmp_path, args, signal.SIGTERM, signal_at=4,
                                           steps_per_epoch=3)
