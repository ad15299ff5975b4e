"""The training loop in this process (train.py): what it builds once and reads at every eval.
(Training end to end through main.py: test_main.py.)"""

import pytest

@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


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
