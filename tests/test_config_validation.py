"""Bad input fails fast, before TensorFlow is imported or anything compiled, in one line that
names the field, the value and what is allowed; a missing dataset says how to prepare it.

The messages are checked in this process, found as main.py finds them; main.py itself (exit
status, one line, nothing imported that reads data or trains) for one bad field and one bad
override."""

import os
import subprocess
import sys

import ml_collections
import pytest
from absl import flags

from configs import cifar, digits, imagenet_densenet121
from densenet_jax import architectures, config_loading, config_validation, errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = '--config=configs/digits.py'
# main.py run by a wrapper that, as the process exits, adds one line naming which of these
# modules were imported by then: the order of events, not a time.
LATE_MODULES = ('tensorflow', 'densenet_jax.input_pipeline', 'densenet_jax.train')
WRAPPER = ("import atexit, runpy, sys\n"
           f"late = {LATE_MODULES!r}\n"
           "atexit.register(lambda: sys.stderr.write('imported: %s\\n' % "
           "' '.join(m for m in late if m in sys.modules)))\n"
           "sys.argv = ['main.py', *sys.argv[1:]]\n"
           "runpy.run_path('main.py', run_name='__main__')\n")


def main_error(args) -> str:
  """What main.py prints for a bad command line, found as main.py finds it: the flags parsed
  (config_loading), then the config checked on 8 devices (config_validation)."""
  argv = ['main.py', *args]
  values = flags.FlagValues()
  config_loading.define_config_flag(values, sys_argv=argv)
  try:
    values(argv)
    values.config.keys()  # a config file that failed to load raises only when first used
  except Exception as e:  # pylint: disable=broad-except  (what main.py's flag parsing catches)
    return config_loading.flag_error(e, argv, values)
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.validate(values.config, device_count=8)
  return str(error.value)


BAD_COMMAND_LINES = [
    ([DIGITS, '--config.model.stem=resnet'],
     "config.model: stem='resnet': allowed stems are cifar, imagenet"),
    ([DIGITS, '--config.model.dtype=float64'],
     "config.model.dtype='float64': a numerical reference for tests and experiments (needs "
     'jax_enable_x64); training runs take float32 or bfloat16'),
    ([DIGITS, '--config.augment=True', '--config.dataset=svhn_cropped'],
     'config.augment=True: svhn_cropped is trained without augmentation, as in the paper: set '
     'augment=False'),
    ([DIGITS, '--config.dataset=cifar10'],
     "config.image_size=16: only for digits and folder:PATH datasets, not 'cifar10'"),
    ([DIGITS, '--config.holdout_validation=True'],
     'config.holdout_validation=True: only for cifar10, cifar100, svhn_cropped, not '
     "'digits' (svhn_cropped always holds out its validation set)"),
    ([DIGITS, '--config.ten_crop=True'], "config.ten_crop=True: only for imagenet2012, not "
                                         "'digits'"),
    (['--config=configs/imagenet_densenet121.py', '--config.eval_resize=nearest'],
     "config.eval_resize='nearest': allowed: bicubic, bilinear"),
    ([DIGITS, '--config.dataset=mnist'],
     "config.dataset='mnist': allowed datasets are digits, cifar10, cifar100, svhn_cropped, "
     'imagenet2012'),
    ([DIGITS, '--config.model.depth=41'],
     'config.model: depth=41 is not a CIFAR/SVHN DenseNet with bottleneck (-B/-BC): allowed '
     'depths are L >= 10 with (L - 4) divisible by 6'),
    ([DIGITS, '--config.model.growth_rate=0'],
     'config.model: growth_rate=0: the growth rate k must be an integer >= 1'),
    ([DIGITS, '--config.model.compression=1.5'],
     'config.model: compression=1.5: theta must be in (0, 1]'),
    ([DIGITS, '--config.model.compression=0'],
     'config.model: compression=0.0: theta must be in (0, 1]'),
    ([DIGITS, '--config.num_epochs=0'], 'config.num_epochs=0: must be an integer >= 1'),
    ([DIGITS, '--config.batch_size=-64'], 'config.batch_size=-64: must be an integer >= 1'),
    ([DIGITS, '--config.learning_rate=0'], 'config.learning_rate=0.0: must be a number > 0'),
    ([DIGITS, '--config.batch_size=60'],
     'config.batch_size=60: must be a multiple of the device count (8)'),
    ([DIGITS, '--config.lr_decay_epochs=(15,40)'],
     'config.lr_decay_epochs=(15, 40): must be increasing epochs within the run, each in '
     '(0, num_epochs=30)'),
    ([DIGITS, '--config.model.grwth_rate=12'],
     "--config.model.grwth_rate=12: config.model has no field 'grwth_rate'; its fields are "
     'bottleneck, compression, depth, dropout_rate, dtype, growth_rate, implementation, '
     'memory_efficient, stem'),
    ([DIGITS, '--config.nope=1'], "--config.nope=1: config has no field 'nope'; its fields are "),
    ([DIGITS, '--config.batch_size=abc'],
     "--config.batch_size=abc: expected int (flag --config.batch_size=abc: invalid literal for "
     "int() with base 10: 'abc')"),
    ([DIGITS, '--config.model.depth=10.5'], '--config.model.depth=10.5: expected int'),
    ([DIGITS, '--config.augment=maybe'], '--config.augment=maybe: expected bool'),
    (['--config=configs/cifar.py:densenet42,c10'],
     "--config=configs/cifar.py:densenet42,c10: ValueError: model 'densenet42' is not in Table "
     '2; choose from densenet40_k12, '),
    (['--config=configs/nope.py'],
     "--config=configs/nope.py: [Errno 2] No such file or directory: 'configs/nope.py'"),
]


@pytest.mark.parametrize('args,message', BAD_COMMAND_LINES)
def test_bad_input_is_one_line_naming_the_field_and_what_is_allowed(args, message):
  assert main_error(args).startswith(message)


@pytest.mark.parametrize('args', [BAD_COMMAND_LINES[0][0], BAD_COMMAND_LINES[17][0]],
                         ids=['config', 'flag'])
def test_main_py_exits_2_with_that_line_before_importing_tensorflow(args):
  """The process boundary, for a bad config field and a bad override: exit status 2, only the
  error line, and neither TensorFlow nor the input pipeline or training loop imported."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='8')
  proc = subprocess.run([sys.executable, '-c', WRAPPER, *args, '--workdir=/nonexistent/never'],
                        cwd=ROOT, env=env, text=True, capture_output=True, timeout=120)
  *lines, imported = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr
  assert lines == [f'main.py: error: {main_error(args)}'], proc.stderr
  assert imported == 'imported:', proc.stderr


@pytest.mark.parametrize('name,hint', [
    ('cifar10', 'On a machine with internet access run: python -m densenet_jax.input_pipeline '
                'cifar10 --data_dir {data_dir}'),
    ('imagenet2012', 'ILSVRC2012_img_train.tar'),
])
def test_missing_dataset_says_how_to_prepare_it(tmp_path, name, hint):
  """In one line (main.py prints a UserError's line: test_main.py)."""
  from densenet_jax import train  # pylint: disable=import-outside-toplevel
  config = (cifar.get_config('densenet40_k12,c10+,quick') if name == 'cifar10'
            else imagenet_densenet121.get_config())
  config.data_dir, config.batch_size, config.eval_batch_size = str(tmp_path), 8, 8
  with pytest.raises(errors.UserError) as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert str(error.value).startswith(f'{name} is not prepared in {tmp_path}. ')
  assert hint.format(data_dir=tmp_path) in str(error.value)
  assert '\n' not in str(error.value)


def test_every_paper_config_is_valid():
  for model_name in architectures.TABLE2:
    for dataset in architectures.TABLE2_COLUMNS:
      config_validation.validate(cifar.get_config(f'{model_name},{dataset}'), device_count=4)
  config_validation.validate(digits.get_config(), device_count=8)


@pytest.mark.parametrize('field,value,message', [
    ('momentum', 1.0, 'config.momentum=1.0: must be in [0, 1)'),
    ('weight_decay', -1e-4, 'config.weight_decay=-0.0001: must be a number >= 0'),
    ('lr_decay_factor', 0.0, 'config.lr_decay_factor=0.0: must be a number > 0'),
    ('lr_decay_epochs', (22.5, 15), 'config.lr_decay_epochs=(22.5, 15): must be increasing'),
    ('eval_every_epochs', 0.0, 'config.eval_every_epochs=0.0: must be a number > 0'),
    ('eval_batch_size', 100, 'config.eval_batch_size=100: must be a multiple of the device '
                             'count (8)'),
    ('log_every_steps', 0, 'config.log_every_steps=0: must be an integer >= 1'),
    ('keep_checkpoints', 0, 'config.keep_checkpoints=0: must be an integer >= 1'),
    ('eval_checkpoint', 'first', "config.eval_checkpoint='first': allowed: 'best' or 'latest'"),
    ('augment', 1, 'config.augment=1: must be True or False'),
    ('batch_size', 64.0, 'config.batch_size=64.0: must be an integer >= 1'),
    ('init_from', '/nonexistent.pth', "config.init_from='/nonexistent.pth': no such file"),
    ('model.implementation', 'buffer',
     "config.model.implementation='buffer': allowed values are shared, concat"),
])
def test_each_field_is_checked(field, value, message):
  config = ml_collections.ConfigDict(digits.get_config().to_dict(), type_safe=False)
  group, _, name = field.rpartition('.')
  (config[group] if group else config)[name] = value
  with pytest.raises(config_validation.ConfigError) as error:
    config_validation.validate(config, device_count=8)
  assert str(error.value).startswith(message)


def test_unknown_field_names_the_group_and_its_fields():
  config = digits.get_config()
  assert config_validation.unknown_field(config, 'model.growth_rate') is None
  assert config_validation.unknown_field(config, 'model.k') == (
      "config.model has no field 'k'; its fields are bottleneck, compression, depth, "
      'dropout_rate, dtype, growth_rate, implementation, memory_efficient, stem')
  assert config_validation.unknown_field(config, 'seed.x') == (
      'config.seed is a value, not a group of fields')
