"""Faults of a training run: signals, kill -9, NaN losses, failed writes, a read-only workdir
(the checkpoint store's own faults: test_checkpoints.py).

Exact resume is checked end to end through main.py: a run stopped by signals or kill -9 and
restarted ends with the bitwise state of a run that was never stopped.
"""

import concurrent.futures
import errno
import functools
import signal

import jax
import numpy as np
import pytest

from densenet_jax import checkpoints, run_setup
import helpers
from experiments import tiny_tfds

DIGITS = ['--config=configs/digits.py', '--config.model.depth=10', '--config.model.growth_rate=6',
          '--config.model.dropout_rate=0.2', '--config.image_size=8', '--config.batch_size=64',
          '--config.eval_batch_size=120', '--config.log_every_steps=1']
DIGITS_STEPS_PER_EPOCH = 1437 // 64


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
  helpers.fail_writes(monkeypatch, str(tmp_path / 'run'), errno.EROFS)
  with pytest.raises(run_setup.RunError, match=r'^workdir .*/run is not writable: \[Errno 30\] '
                     r"Read-only file system: '.*/run'$"):
    train.train_and_evaluate(config, str(tmp_path / 'run'))  # cifar10 is not prepared there


def test_full_disk_mid_run_stops_and_keeps_the_last_checkpoint(tmp_path, digits_dir,
                                                               monkeypatch):
  from densenet_jax import train
  workdir = tmp_path / 'run'
  helpers.fail_writes(monkeypatch, str(workdir / 'checkpoints' / str(2 * DIGITS_STEPS_PER_EPOCH)),
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
