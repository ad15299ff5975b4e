"""Every rule a run's config must follow, each defined once, checked before anything heavy.

Without TensorFlow (about 5 s to import), without JAX and without compiling, a bad config fails
in a couple of seconds, not after the dataset is opened and the model compiled. Every problem is
a ConfigError whose message is one line: the field, its value and what is allowed. The library's
entry points (the input pipeline's constructors, train_and_evaluate, evaluate, DenseNet) guard
themselves with the same functions.
"""

import os
from typing import Optional

import ml_collections

from densenet_jax import architectures, datasets, errors, folder_listing, weights

# The DenseNet options that config.model may set besides its architecture fields.
MODEL_OPTIONS = ('dropout_rate', 'dtype', 'implementation', 'memory_efficient')


class ConfigError(errors.UserError, ValueError):
  """A config value that no run can use."""


def _fail(field: str, value, allowed: str):
  raise ConfigError(f'config.{field}={value!r}: {allowed}')


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(config, field: str, minimum: int = 1, prefix: str = ''):
  value = config[field]
  if not _is_int(value) or value < minimum:
    _fail(prefix + field, value, f'must be an integer >= {minimum}')


def _check_positive(config, field: str):
  value = config[field]
  if not _is_number(value) or not value > 0:
    _fail(field, value, 'must be a number > 0')


def _check_bool(config, field: str, prefix: str = ''):
  if not isinstance(config[field], bool):
    _fail(prefix + field, config[field], 'must be True or False')


def check_model(model: ml_collections.ConfigDict):
  """config.model: a network (architectures.FIELDS) and its options (MODEL_OPTIONS)."""
  unknown = sorted(set(model.keys()) - set(architectures.FIELDS) - set(MODEL_OPTIONS))
  if unknown:
    _fail('model', unknown[0], f'unknown field; allowed: '
          f'{", ".join(sorted(architectures.FIELDS + MODEL_OPTIONS))}')
  try:
    architecture = architectures.from_fields(model)
    architectures.validate_hyperparameters(
        block_sizes=architecture.block_sizes, growth_rate=architecture.growth_rate,
        compression=architecture.compression, stem=architecture.stem, stem_features=None,
        dropout_rate=model.dropout_rate, num_classes=1, dtype=model.dtype)
  except (ValueError, TypeError) as e:
    raise ConfigError(f'config.model: {e}') from None
  if model.dtype == 'float64':
    _fail('model.dtype', model.dtype, 'a numerical reference for tests and experiments (needs '
          'jax_enable_x64); training runs take float32 or bfloat16')
  if not isinstance(model.memory_efficient, bool):
    _fail('model.memory_efficient', model.memory_efficient, 'must be True or False')
  if model.implementation not in architectures.IMPLEMENTATIONS:
    _fail('model.implementation', model.implementation,
          f'allowed values are {", ".join(architectures.IMPLEMENTATIONS)}')


def check_dataset_options(dataset: str, *, augment: bool = False, holdout_validation: bool = False,
                          image_size: Optional[int] = None, ten_crop: bool = False,
                          eval_resize: Optional[str] = None):
  """The options that only some datasets take (training or evaluation): their spec says which."""
  if folder_listing.is_folder(dataset):
    spec = datasets.folder_spec(dataset, None)
  elif dataset in datasets.SPECS:
    spec = datasets.SPECS[dataset]
  else:
    _fail('dataset', dataset, f'allowed datasets are {", ".join(datasets.DATASETS)}, or '
          f'{folder_listing.PREFIX}PATH (PATH/train/<class>/*)')
  if augment and not spec.augmentable:
    _fail('augment', augment, f'{dataset} is trained without augmentation, as in the paper: '
          'set augment=False')
  if holdout_validation and spec.holdout is None:
    holding = [s.name for s in datasets.SPECS.values() if s.holdout]
    always = [s.name for s in datasets.SPECS.values() if s.always_holds_out]
    _fail('holdout_validation', holdout_validation,
          f'only for {", ".join(holding)}, not {dataset!r} '
          f'({", ".join(always)} always holds out its validation set)')
  if image_size is not None:
    if not _is_int(image_size) or image_size < 1:
      _fail('image_size', image_size, 'must be an integer >= 1')
    if not spec.resizable:
      resizable = [s.name for s in datasets.SPECS.values() if s.resizable]
      _fail('image_size', image_size, f'only for {", ".join(resizable)} and '
            f'{folder_listing.PREFIX}PATH datasets, not {dataset!r}')
  if ten_crop and not spec.ten_crop:
    ten = [s.name for s in datasets.SPECS.values() if s.ten_crop]
    _fail('ten_crop', ten_crop, f'only for {", ".join(ten)}, not {dataset!r}')
  if eval_resize is not None and eval_resize not in datasets.RESIZE_METHODS:
    _fail('eval_resize', eval_resize,
          f'allowed: {", ".join(datasets.RESIZE_METHODS)} (or None: the weights\' own, else '
          f'{datasets.DEFAULT_EVAL_RESIZE})')


def check_folder(dataset: str, folder: ml_collections.ConfigDict):
  """A 'folder:PATH' dataset: its listing (folder_listing.scan) and config.folder's fields."""
  for field, allowed in (('augmentation', datasets.FOLDER_AUGMENTATIONS),
                         ('eval_transform', datasets.FOLDER_EVAL_TRANSFORMS),
                         ('normalization', datasets.FOLDER_NORMALIZATIONS)):
    if folder[field] not in allowed:
      _fail(f'folder.{field}', folder[field], f'allowed: {", ".join(allowed)}')
  _check_bool(folder, 'flip', prefix='folder.')
  _check_bool(folder, 'class_weights', prefix='folder.')
  _check_int(folder, 'translate_pixels', minimum=0, prefix='folder.')
  _check_int(folder, 'max_side', minimum=0, prefix='folder.')
  _check_int(folder, 'holdout_seed', minimum=0, prefix='folder.')
  _check_int(folder, 'shuffle_buffer', prefix='folder.')
  if not _is_number(folder.center_crop_ratio) or not 0 < folder.center_crop_ratio <= 1:
    _fail('folder.center_crop_ratio', folder.center_crop_ratio, 'must be in (0, 1]')
  if not _is_number(folder.holdout_fraction) or not 0 <= folder.holdout_fraction < 1:
    _fail('folder.holdout_fraction', folder.holdout_fraction, 'must be in [0, 1)')
  try:
    listing = folder_listing.scan(folder_listing.folder_path(dataset))
  except folder_listing.FolderError as e:
    raise ConfigError(f'config.dataset={dataset!r}: {e}') from None
  if not {'validation', 'test'} & set(listing.files) and not folder.holdout_fraction:
    _fail('folder.holdout_fraction', folder.holdout_fraction,
          f'{listing.root} has no val/ or test/ folder: hold out a fraction > 0 to evaluate on')


def check_batch_size(field: str, value, device_count: int):
  """A batch that every device gets an equal share of."""
  if not _is_int(value) or value < 1:
    _fail(field, value, 'must be an integer >= 1')
  if value % device_count:
    _fail(field, value, f'must be a multiple of the device count ({device_count})')


def check_init_from(init_from: str, model_name: str):
  """A path that exists, or published weights ('torchvision:densenet121') of the model built."""
  if not init_from:
    return
  if weights.is_published_name(init_from):
    if init_from not in weights.PUBLISHED:
      _fail('init_from', init_from, f'published weights are {", ".join(weights.PUBLISHED)}')
    if weights.PUBLISHED[init_from].model != model_name:
      _fail('init_from', init_from, f'weights of {weights.PUBLISHED[init_from].model}, but '
            f'config.model builds {model_name}')
  elif not os.path.exists(init_from):
    _fail('init_from', init_from, 'no such file or directory (or published weights: '
          f'{", ".join(weights.PUBLISHED)})')


def validate(config: ml_collections.ConfigDict, device_count: int, data: bool = True):
  """Raises ConfigError for the first field that no run on `device_count` devices can use.

  data=False skips what needs the dataset itself (a folder's files): --mode=predict on a run
  whose data has moved since."""
  check_model(config.model)
  for field in ('augment', 'holdout_validation', 'cross_replica_bn', 'ten_crop'):
    _check_bool(config, field)
  check_dataset_options(config.dataset, augment=config.augment,
                        holdout_validation=config.holdout_validation,
                        image_size=config.image_size, ten_crop=config.ten_crop,
                        eval_resize=config.eval_resize)
  if data and folder_listing.is_folder(config.dataset):
    check_folder(config.dataset, config.folder)
  for field in ('data_dir', 'init_from'):
    if config.get(field) is not None and not isinstance(config[field], str):
      _fail(field, config[field], 'must be a path (a string)')
  check_init_from(config.init_from, architectures.from_fields(config.model).name)

  for field in ('batch_size', 'eval_batch_size'):
    check_batch_size(field, config[field], device_count)
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
