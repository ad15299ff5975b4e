"""Where a run's initial weights come from: `config.init_from` dispatched to its source.

- a published name ('torchvision:densenet121', 'keras:densenet169', weights.PUBLISHED):
  downloaded once, converted once and kept as an .npz in weights.cache_dir();
- a directory: a run's workdir or its checkpoints directory (the latest readable step);
- a file: a torchvision state_dict (.pth/.pt) or a saved Keras model (.keras/.h5).

`load_into` puts them into a model's variables, keeping the model's own classifier where the
number of classes differs (fine-tuning). Every failure a user can cause (a missing file, a file
that is no DenseNet, another architecture, torch or Keras not installed, a failed download) is a
WeightsError or weights.DownloadError: one line, naming init_from.
"""

import os

import jax
import numpy as np
from absl import logging
from flax import traverse_util

from densenet_jax import checkpoints, convert, errors, weights


class WeightsError(errors.UserError, ValueError):
  """init_from's weights cannot be read, or do not fit the model."""


def _convert_published(published: weights.Published, path: str) -> dict:
  if published.algorithm == 'sha256':  # torchvision's state_dict
    return convert.from_torchvision(path)
  import keras  # pylint: disable=import-outside-toplevel
  builder = getattr(keras.applications, convert.KERAS_APPLICATIONS[published.model])
  return convert.from_keras(builder(weights=path, classifier_activation=None))


def _converted_path(entry: weights.Published, directory: str) -> str:
  return os.path.join(directory, f'{entry.file_name}.converted.npz')


def fetch(init_from: str):
  """Downloads published weights now, unless cached: a download that fails does so before the
  data is read or anything compiled. Nothing for the other sources."""
  entry = weights.PUBLISHED.get(init_from)
  if entry is not None and not os.path.exists(_converted_path(entry, weights.cache_dir())):
    weights.download(entry, weights.cache_dir())


def published(init_from: str, directory: str = None) -> dict:
  """{'params', 'batch_stats'} of published weights: the cached converted copy, else the
  published file (downloaded if needed) converted and cached."""
  if init_from not in weights.PUBLISHED:
    raise WeightsError(f'init_from={init_from!r}: published weights are '
                       f'{", ".join(weights.PUBLISHED)}')
  entry, directory = weights.PUBLISHED[init_from], directory or weights.cache_dir()
  converted = _converted_path(entry, directory)
  if os.path.exists(converted):
    with np.load(converted) as flat:
      return traverse_util.unflatten_dict({tuple(k.split('/')): flat[k] for k in flat.files})
  variables = _convert_published(entry, weights.download(entry, directory))
  flat = {'/'.join(k): v for k, v in traverse_util.flatten_dict(variables).items()}
  weights.write_atomically(converted, lambda f: np.savez(f, **flat))
  return variables


def _from_run(directory: str, like: dict) -> dict:
  """The latest checkpoint's variables of a run's workdir or of its checkpoints directory."""
  if os.path.isdir(os.path.join(directory, 'checkpoints')):
    directory = os.path.join(directory, 'checkpoints')
  ckpt = checkpoints.Checkpoints(directory)
  try:
    restored, _ = ckpt.restore_variables(like)
  finally:
    ckpt.close()
  if restored is None:
    raise WeightsError(f'init_from={directory!r}: no checkpoint in that directory')
  return {'params': restored['params'], 'batch_stats': restored['batch_stats']}


def read(init_from: str, like: dict) -> dict:
  """{'params', 'batch_stats'} of init_from; `like` (the model's variables or their shapes)
  is the template a checkpoint is read into."""
  try:
    if weights.is_published_name(init_from):
      return published(init_from)
    if os.path.isdir(init_from):
      return _from_run(init_from, like)
    if not os.path.exists(init_from):
      raise WeightsError(f'init_from={init_from!r}: no such file or directory (allowed: '
                         f'{", ".join(weights.PUBLISHED)}, a run directory or a weights file)')
    return convert.load_pretrained(init_from)[1]
  except ImportError as e:
    raise WeightsError(f'init_from={init_from!r} needs {e.name or e} installed '
                       '(pip install torch, or keras, for files of theirs)') from e
  except (ValueError, KeyError, OSError) as e:
    if isinstance(e, errors.UserError):
      raise
    raise WeightsError(f'init_from={init_from!r}: {e}') from e


def load_into(init_from: str, variables: dict) -> dict:
  """`variables` ({'params', 'batch_stats'} of the model) with init_from's weights."""
  return fit(init_from, read(init_from, variables), variables)


def _head_shapes(params: dict):
  head = params.get('classifier')
  return None if head is None else jax.tree.map(np.shape, dict(head))


def takes_loaded_head(loaded: dict, like: dict) -> bool:
  """Whether the model (variables or their shapes `like`) takes `loaded`'s classifier: both
  have one, of the same shape. Else `fit` keeps the model's own (or it has none)."""
  head = _head_shapes(loaded['params'])
  return head is not None and head == _head_shapes(like['params'])


def fit(init_from: str, loaded: dict, variables: dict) -> dict:
  """`loaded` (init_from's weights, `read`) in place of the model's `variables`.

  A classifier of another shape (another number of classes) is not loaded: the model's freshly
  initialized head is kept (fine-tuning). A headless model (num_classes=0) takes everything but
  the classifier. `variables` may be shapes (jax.ShapeDtypeStruct) where `takes_loaded_head`.
  """
  params, batch_stats = dict(loaded['params']), dict(loaded['batch_stats'])
  model_head = variables['params'].get('classifier')
  head = params.pop('classifier', None)
  if takes_loaded_head(loaded, variables):
    params['classifier'] = head
  elif model_head is None:
    logging.info('Headless model: the classifier of %s is not loaded.', init_from)
  else:
    logging.info('%s has %s, the model %d classes: new classifier.', init_from,
                 'no classifier' if head is None else f'a {head["kernel"].shape[-1]}-class one',
                 model_head['kernel'].shape[-1])
    params['classifier'] = model_head
  if jax.tree.structure(params) != jax.tree.structure(dict(variables['params'])):
    raise WeightsError(f'init_from={init_from!r} holds another architecture than the model')
  shapes = jax.tree.map(np.shape, (params, batch_stats))
  if shapes != jax.tree.map(np.shape, (dict(variables['params']),
                                       dict(variables['batch_stats']))):
    raise WeightsError(f'init_from={init_from!r} holds another architecture than the model '
                       '(parameter shapes differ)')
  return {'params': params, 'batch_stats': batch_stats}
