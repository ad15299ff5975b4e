"""The training loop in this process (train.py), on 8 devices: a run stopped mid-epoch and
started again ends bitwise equal to one that never stopped, with the same evals (augmented
CIFAR: the device's random crops and flips; ImageNet: the host's random-sized crop and the
device's jitter, lighting and flip), and what the loop builds once and reads at every eval.

A stop here is the loop's own stop request answered at a chosen step, as a signal would be
(preemption.py); main.py stopped by real signals and kill -9: test_main.py."""

import os

import numpy as np
import pytest

from densenet_jax import config_loading, input_pipeline, preemption, train
from experiments import tiny_tfds
import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def without_speed(record: dict) -> list:
  """The history of a record without images/s, which depends on the machine's load."""
  return [{**h, 'train': {k: v for k, v in h['train'].items() if k != 'images_per_sec'}}
          for h in record['history']]


def stop_at(monkeypatch, step: int):
  """The loop's stop request answers yes after `step`, as after a SIGTERM during it."""
  monkeypatch.setattr(preemption.StopRequest, 'requested', lambda self, s: s >= step)


def assert_stopped_mid_epoch_resumes_exactly(tmp_path, monkeypatch, config, stop_step: int,
                                             steps_per_epoch: int) -> dict:
  """Runs `config` stopped after `stop_step` (mid-epoch) and resumed, and once uninterrupted;
  both end bitwise equal with the same evals and train summaries (each of one step: the config
  logs every step). Returns the uninterrupted run's results."""
  assert stop_step % steps_per_epoch, 'an epoch end: the test wants a mid-epoch resume'
  with monkeypatch.context() as patch:
    stop_at(patch, stop_step)
    with pytest.raises(train.Interrupted, match=f'stopped by SIGTERM after step {stop_step},'):
      train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert helpers.complete_steps(tmp_path / 'run')[-1] == stop_step
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  results = train.train_and_evaluate(config, str(tmp_path / 'reference'))
  _, state, record = helpers.last_checkpoint(str(tmp_path / 'run'))
  _, ref_state, ref_record = helpers.last_checkpoint(str(tmp_path / 'reference'))
  helpers.assert_bitwise_equal(state, ref_state)
  assert without_speed(record) == without_speed(ref_record)
  return results


def count_eval_passes(monkeypatch) -> tuple:
  """([split of each eval iterable built], [one entry per pass over one])."""
  built, passes = [], []
  create = input_pipeline.Data.eval_iterator

  class Counted:
    def __init__(self, batches):
      self.batches = batches

    def __iter__(self):
      passes.append(1)
      return iter(self.batches)

  def counted(self, split, topology):
    batches, num_steps = create(self, split, topology)
    built.append(split)
    return Counted(batches), num_steps

  monkeypatch.setattr(input_pipeline.Data, 'eval_iterator', counted)
  return built, passes


@pytest.mark.slow
def test_augmented_cifar_resumes_exactly_and_builds_eval_batches_once(tmp_path, monkeypatch):
  """C10+ (12 steps of 8 images an epoch, 2 epochs). The loop builds the test split's eval
  iterable before training and re-reads it at each eval (an SVHN hold-out's cache then serves
  every pass after the first)."""
  root = tmp_path / 'tfds'
  tiny_tfds.store('cifar10', root, {'train': (np.arange(96), np.arange(96) % 10),
                                    'test': (np.arange(1000, 1030), np.arange(30) % 10)})
  config = config_loading.load(
      os.path.join(ROOT, 'configs/cifar.py') + ':densenet40_k12,c10+,quick',
      [('model.growth_rate', 4), ('batch_size', 8), ('eval_batch_size', 16), ('log_every_steps', 1),
       ('num_epochs', 2), ('lr_decay_epochs', '(1.5,)'), ('data_dir', root)])
  built, passes = count_eval_passes(monkeypatch)
  results = assert_stopped_mid_epoch_resumes_exactly(tmp_path, monkeypatch, config, stop_step=7,
                                                     steps_per_epoch=12)
  # Three runs (stopped, resumed, uninterrupted), each building the iterable once; the
  # uninterrupted one read it at both of its evals.
  assert built == ['test'] * 3 and len(results['history']) == 2 and len(passes) == 2 + 2
  assert results['architecture']['name'] == 'densenet7_k4' and results['paper'] is None


@pytest.mark.slow
def test_augmented_imagenet_resumes_exactly(tmp_path, monkeypatch):
  """A tiny DenseNet at 224x224 (3 steps of 8 images an epoch, 2 epochs)."""
  root = tmp_path / 'tfds'
  tiny_tfds.build_imagenet(root, root / 'manual', mirrored=True)  # 24 train, 6 validation
  config = config_loading.load(
      os.path.join(ROOT, 'configs/imagenet_densenet121.py'),
      [('model.block_sizes', '(1,1)'), ('model.growth_rate', 4), ('batch_size', 8),
       ('eval_batch_size', 8), ('log_every_steps', 1), ('num_epochs', 2), ('lr_decay_epochs', '(1,)'),
       ('data_dir', root)])
  assert_stopped_mid_epoch_resumes_exactly(tmp_path, monkeypatch, config, stop_step=4,
                                           steps_per_epoch=3)
