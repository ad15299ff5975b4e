"""Checks a run's config before anything heavy is imported or compiled.

Without TensorFlow (about 5 s to import) and without compiling, a bad config fails in a couple of
seconds, not after the dataset is opened and the model compiled. Every problem is a ConfigError
whose message is one line: the field, its value and what is allowed.
"""

import os
from typing import Optional

import ml_collections

from densenet_jax import dataset_names, models


class ConfigError(ValueError):
  """A config value that no run can use."""


def _fail(field: str, value, allowed: str):
  raise ConfigError(f'config.{field}={value!r}: {allowed}')


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(config, field: str, minimum: int = 1):
  value = config[field]
  if not _is_int(value) or value < minimum:
    _fail(field, value, f'must be an integer >= {minimum}')


def _check_positive(config, field: str):
  value = config[field]
  if not _is_number(value) or not value > 0:
    _fail(field, value, 'must be a number > 0')


def _check_bool(config, field: str):
  if not isinstance(config[field], bool):
    _fail(field, config[field], 'must be True or False')


def validate(config: ml_collections.ConfigDict, device_count: int):
  """Raises ConfigError for the first field that no run on `device_count` devices can use."""
  model_options = {k: v for k, v in config.model.items() if k != 'name'}
  try:
    models.create_model(config.model.name, **model_options)  # a module object: nothing traced
  except (ValueError, TypeError) as e:
    raise ConfigError(f'config.model: {e}') from None

  if config.dataset not in dataset_names.DATASETS:
    _fail('dataset', config.dataset, f'allowed datasets are {", ".join(dataset_names.DATASETS)}')
  for field in ('data_dir', 'init_from'):
    if config.get(field) is not None and not isinstance(config[field], str):
      _fail(field, config[field], 'must be a path (a string)')
  if config.init_from and not os.path.exists(config.init_from):
    _fail('init_from', config.init_from, 'no such file or directory')
  if config.image_size is not None:
    _check_int(config, 'image_size')

  for field in ('batch_size', 'eval_batch_size'):
    _check_int(config, field)
    if config[field] % device_count:
      _fail(field, config[field], f'must be a multiple of the device count ({device_count})')
  _check_int(config, 'num_epochs')
  for field in ('learning_rate', 'lr_decay_factor', 'eval_every_epochs'):
    _check_positive(config, field)
  decays = config.lr_decay_epochs
  if (not isinstance(decays, (tuple, list)) or not all(_is_number(e) for e in decays)
      or not all(0 < e < config.num_epochs for e in decays) or list(decays) != sorted(decays)):
    _fail('lr_decay_epochs', decays, f'must be increasing epochs within the run, each in '
          f'(0, num_epochs={config.num_epochs})')
  if not _is_number(config.momentum) or not 0 <= config.momentum < 1:
    _fail('momentum', config.momentum, 'must be in [0, 1)')
  if not _is_number(config.weight_decay) or config.weight_decay < 0:
    _fail('weight_decay', config.weight_decay, 'must be a number >= 0')
  _check_int(config, 'seed', minimum=0)
  _check_int(config, 'log_every_steps')
  _check_int(config, 'keep_checkpoints')
  for field in ('augment', 'holdout_validation', 'cross_replica_bn', 'ten_crop'):
    _check_bool(config, field)
  if config.eval_checkpoint not in ('best', 'latest'):
    _fail('eval_checkpoint', config.eval_checkpoint, "allowed: 'best' or 'latest'")


def unknown_field(config: ml_collections.ConfigDict, path: str) -> Optional[str]:
  """Why `path` (e.g. 'model.growth_rate') names no field of config, or None if it does."""
  node, parts = config, path.split('.')
  for i, part in enumerate(parts):
    parent = '.'.join(['config', *parts[:i]])
    if not isinstance(node, ml_collections.ConfigDict):
      return f'{parent} is a value, not a group of fields'
    if part not in node:
      return f'{parent} has no field {part!r}; its fields are {", ".join(sorted(node.keys()))}'
    node = node[part]
  return None
