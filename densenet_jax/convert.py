"""Pretrained ImageNet DenseNets from torchvision and Keras as this project's variables.

torchvision's densenet121/161/169/201 and keras.applications' DenseNet121/169/201 are the networks
`models.create_model('densenet121')` etc. build (docs/reference.md), so converting is renaming
and re-laying-out: torch convs OIHW -> HWIO, torch linear (out, in) -> (in, out); Keras already
uses our layouts. Keras BN has epsilon 1.001e-5, ours 1e-5: the difference is added to the moving
variance, so BN computes exactly Keras's rsqrt(var + 1.001e-5).

The converted classifier outputs logits, as our models do, even for a Keras model built with its
default softmax head (the softmax is an activation, not a weight). Returned variables are
{'params': ..., 'batch_stats': ...} trees of float32 numpy arrays for
`create_model(name, num_classes=variables['params']['classifier']['bias'].shape[0])`.
Neither torch, torchvision nor Keras is imported unless a file of theirs is read.
"""

import os
import re

import jax
import numpy as np

from densenet_jax import architectures, costs, models

# torchvision's old .pth files name BN/conv tensors `denselayerN.norm.1.weight`; torchvision itself
# renames them to `denselayerN.norm1.weight` with this pattern before loading.
_LEGACY_KEY = re.compile(
    r'^(.*denselayer\d+\.(?:norm|relu|conv))\.([12]\.(?:weight|bias|running_mean|running_var))$')
# The keras.applications class of each named network Keras has.
KERAS_APPLICATIONS = {'densenet121': 'DenseNet121', 'densenet169': 'DenseNet169',
                      'densenet201': 'DenseNet201'}
_TORCH_LAYER = re.compile(r'features\.denseblock(\d+)\.denselayer(\d+)\.conv1\.weight')
_KERAS_LAYER = re.compile(r'conv(\d+)_block(\d+)_1_conv')


def _modules(block_sizes):
  """(kind, our module path, torchvision prefix, Keras layer) for every weighted layer."""
  yield 'conv', ('stem_conv',), 'features.conv0', 'conv1_conv'
  yield 'norm', ('stem_norm',), 'features.norm0', 'conv1_bn'
  for b, num_layers in enumerate(block_sizes, 1):
    for i in range(1, num_layers + 1):
      ours = (f'block{b}', f'layer{i}')
      tv = f'features.denseblock{b}.denselayer{i}.'
      ks = f'conv{b + 1}_block{i}_'
      yield 'norm', ours + ('bottleneck', 'norm'), tv + 'norm1', ks + '0_bn'
      yield 'conv', ours + ('bottleneck', 'conv'), tv + 'conv1', ks + '1_conv'
      yield 'norm', ours + ('composite', 'norm'), tv + 'norm2', ks + '1_bn'
      yield 'conv', ours + ('composite', 'conv'), tv + 'conv2', ks + '2_conv'
    if b < len(block_sizes):
      ours = (f'transition{b}', 'composite')
      tv = f'features.transition{b}.'
      yield 'norm', ours + ('norm',), tv + 'norm', f'pool{b + 1}_bn'
      yield 'conv', ours + ('conv',), tv + 'conv', f'pool{b + 1}_conv'
  yield 'norm', ('head_norm',), 'features.norm5', 'bn'
  yield 'dense', ('classifier',), 'classifier', 'predictions'


def _assemble(name, block_sizes, read):
  """Variables from read(kind, torchvision prefix, Keras layer) -> (params, batch_stats or None)."""
  variables = {'params': {}, 'batch_stats': {}}
  for kind, path, torch_prefix, keras_layer in _modules(block_sizes):
    for collection, leaves in zip(('params', 'batch_stats'), read(kind, torch_prefix, keras_layer)):
      if leaves is not None:
        node = variables[collection]
        for key in path:
          node = node.setdefault(key, {})
        node.update(leaves)
  _check_shapes(name, variables)
  return variables


def _check_shapes(name, variables):
  num_classes = variables['params']['classifier']['bias'].shape[0]
  model = models.create_model(name, num_classes=num_classes)
  size = architectures.NATIVE_IMAGE_SIZE[architectures.NAMED[name].stem]
  expected = _shapes(costs.init_shapes(model, size))
  got = _shapes(variables)
  wrong = sorted(set(got.items()) ^ set(expected.items()))
  if wrong:
    path = wrong[0][0]
    raise ValueError(f'converted weights do not fit {name} with {num_classes} classes: {path} '
                     f'has shape {got.get(path)}, the model expects {expected.get(path)}')


def _shapes(tree) -> dict:
  return {jax.tree_util.keystr(path): tuple(leaf.shape)
          for path, leaf in jax.tree.leaves_with_path(tree)}


def _float32(value) -> np.ndarray:
  return np.asarray(value, np.float32)


def _named_model(source, block_sizes, growth_rate, stem_features) -> str:
  """The named ImageNet model with these block sizes, growth rate and stem width."""
  for name, architecture in architectures.NAMED.items():
    if (architecture.stem == 'imagenet' and architecture.block_sizes == block_sizes
        and architecture.growth_rate == growth_rate
        and models.create_model(name).num_stem_features == stem_features):
      return name
  raise ValueError(
      f'{source} DenseNet with block sizes {block_sizes}, growth rate {growth_rate} and stem width '
      f'{stem_features} is none of the named ImageNet models (densenet121/161/169/201/264)')


# ---------------------------------------------------------------------------------------------
# torchvision

def _torchvision_tensors(state_dict) -> dict:
  """A torchvision state_dict (mapping or .pth path) as {current key name: float32 ndarray}.

  Legacy key names are renamed and `num_batches_tracked` counters dropped.
  """
  if isinstance(state_dict, (str, os.PathLike)):
    state_dict = _torch_load(state_dict)
  if not hasattr(state_dict, 'items'):
    raise ValueError(f'state_dict of type {type(state_dict).__name__}: expected a mapping of '
                     'names to tensors/arrays or the path of a .pth file')
  tensors = {}
  for key, value in state_dict.items():
    if key.endswith('num_batches_tracked'):
      continue
    legacy = _LEGACY_KEY.match(key)
    if legacy:
      key = legacy[1] + legacy[2]
    if hasattr(value, 'detach'):  # a torch tensor; bfloat16 has no numpy dtype, hence .float()
      value = value.detach().cpu().float().numpy()
    tensors[key] = _float32(value)
  return tensors


def _torch_load(path):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f'reading {os.fspath(path)!r} needs PyTorch (torchvision is not needed): '
                      'pip install torch, e.g. CPU-only: pip install torch '
                      '--index-url https://download.pytorch.org/whl/cpu') from e
  return torch.load(path, map_location='cpu', weights_only=True)


def _torchvision_architecture(tensors: dict) -> tuple:
  num_layers = {}
  for key in tensors:
    match = _TORCH_LAYER.fullmatch(key)
    if match:
      num_layers[int(match[1])] = max(num_layers.get(int(match[1]), 0), int(match[2]))
  required = ('features.conv0.weight', 'features.denseblock1.denselayer1.conv2.weight')
  if not num_layers or not all(key in tensors for key in required):
    raise ValueError('not a torchvision DenseNet state_dict: no key '
                     f'{required[0]!r} or features.denseblockB.denselayerL.convN.weight')
  block_sizes = tuple(num_layers[b] for b in sorted(num_layers))
  growth_rate = tensors[required[1]].shape[0]
  stem_features = tensors[required[0]].shape[0]
  return block_sizes, growth_rate, stem_features


def torchvision_model_name(state_dict) -> str:
  """Which named model ('densenet121', ...) a torchvision state_dict (or .pth path) is."""
  tensors = _torchvision_tensors(state_dict)
  return _named_model('torchvision', *_torchvision_architecture(tensors))


def from_torchvision(state_dict) -> dict:
  """Variables for `torchvision_model_name(state_dict)` from a torchvision DenseNet state_dict.

  state_dict: a mapping of names to torch tensors or numpy arrays (legacy names allowed), or the
  path of a .pth file (needs torch, not torchvision).
  """
  tensors = _torchvision_tensors(state_dict)
  architecture = _torchvision_architecture(tensors)
  name = _named_model('torchvision', *architecture)

  def take(key):
    if key not in tensors:
      raise ValueError(f'torchvision state_dict of {name} lacks {key!r}')
    return tensors.pop(key)

  def read(kind, prefix, _):
    if kind == 'conv':
      return {'kernel': take(prefix + '.weight').transpose(2, 3, 1, 0)}, None
    if kind == 'dense':
      return {'kernel': take(prefix + '.weight').T, 'bias': take(prefix + '.bias')}, None
    return ({'scale': take(prefix + '.weight'), 'bias': take(prefix + '.bias')},
            {'mean': take(prefix + '.running_mean'), 'var': take(prefix + '.running_var')})

  variables = _assemble(name, architecture[0], read)
  if tensors:
    raise ValueError(f'torchvision state_dict has keys that {name} does not use: '
                     f'{", ".join(sorted(tensors)[:5])}')
  return variables


# ---------------------------------------------------------------------------------------------
# Keras

def _keras_architecture(model) -> tuple:
  layers = {layer.name: layer for layer in model.layers}
  num_layers = {}
  for layer_name in layers:
    match = _KERAS_LAYER.fullmatch(layer_name)
    if match:
      num_layers[int(match[1])] = max(num_layers.get(int(match[1]), 0), int(match[2]))
  if not num_layers or not {'conv1_conv', 'conv2_block1_2_conv'} <= set(layers):
    raise ValueError(f'Keras model {model.name!r} is not a keras.applications DenseNet '
                     '(no layers conv1_conv, convS_blockL_1_conv)')
  if 'predictions' not in layers:
    raise ValueError(f'Keras model {model.name!r} has no classifier layer "predictions": '
                     'build it with include_top=True')
  block_sizes = tuple(num_layers[s] for s in sorted(num_layers))
  growth_rate = layers['conv2_block1_2_conv'].kernel.shape[-1]
  stem_features = layers['conv1_conv'].kernel.shape[-1]
  return block_sizes, growth_rate, stem_features


def keras_model_name(model) -> str:
  """Which named model ('densenet121', ...) a keras.applications DenseNet is."""
  return _named_model('Keras', *_keras_architecture(model))


def keras_batch_norm(layer) -> tuple:
  """(params, batch_stats) of a Keras BatchNormalization layer for our BN (epsilon 1e-5).

  Keras's epsilon minus ours is added to the moving variance (in float64, then rounded), so
  our rsqrt(var' + 1e-5) equals Keras's rsqrt(var + epsilon).
  """
  variance = np.asarray(layer.moving_variance, np.float64) + (layer.epsilon - models.BN_EPSILON)
  return ({'scale': _float32(layer.gamma), 'bias': _float32(layer.beta)},
          {'mean': _float32(layer.moving_mean), 'var': variance.astype(np.float32)})


def from_keras(model) -> dict:
  """Variables for `keras_model_name(model)` from keras.applications.DenseNet121/169/201.

  The model must include its top (classifier); a softmax head is dropped: ours outputs logits.
  """
  architecture = _keras_architecture(model)
  name = _named_model('Keras', *architecture)
  layers = {layer.name: layer for layer in model.layers}

  def read(kind, _, layer_name):
    layer = layers[layer_name]
    if kind == 'norm':
      return keras_batch_norm(layer)
    leaves = {'kernel': _float32(layer.kernel)}
    if kind == 'dense':
      leaves['bias'] = _float32(layer.bias)
    return leaves, None

  return _assemble(name, architecture[0], read)


# ---------------------------------------------------------------------------------------------
# The other way: our variables in the publishers' layouts (--mode=export)

def _node(tree: dict, path: tuple) -> dict:
  for key in path:
    tree = tree[key]
  return tree


def block_sizes_of(variables: dict) -> tuple:
  """The block sizes of a DenseNet's variables (the number of layers under each blockN)."""
  params = variables['params']
  blocks = sorted((k for k in params if k.startswith('block')), key=lambda k: int(k[5:]))
  return tuple(len(params[k]) for k in blocks)


def torchvision_compatible(model: models.DenseNet) -> bool:
  """Whether torchvision's DenseNet class builds this network: ImageNet stem, 4k bottleneck,
  transitions that halve the channels (its num_features // 2)."""
  return model.stem == 'imagenet' and model.bottleneck and model.compression == 0.5


def to_torchvision(variables: dict) -> dict:
  """The state_dict (numpy arrays, torchvision's current key names) that
  torchvision.models.DenseNet with these block sizes, growth rate and stem width loads with
  strict=True; `from_torchvision` inverted."""
  params, stats = variables['params'], variables['batch_stats']
  state_dict = {}
  for kind, path, prefix, _ in _modules(block_sizes_of(variables)):
    p = _node(params, path)
    if kind == 'conv':
      state_dict[f'{prefix}.weight'] = np.asarray(p['kernel']).transpose(3, 2, 0, 1)
    elif kind == 'dense':
      state_dict[f'{prefix}.weight'] = np.asarray(p['kernel']).T
      state_dict[f'{prefix}.bias'] = np.asarray(p['bias'])
    else:
      s = _node(stats, path)
      state_dict.update({f'{prefix}.weight': np.asarray(p['scale']),
                         f'{prefix}.bias': np.asarray(p['bias']),
                         f'{prefix}.running_mean': np.asarray(s['mean']),
                         f'{prefix}.running_var': np.asarray(s['var']),
                         f'{prefix}.num_batches_tracked': np.array(0, np.int64)})
  return {k: np.array(v, np.int64 if v.dtype == np.int64 else np.float32, order='C')
          for k, v in state_dict.items()}


def to_keras(variables: dict, model):
  """Sets the weights of `model`, a keras.applications DenseNet of the same network (e.g.
  DenseNet121(weights=None, classes=C)), to `variables`; `from_keras` inverted. The BN epsilon
  fold is undone: Keras's moving variance is ours minus (Keras's epsilon - ours), so Keras's
  rsqrt(var + 1.001e-5) is our rsqrt(var + 1e-5) (a variance below 1e-8, which no trained BN
  has, would be clipped at 0)."""
  architecture = _keras_architecture(model)
  if architecture[0] != block_sizes_of(variables):
    raise ValueError(f'Keras model {model.name!r} has block sizes {architecture[0]}, the '
                     f'variables {block_sizes_of(variables)}')
  layers = {layer.name: layer for layer in model.layers}
  for kind, path, _, layer_name in _modules(architecture[0]):
    p, layer = _node(variables['params'], path), layers[layer_name]
    if kind == 'norm':
      s = _node(variables['batch_stats'], path)
      variance = np.asarray(s['var'], np.float64) - (layer.epsilon - models.BN_EPSILON)
      weights = [p['scale'], p['bias'], s['mean'], np.maximum(variance, 0)]
    else:
      weights = [p['kernel']] + ([p['bias']] if kind == 'dense' else [])
    layer.set_weights([np.asarray(w, np.float32) for w in weights])


# ---------------------------------------------------------------------------------------------

def load_pretrained(path) -> tuple:
  """(model name, variables) from a torchvision state_dict file or a whole saved Keras model.

  .pth/.pt: torchvision state_dict (torch.load; torchvision not needed). .keras/.h5: a model saved
  with model.save (keras.models.load_model); Keras's weights-only .h5 downloads need
  keras.applications.DenseNet121(weights=path) and from_keras instead.
  """
  extension = os.path.splitext(os.fspath(path))[1].lower()
  if extension in ('.pth', '.pt'):
    tensors = _torchvision_tensors(path)
    return torchvision_model_name(tensors), from_torchvision(tensors)
  if extension in ('.keras', '.h5'):
    import keras  # pylint: disable=import-outside-toplevel
    model = keras.models.load_model(path, compile=False)
    return keras_model_name(model), from_keras(model)
  raise ValueError(f'weights file {os.fspath(path)!r} has extension {extension!r}; allowed: '
                   '.pth, .pt (torchvision state_dict), .keras, .h5 (saved Keras model)')
