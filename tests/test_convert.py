"""Weight import from torchvision and Keras: same logits as the source network in eval mode.

Every source network gets random weights AND random BN parameters and statistics (the default
statistics, mean 0 and variance 1, would hide swapped tensors). The torchvision tests skip
without torch and torchvision; the numpy-only mapping tests always run.
"""

import functools
import re
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from densenet_jax import convert, models
import helpers

IMAGE_SIZE = 64  # ImageNet DenseNets at 64x64: blocks at 16, 8, 4 and 2 pixels
NUM_CLASSES = 10
TORCH_SKIP = 'needs torch and torchvision: pip install torch==2.14.1 torchvision==0.29.1'


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, variables, images):
  return model.apply(variables, images)


def assert_same_logits(name, variables, images, expected):
  """Our model's logits equal `expected` within 1e-4 times the logits' scale (max |logit|)."""
  model = models.create_model(name, num_classes=expected.shape[-1])
  got = np.asarray(_logits(model, variables, images))
  difference, scale = np.abs(got - expected).max(), np.abs(expected).max()
  print(f'{name}: max |logit difference| {difference:.3g}, logit scale {scale:.3g}')
  assert scale > 0.1
  assert difference <= 1e-4 * scale


def random_images(rng, batch=2):
  return rng.normal(size=(batch, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)


def random_norm(rng, channels):
  """(gamma, beta, mean, variance) of a BN layer, all away from the identity defaults."""
  return (rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.2, channels),
          rng.normal(0, 0.5, channels), rng.uniform(0.5, 2.0, channels))


def assert_trees_equal(got, expected):
  got_leaves, got_tree = jax.tree.flatten(got)
  expected_leaves, expected_tree = jax.tree.flatten(expected)
  assert got_tree == expected_tree
  for a, b in zip(got_leaves, expected_leaves):
    assert a.dtype == np.float32 and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# Mapping with numpy alone: our random variables -> torchvision state_dict -> from_torchvision.

@pytest.mark.parametrize('name,legacy', [('densenet121', False), ('densenet121', True),
                                         ('densenet161', True)])
def test_from_torchvision_recovers_variables_from_numpy_state_dict(name, legacy):
  variables = helpers.random_variables(name, np.random.default_rng(0))
  state_dict = helpers.torchvision_state_dict(variables, legacy)
  assert any('.norm.1.' in key for key in state_dict) == legacy
  assert convert.torchvision_model_name(state_dict) == name
  assert_trees_equal(convert.from_torchvision(state_dict), variables)


@pytest.mark.parametrize('name', ['densenet121', 'densenet161'])
def test_to_torchvision_inverts_from_torchvision(name):
  """to_torchvision (the export's mapping) gives the state_dict of the tests' own, separately
  written mapping (helpers.torchvision_state_dict), and from_torchvision reads it back."""
  variables = helpers.random_variables(name, np.random.default_rng(0))
  state_dict = convert.to_torchvision(variables)
  expected = helpers.torchvision_state_dict(variables)
  assert state_dict.keys() == expected.keys()
  for key, value in state_dict.items():
    if key.endswith('num_batches_tracked'):
      assert value.dtype == np.int64 and value.shape == ()
    else:
      assert value.dtype == np.float32 and value.flags.c_contiguous
      np.testing.assert_array_equal(value, expected[key], err_msg=key)
  assert_trees_equal(convert.from_torchvision(state_dict), variables)


def test_from_torchvision_rejects_foreign_state_dicts():
  state_dict = helpers.torchvision_state_dict(
      helpers.random_variables('densenet121', np.random.default_rng(0)))
  with pytest.raises(ValueError, match='does not use.*features.extra.weight'):
    convert.from_torchvision({**state_dict, 'features.extra.weight': np.zeros(3)})
  missing = {k: v for k, v in state_dict.items() if k != 'features.norm5.running_var'}
  with pytest.raises(ValueError, match="lacks 'features.norm5.running_var'"):
    convert.from_torchvision(missing)
  shorter = {k: v for k, v in state_dict.items() if 'denseblock4.denselayer16.' not in k}
  with pytest.raises(ValueError, match=r'block sizes \(6, 12, 24, 15\).*none of the named'):
    convert.torchvision_model_name(shorter)
  narrow = dict(state_dict)  # bottleneck 2k wide instead of 4k (torchvision's bn_size=2)
  narrow['features.denseblock1.denselayer1.conv1.weight'] = np.zeros((64, 64, 1, 1), np.float32)
  with pytest.raises(ValueError, match='do not fit densenet121.*block1.*bottleneck'):
    convert.from_torchvision(narrow)
  with pytest.raises(ValueError, match='not a torchvision DenseNet'):
    convert.from_torchvision({'fc.weight': np.zeros((2, 2))})
  with pytest.raises(ValueError, match='state_dict of type int'):
    convert.from_torchvision(42)


def test_load_pretrained_errors(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="extension '.npz'; allowed: .pth"):
    convert.load_pretrained(tmp_path / 'weights.npz')
  monkeypatch.setitem(sys.modules, 'torch', None)  # as if torch were not installed
  with pytest.raises(ImportError, match='needs PyTorch.*pip install torch'):
    convert.load_pretrained(tmp_path / 'densenet121.pth')


# ---------------------------------------------------------------------------------------------
# Keras

def test_keras_epsilon_folded_into_variance():
  """With variance 1e-6, epsilon 1e-5 vs 1.001e-5 changes BN outputs by ~4.5e-4 (relative)."""
  keras = pytest.importorskip('keras')
  rng = np.random.default_rng(0)
  channels = 8
  gamma, beta, mean, _ = random_norm(rng, channels)
  weights = [w.astype(np.float32) for w in (gamma, beta, mean, np.full(channels, 1e-6))]
  gamma, beta, mean, variance = [w.astype(np.float64) for w in weights]  # exactly Keras's values
  layer = keras.layers.BatchNormalization(epsilon=1.001e-5)
  layer.build((None, channels))
  layer.set_weights(weights)
  x = (mean + rng.normal(0, 3e-3, (64, channels))).astype(np.float32)

  expected = np.asarray(layer(x, training=False))
  formula = gamma * (x - mean) / np.sqrt(variance + 1.001e-5) + beta  # float64
  scale = np.abs(formula).max()
  # Keras's float32 x * inv + (beta - mean * inv) cancels digits: up to ~1e-5 * scale off.
  keras_error = np.abs(expected - formula).max()
  assert keras_error <= 2e-5 * scale

  params, stats = convert.keras_batch_norm(layer)
  norm = nn.BatchNorm(use_running_average=True, epsilon=models.BN_EPSILON)
  ours = np.asarray(norm.apply({'params': params, 'batch_stats': stats}, x))
  unfolded = np.asarray(norm.apply(
      {'params': params, 'batch_stats': {'mean': stats['mean'], 'var': weights[3]}}, x))
  error, skipped = np.abs(ours - formula).max(), np.abs(unfolded - formula).max()
  print(f'BN var=1e-6, output scale {scale:.3g}: max |difference| from the formula: '
        f'folded {error:.3g}, without the fold {skipped:.3g}, Keras itself {keras_error:.3g}')
  assert error <= 1e-6 * scale
  assert skipped >= 2e-4 * scale


@pytest.fixture(scope='module')
def keras_densenet121():
  keras = pytest.importorskip('keras')
  keras.utils.set_random_seed(0)
  model = keras.applications.DenseNet121(
      weights=None, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), classes=NUM_CLASSES,
      classifier_activation=None)
  rng = np.random.default_rng(1)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      layer.set_weights([w.astype(np.float32) for w in random_norm(rng, layer.gamma.shape[0])])
  bias = model.get_layer('predictions').bias
  bias.assign(rng.normal(0, 0.5, bias.shape).astype(np.float32))
  return model


def test_from_keras_gives_keras_logits(keras_densenet121):
  model = keras_densenet121
  images = random_images(np.random.default_rng(2))
  expected = np.asarray(model(images, training=False))
  assert convert.keras_model_name(model) == 'densenet121'
  assert_same_logits('densenet121', convert.from_keras(model), images, expected)


@pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')  # Keras's save
def test_load_pretrained_reads_saved_keras_model(keras_densenet121, tmp_path):
  path = tmp_path / 'densenet121.keras'
  keras_densenet121.save(path)
  name, variables = convert.load_pretrained(path)
  assert name == 'densenet121'
  assert_trees_equal(variables, convert.from_keras(keras_densenet121))


def test_to_keras_inverts_from_keras(keras_densenet121):
  """Our variables written into a new Keras DenseNet-121 (the export's keras.weights.h5) give
  back the original model's weights: all bitwise, but the BN variances, whose epsilon fold is
  undone in float64 and rounded twice to float32 (at most 1 ulp each way)."""
  keras = pytest.importorskip('keras')
  original = keras_densenet121
  fresh = keras.applications.DenseNet121(
      weights=None, input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3), classes=NUM_CLASSES,
      classifier_activation=None)
  convert.to_keras(convert.from_keras(original), fresh)
  for ours, theirs in zip(fresh.layers, original.layers):
    for got, expected, variable in zip(ours.get_weights(), theirs.get_weights(), theirs.weights):
      if 'moving_variance' in variable.path:
        np.testing.assert_array_max_ulp(got, expected, maxulp=2)
      else:
        np.testing.assert_array_equal(got, expected, err_msg=variable.path)
  with pytest.raises(ValueError, match=r'block sizes \(6, 12, 24, 16\), the variables'):
    convert.to_keras(helpers.random_variables('densenet169', np.random.default_rng(0)), fresh)


def test_from_keras_rejects_other_models():
  keras = pytest.importorskip('keras')
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
  with pytest.raises(ValueError, match='is not a keras.applications DenseNet'):
    convert.from_keras(model)


# ---------------------------------------------------------------------------------------------
# torchvision (skipped without torch and torchvision)

def torchvision_densenet(name):
  """A torchvision DenseNet in eval mode with random weights and random BN parameters/stats."""
  if 'tensorflow' in sys.modules:
    # torchvision imports triton (via torch._dynamo), which segfaults once TensorFlow is loaded
    # (both bring LLVM). Eval on CPU does not use triton: hide it.
    sys.modules.setdefault('triton', None)
  try:
    import torch  # pylint: disable=import-outside-toplevel
    import torchvision  # pylint: disable=import-outside-toplevel
  except ImportError:
    pytest.skip(TORCH_SKIP)
  torch.manual_seed(0)
  model = getattr(torchvision.models, name)(weights=None, num_classes=NUM_CLASSES)
  rng = np.random.default_rng(3)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        for tensor, value in zip(
            (module.weight, module.bias, module.running_mean, module.running_var),
            random_norm(rng, module.num_features)):
          tensor.copy_(torch.from_numpy(value))
    model.classifier.bias.normal_(0, 0.5)
  return model.eval(), torch


@pytest.mark.parametrize('name', ['densenet121', 'densenet161'])
def test_from_torchvision_gives_torchvision_logits(name):
  model, torch = torchvision_densenet(name)
  images = random_images(np.random.default_rng(4))
  with torch.no_grad():
    expected = model(torch.from_numpy(images.transpose(0, 3, 1, 2))).numpy()
  state_dict = model.state_dict()
  assert any(key.endswith('num_batches_tracked') for key in state_dict)
  assert convert.torchvision_model_name(state_dict) == name
  assert_same_logits(name, convert.from_torchvision(state_dict), images, expected)


def test_features_equal_torchvision_intermediate_activations():
  """`features` at the points feature_info names equal torchvision's activations there (forward
  hooks on features.denseblockN and features.norm5), within ten times torchvision's own float32
  error (against itself in float64)."""
  model, torch = torchvision_densenet('densenet121')
  images = random_images(np.random.default_rng(5))
  activations = {}
  ours = models.create_model('densenet121', num_classes=NUM_CLASSES)
  for info in ours.feature_info:
    module = model.get_submodule(info.torchvision_module)
    module.register_forward_hook(
        lambda _, __, output, name=info.torchvision_module: activations.update(  # a copy:
            {name: output.numpy().transpose(0, 2, 3, 1).copy()}))  # relu(inplace) follows norm5
  variables = convert.from_torchvision(model.state_dict())
  with torch.no_grad():  # torchvision in float64: the reference; in float32: its own error
    model.double()(torch.from_numpy(images.transpose(0, 3, 1, 2)).double())
    reference = dict(activations)
    model.float()(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  features = jax.jit(functools.partial(ours.apply, method='features'))(variables, images)
  assert len(features) == len(activations) == 4
  for info, got in zip(ours.feature_info, features):
    expected = reference[info.torchvision_module]
    assert got.shape == expected.shape == (2, IMAGE_SIZE // info.stride,
                                           IMAGE_SIZE // info.stride, info.channels)
    error = np.abs(np.asarray(got) - expected).max()
    noise = np.abs(activations[info.torchvision_module] - expected).max()
    print(f'{info.name}: max |ours - torchvision float64| {error:.3g}, torchvision float32 '
          f'{noise:.3g}')
    assert 0 < noise and error <= 10 * noise


def test_from_torchvision_reads_legacy_names_and_pth_files(tmp_path):
  model, torch = torchvision_densenet('densenet121')
  state_dict = model.state_dict()
  legacy = {re.sub(r'\.(norm|conv)([12])\.(weight|bias|running_mean|running_var)$',
                   r'.\1.\2.\3', key): value for key, value in state_dict.items()}
  assert 'features.denseblock1.denselayer1.norm.1.weight' in legacy
  expected = convert.from_torchvision(state_dict)
  assert_trees_equal(convert.from_torchvision(legacy), expected)
  path = tmp_path / 'densenet121-legacy.pth'
  torch.save(legacy, path)
  name, variables = convert.load_pretrained(path)
  assert name == 'densenet121'
  assert_trees_equal(variables, expected)
