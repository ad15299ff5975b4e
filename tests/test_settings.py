"""settings.py: a config read once into typed values; published weights bring their eval
resize unless the config sets one."""

import json

import pytest

from configs import cifar, imagenet_densenet121
from densenet_jax import datasets, settings


def test_settings_hold_the_config_values():
  config = cifar.get_config('densenet_bc100_k12,c10+')
  run = settings.RunSettings.from_config(config)
  assert run.model.architecture.name == 'densenet_bc100_k12'
  assert dict(run.model.fields)['growth_rate'] == 12 and run.model.cross_replica_bn
  assert run.optimizer == settings.OptimizerSettings(0.1, (150, 225), 0.1, 0.9, 1e-4)
  assert run.data == datasets.DataOptions('cifar10', holdout_validation=False, augment=True,
                                          eval_resize='bicubic', seed=config.seed)
  assert (run.batch_size, run.num_epochs, run.init_from) == (64, 300, '')
  assert run.config == json.loads(config.to_json_best_effort())


@pytest.mark.parametrize('init_from,set_to,expected', [
    ('', None, 'bicubic'),  # the paper's (Torch's image.scale)
    ('torchvision:densenet121', None, 'bilinear'),  # the publisher's own
    ('keras:densenet121', None, 'bilinear'),
    ('torchvision:densenet121', 'bicubic', 'bicubic'),  # the user's choice wins
])
def test_published_weights_bring_their_eval_resize(init_from, set_to, expected):
  config = imagenet_densenet121.get_config()
  config.init_from, config.eval_resize = init_from, set_to
  assert settings.RunSettings.from_config(config).data.eval_resize == expected
