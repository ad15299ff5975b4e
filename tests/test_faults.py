"""Faults of a training run in this process: NaN losses, a full disk, a read-only workdir (the
checkpoint store's own faults: test_checkpoints.py; signals and kill -9 through main.py, with
exact resume: test_main.py)."""

import errno

import jax
import numpy as np
import pytest

from densenet_jax import checkpoints, run_setup
import helpers

DIGITS_STEPS_PER_EPOCH = helpers.DIGITS_STEPS_PER_EPOCH


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


