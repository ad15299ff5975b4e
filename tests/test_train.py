"""End to end through main.py: train on the real bundled digits, checkpoint, resume, evaluate."""

import json
import os

import pytest

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config=configs/digits.py', '--config.model.depth=10', '--config.model.growth_rate=6',
        '--config.image_size=8', '--config.batch_size=64', '--config.log_every_steps=10',
        '--config.lr_decay_epochs=(0.5, 0.75)']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.mark.parametrize('num_devices', [1, 8])
def test_train_checkpoint_resume_and_evaluate(tmp_path, data_dir, num_devices):
  workdir = str(tmp_path / 'run')
  log = helpers.run_main([*TINY, f'--workdir={workdir}', '--config.num_epochs=1'], num_devices, data_dir)
  assert f'{num_devices} devices' in log
  results = json.load(open(os.path.join(workdir, 'results.json')))
  steps_per_epoch = 1437 // 64
  assert results['final']['step'] == steps_per_epoch
  assert results['final']['eval']['test']['count'] == 360
  assert results['num_params'] > 0 and results['config']['model']['depth'] == 10
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == [str(steps_per_epoch)]
  assert os.listdir(os.path.join(workdir, 'tensorboard'))

  # Started again with a longer schedule, the run continues from its checkpoint.
  log = helpers.run_main([*TINY, f'--workdir={workdir}', '--config.num_epochs=2'], num_devices, data_dir)
  assert f'Resumed from step {steps_per_epoch}' in log
  results = json.load(open(os.path.join(workdir, 'results.json')))
  assert results['final']['step'] == 2 * steps_per_epoch
  assert [h['step'] for h in [results['best'], results['final']]][1] == 2 * steps_per_epoch
  error = results['final']['eval']['test']['top1_error']
  assert error < 0.9  # two epochs of a tiny DenseNet already beat chance (0.9)

  log = helpers.run_main([*TINY, f'--workdir={workdir}', '--mode=evaluate',
                  '--config.eval_checkpoint=latest'], num_devices, data_dir)
  assert f'test (360 images, step {2 * steps_per_epoch}): top1_error {100 * error:.2f}%' in log


def test_eval_batches_are_built_once_and_read_at_every_eval(tmp_path, data_dir, monkeypatch):
  """The loop builds each split's eval iterable before training and re-reads it at each eval
  (an SVHN hold-out's cache then serves every pass after the first)."""
  from configs import digits
  from densenet_jax import input_pipeline, train
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
  config = digits.get_config()
  config.model.depth, config.model.growth_rate, config.image_size = 10, 4, 8
  config.data_dir, config.num_epochs, config.lr_decay_epochs = data_dir, 3, (1, 2)
  results = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert built == ['test']
  assert len(passes) == len(results['history']) == 3
  assert results['architecture']['name'] == 'densenet_bc10_k4' and results['paper'] is None
