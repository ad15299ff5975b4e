"""config_loading.py: configs as main.py and the sweep read them, and one line for a command
line that cannot be read. JAX- and TensorFlow-free."""

import pytest
from absl import flags

from densenet_jax import config_loading


def test_load_applies_overrides_with_their_types():
  config = config_loading.load('configs/cifar.py:densenet40_k12,c10+',
                               [('model.growth_rate', '24'), ('lr_decay_epochs', '(1, 2)')])
  assert config.model.growth_rate == 24 and tuple(config.lr_decay_epochs) == (1, 2)
  assert config.dataset == 'cifar10'
  with pytest.raises(Exception):  # the config's fields are locked: no new keys
    config_loading.load('configs/digits.py', [('model.growth', '3')])


def flag_error(argv) -> str:
  values = flags.FlagValues()
  config_loading.define_config_flag(values, sys_argv=argv)
  try:
    values(argv)
    values.config.keys()
  except Exception as e:  # pylint: disable=broad-except
    return config_loading.flag_error(e, argv, values)
  raise AssertionError(f'{argv} parsed')


def test_flag_errors_are_one_line_naming_the_bad_argument():
  assert flag_error(['main.py', '--config=configs/digits.py', '--config.model.growht_rate=3']
                    ).startswith('--config.model.growht_rate=3: ')
  missing = flag_error(['main.py', '--config=configs/nothing.py'])
  assert missing.startswith('--config=configs/nothing.py: ') and '\n' not in missing
  typed = flag_error(['main.py', '--config=configs/digits.py', '--config.num_epochs=many'])
  assert typed.startswith('--config.num_epochs=many: expected int') and '\n' not in typed


def test_default_workdir_names_the_config_and_its_argument():
  values = flags.FlagValues()
  argv = ['main.py', '--config=configs/cifar.py:densenet40_k12,c10+']
  config_loading.define_config_flag(values, sys_argv=argv)
  values(argv)
  name = config_loading.default_workdir(values)
  assert name.startswith('runs/cifar-densenet40_k12-c10+_') and len(name) == len(
      'runs/cifar-densenet40_k12-c10+_') + len('20261203-061500')
