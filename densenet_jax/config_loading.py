"""Configs from the command line, as main.py and the sweep (experiments/sweep.py) read them:
`--config=configs/FILE.py[:ARG]` and `--config.KEY=VALUE` overrides, and one line saying what is
wrong with a command line that cannot be read.

Neither JAX nor TensorFlow is imported: a bad command line fails in a second.
"""

import datetime
import os
import re
from typing import Sequence

import ml_collections
from absl import flags
from ml_collections import config_flags

from densenet_jax import config_validation


def define_config_flag(flag_values: flags.FlagValues = flags.FLAGS, **kwargs):
  """--config: an experiment config file (configs/*.py[:arg]), its fields locked."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py[:arg]).',
                                  flag_values=flag_values, lock_config=True, **kwargs)


def load(config_file: str, overrides: Sequence[tuple] = ()) -> ml_collections.ConfigDict:
  """The ConfigDict that main.py builds from --config=config_file --config.KEY=VALUE ..."""
  argv = ['main.py', f'--config={config_file}', *(f'--config.{k}={v}' for k, v in overrides)]
  values = flags.FlagValues()
  define_config_flag(values, sys_argv=argv)
  values(argv)
  values.config.keys()  # a config file that failed to load raises only when first used
  return values.config


def _config_arg(argv: Sequence[str]):
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def flag_error(error: Exception, argv: Sequence[str],
               flag_values: flags.FlagValues = flags.FLAGS) -> str:
  """One line for a command line that cannot be parsed."""
  message = str(error).strip()
  if '\n' in message:  # the config file is missing or raised: the last line says why
    return f'--config={_config_arg(argv)}: {message.splitlines()[-1].strip()}'
  if isinstance(error, (KeyError, AttributeError)):  # an override of a field that does not exist
    config = flag_values['config'].parser.parse(_config_arg(argv))
    for arg in argv:
      if arg.startswith('--config.'):
        reason = config_validation.unknown_field(config, arg[len('--config.'):].split('=')[0])
        if reason:
          return f'{arg}: {reason}'
  match = re.match(r'flag (--(config\.[\w.]+)=.*?): ', message)
  if match and match.group(2) in flag_values:  # an override of the wrong type
    return (f'{match.group(1)}: expected {flag_values[match.group(2)].parser.flag_type()} '
            f'({message})')
  return ' '.join(message.split())


def default_workdir(flag_values: flags.FlagValues = flags.FLAGS) -> str:
  """runs/<config file>[-<arg>]_<date-time>: a new directory for a run not given --workdir."""
  path, _, arg = config_flags.get_config_filename(flag_values['config']).partition(':')
  name = '-'.join(filter(None, [os.path.splitext(os.path.basename(path))[0],
                                arg.replace(',', '-')]))
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  return os.path.join('runs', f'{name}_{stamp}')
