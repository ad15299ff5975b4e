"""The DenseNet modules: exact parameter counts, multiply-adds, structure, init and modes."""

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from densenet_jax import architectures, costs, models
import helpers

# Trainable parameters, 10 classes (CIFAR) / 1000 classes (ImageNet): the paper's counts (exact
# ones: torchvision's and the authors' code's, docs/reference.md).
PAPER_PARAMS = {
    'densenet40_k12': 1_019_722,
    'densenet100_k12': 6_979_642,
    'densenet100_k24': 27_249_082,
    'densenet_bc100_k12': 769_162,
    'densenet_bc250_k24': 15_324_406,
    'densenet_bc190_k40': 25_624_430,
    'densenet121': 7_978_856,
    'densenet169': 14_149_480,
    'densenet201': 20_013_928,
    'densenet161': 28_681_000,
    'densenet264': 33_337_704,
}
TORCHVISION_GMACS = {'densenet121': 2.834, 'densenet169': 3.360, 'densenet201': 4.291,
                     'densenet161': 7.728}


def tiny(**overrides):
  spec = dict(block_sizes=(2, 2, 2), growth_rate=4, num_classes=5)
  spec.update(overrides)
  return models.DenseNet(**spec)


def apply(model, variables, x, **kwargs):
  """model.apply(variables, x, **kwargs), jitted (rngs: traced; other keywords: fixed)."""
  rngs = kwargs.pop('rngs', None)
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, x, rngs=rngs)


def test_the_table_names_all_eleven():
  assert sorted(architectures.NAMED) == sorted(PAPER_PARAMS)


@pytest.mark.parametrize('name', list(PAPER_PARAMS))
def test_parameter_count_equals_paper(name):
  size = architectures.NATIVE_IMAGE_SIZE[architectures.NAMED[name].stem]
  model = models.create_model(name, num_classes=1000 if size == 224 else 10)
  shapes = costs.init_shapes(model, size)
  assert costs.count_params(shapes) == PAPER_PARAMS[name]


@pytest.mark.parametrize('name', list(TORCHVISION_GMACS))
def test_multiply_adds_match_torchvision(name):
  gmacs = costs.count_multiply_adds(models.create_model(name, num_classes=1000), 224) / 1e9
  assert gmacs == pytest.approx(TORCHVISION_GMACS[name], rel=0.01)


def test_multiply_adds_equal_a_hand_count():
  model = tiny(stem='imagenet', block_sizes=(1, 2), bottleneck=True, compression=0.5)
  # Stem 7x7/2 to 16x16, block 1 at 8x8, transition 1x1, block 2 at 4x4, classifier.
  k, stem = 4, 8
  hand = 16 * 16 * stem * 3 * 49
  channels = stem
  for layers, size in ((1, 8), (2, 4)):
    for _ in range(layers):
      hand += size * size * (4 * k * channels + k * 4 * k * 9)
      channels += k
    if size == 8:
      hand += 8 * 8 * (channels // 2) * channels
      channels //= 2
  hand += channels * 5
  assert costs.count_multiply_adds(model, 32) == hand


@pytest.mark.parametrize('bottleneck,depth,match', [
    (False, 41, r'depth=41.*\(L - 4\) divisible by 3'),
    (True, 44, r'depth=44.*\(L - 4\) divisible by 6'),
    (False, 4, r'depth=4\b'),
])
def test_impossible_depth_is_a_clear_error(bottleneck, depth, match):
  with pytest.raises(ValueError, match=match):
    models.create_model('densenet40_k12', depth=depth, bottleneck=bottleneck)


@pytest.mark.parametrize('overrides,match', [
    (dict(growth_rate=0), r'growth_rate=0.*>= 1'),
    (dict(growth_rate=2.5), r'growth_rate=2.5'),
    (dict(compression=0.0), r'compression=0.0.*\(0, 1\]'),
    (dict(compression=1.5), r'compression=1.5.*\(0, 1\]'),
    (dict(dropout_rate=1.0), r'dropout_rate=1.0'),
    (dict(dtype='float16'), r"dtype='float16'.*float32, bfloat16"),
    (dict(stem='resnet'), r"stem='resnet'.*cifar, imagenet"),
    (dict(num_classes=-1), r'num_classes=-1.*or 0 for a headless model'),
    (dict(width=3), r'unknown option\(s\) width.*allowed:.*growth_rate'),
])
def test_bad_hyperparameters_are_clear_errors(overrides, match):
  with pytest.raises(ValueError, match=match):
    models.create_model('densenet_bc100_k12', **overrides)


def test_unknown_model_lists_the_available_ones():
  with pytest.raises(ValueError, match=r"'densenet42' is unknown; available models: densenet40_k12"):
    models.create_model('densenet42')


def test_depth_override_sets_block_sizes():
  model = models.create_model('densenet40_k12', depth=100, growth_rate=24)
  assert model.block_sizes == (32, 32, 32) and model.growth_rate == 24
  assert models.create_model('densenet_bc100_k12').block_sizes == (16, 16, 16)


def test_channel_bookkeeping_of_blocks_and_transitions():
  model = tiny(block_sizes=(3, 2, 2), growth_rate=5, bottleneck=True, compression=0.5)
  params = costs.init_shapes(model, 32)['params']
  assert model.num_stem_features == 10  # 2k for -BC
  assert params['stem_conv']['kernel'].shape == (3, 3, 3, 10)
  # Layer l of block 1 sees 10 + 5 (l - 1) channels and its bottleneck makes 4k = 20.
  for l in range(1, 4):
    assert params['block1'][f'layer{l}']['bottleneck']['conv']['kernel'].shape == (
        1, 1, 10 + 5 * (l - 1), 20)
    assert params['block1'][f'layer{l}']['composite']['conv']['kernel'].shape == (3, 3, 20, 5)
  # Transition 1: m = 10 + 3 * 5 = 25 -> floor(0.5 * 25) = 12.
  assert params['transition1']['composite']['conv']['kernel'].shape == (1, 1, 25, 12)
  # Block 2 starts at 12, block 3 at floor(0.5 * (12 + 10)) = 11, head sees 11 + 10 = 21.
  assert params['transition2']['composite']['conv']['kernel'].shape == (1, 1, 22, 11)
  assert params['head_norm']['scale'].shape == (21,)
  assert params['classifier']['kernel'].shape == (21, 5)
  assert 'bias' not in params['stem_conv']


def test_basic_cifar_network_has_16_channel_stem_and_no_bottleneck():
  model = models.create_model('densenet40_k12')
  params = costs.init_shapes(model, 32)['params']
  assert params['stem_conv']['kernel'].shape == (3, 3, 3, 16)
  assert set(params['block1']['layer1']) == {'composite'}
  assert params['transition1']['composite']['conv']['kernel'].shape == (1, 1, 160, 160)


def test_output_shapes_and_spatial_sizes_of_both_stems():
  cifar = tiny()
  v = helpers.init(cifar, jax.random.key(0), jnp.zeros((2, 32, 32, 3)))
  logits, inter = apply(cifar, v, jnp.zeros((2, 32, 32, 3)), capture_intermediates=True)
  assert logits.shape == (2, 5) and logits.dtype == jnp.float32
  sizes = [inter['intermediates'][f'transition{i}']['__call__'][0].shape[1] for i in (1, 2)]
  assert sizes == [16, 8]

  imagenet = tiny(stem='imagenet', block_sizes=(1, 1, 1, 1), bottleneck=True, compression=0.5)
  x = jnp.zeros((1, 224, 224, 3))
  v = helpers.init(imagenet, jax.random.key(0), x)
  _, inter = apply(imagenet, v, x, capture_intermediates=True)
  # Torch-style paddings: 224 -> 112 (7x7/2, pad 3) -> 56 (max pool 3x3/2, pad 1) -> 28, 14, 7.
  assert inter['intermediates']['stem_conv']['__call__'][0].shape[1:3] == (112, 112)
  sizes = [inter['intermediates'][f'transition{i}']['__call__'][0].shape[1] for i in (1, 2, 3)]
  assert sizes == [28, 14, 7]


@pytest.mark.parametrize('stem,size,block_sizes', [('cifar', 16, (2, 1, 2)),
                                                   ('imagenet', 64, (1, 2, 1, 1))])
def test_features_are_as_feature_info_says_and_feed_the_head(stem, size, block_sizes):
  """Each stage has feature_info's channels and stride; the last is the head's BN output, so
  the headless model outputs mean(relu(last stage)) and the logits are that times the
  classifier. Tolerance: 8 float32 ulps of the values' scale (sums of the same products in
  another order)."""
  model = tiny(stem=stem, block_sizes=block_sizes, bottleneck=True, compression=0.5)
  x = jax.random.normal(jax.random.key(1), (2, size, size, 3))
  variables = helpers.init(model, jax.random.key(0), x)
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda v: v + rng.uniform(0.1, 0.5, v.shape).astype(v.dtype),
                           variables)  # BN away from the identity, a classifier that is not 0
  features = apply(model, variables, x, method='features')
  info = model.feature_info
  assert [i.name for i in info][-1] == 'head_norm' and len(info) == len(block_sizes)
  assert [f.shape for f in features] == [(2, size // i.stride, size // i.stride, i.channels)
                                         for i in info]
  assert [i.stride for i in info] == ([4, 8, 16, 32] if stem == 'imagenet' else [1, 2, 4])
  assert model.num_features == info[-1].channels

  headless = model.clone(num_classes=0)
  shapes = costs.init_shapes(headless, size)
  assert 'classifier' not in shapes['params']
  params = {k: v for k, v in variables['params'].items() if k != 'classifier'}
  assert jax.tree.map(np.shape, shapes['params']) == jax.tree.map(np.shape, params)
  pooled = np.asarray(apply(headless, {**variables, 'params': params}, x))
  expected = np.asarray(jnp.maximum(features[-1], 0).mean(axis=(1, 2)))
  assert pooled.shape == (2, model.num_features)
  ulp = np.finfo(np.float32).eps * np.abs(expected).max()
  np.testing.assert_allclose(pooled, expected, rtol=0, atol=8 * ulp)
  classifier = variables['params']['classifier']
  logits = np.asarray(apply(model, variables, x))
  by_hand = pooled @ np.asarray(classifier['kernel']) + np.asarray(classifier['bias'])
  np.testing.assert_allclose(logits, by_hand, rtol=0,
                             atol=8 * np.finfo(np.float32).eps * np.abs(by_hand).max())


def test_stem_uses_symmetric_torch_padding_not_same():
  model = tiny(stem='imagenet', block_sizes=(1,), bottleneck=True)
  x = jax.random.normal(jax.random.key(1), (1, 16, 16, 3))
  v = helpers.init(model, jax.random.key(0), x)
  _, inter = apply(model, v, x, capture_intermediates=True)
  kernel = v['params']['stem_conv']['kernel']
  expected = jax.lax.conv_general_dilated(x, kernel, (2, 2), ((3, 3), (3, 3)),
                                          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(inter['intermediates']['stem_conv']['__call__'][0], expected,
                             rtol=1e-5, atol=1e-5)


def test_initialization_follows_the_original_code():
  model = tiny(block_sizes=(1,), growth_rate=64, stem_features=64)
  v = helpers.init(model, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  kernel = np.asarray(v['params']['block1']['layer1']['composite']['conv']['kernel'])
  # He fan-out: std = sqrt(2 / (3 * 3 * 64)), untruncated (values beyond 2 std exist).
  std = math.sqrt(2 / (9 * 64))
  assert kernel.std() == pytest.approx(std, rel=0.05)
  assert np.abs(kernel).max() > 2.5 * std
  norm = v['params']['head_norm']
  np.testing.assert_array_equal(norm['scale'], 1.0)
  np.testing.assert_array_equal(norm['bias'], 0.0)
  np.testing.assert_array_equal(v['params']['classifier']['bias'], 0.0)
  stats = v['batch_stats']['head_norm']
  np.testing.assert_array_equal(stats['mean'], 0.0)
  np.testing.assert_array_equal(stats['var'], 1.0)


def test_train_flag_switches_batchnorm_statistics_and_dropout():
  model = tiny(dropout_rate=0.2)
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 3)) * 3 + 1
  v = helpers.init(model, jax.random.key(1), x)
  out1, upd = apply(model, v, x, train=True, mutable=['batch_stats'],
                    rngs={'dropout': jax.random.key(2)})
  out2, _ = apply(model, v, x, train=True, mutable=['batch_stats'],
                  rngs={'dropout': jax.random.key(3)})
  assert not np.allclose(out1, out2)  # dropout is on in training
  new_mean = upd['batch_stats']['block1']['layer1']['composite']['norm']['mean']
  assert not np.allclose(new_mean, 0.0)  # training updates the running statistics
  np.testing.assert_array_equal(apply(model, v, x), apply(model, v, x))  # eval: deterministic
  eval1 = apply(model, v, x)
  eval2 = apply(model, v, x[:1])
  np.testing.assert_allclose(eval1[:1], eval2, rtol=1e-5, atol=1e-6)  # running stats: per-example


def test_batchnorm_momentum_and_epsilon_are_torchs():
  model = tiny(block_sizes=(1,), stem_features=3)
  x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) * 2 + 0.5
  v = helpers.init(model, jax.random.key(1), x)
  _, inter = apply(model, v, x, capture_intermediates=True, mutable=['intermediates'])
  stem = inter['intermediates']['stem_conv']['__call__'][0]
  _, upd = apply(model, v, x, train=True, mutable=['batch_stats'])
  stats = upd['batch_stats']['block1']['layer1']['composite']['norm']
  np.testing.assert_allclose(stats['mean'], 0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
  # Torch stores the unbiased batch variance; Flax the biased one (a factor n/(n-1) = 128/127).
  np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * stem.var(axis=(0, 1, 2)), rtol=1e-4)
  # Normalization uses eps = 1e-5: a channel with running variance v scales by 1/sqrt(v + 1e-5).
  bn = models.nn.BatchNorm(use_running_average=True, epsilon=models.BN_EPSILON)
  y = bn.apply({'batch_stats': {'mean': jnp.zeros(3), 'var': jnp.full(3, 1e-5)},
                'params': {'scale': jnp.ones(3), 'bias': jnp.zeros(3)}}, jnp.ones((1, 3)))
  np.testing.assert_allclose(y, 1 / math.sqrt(2e-5), rtol=1e-5)


def test_bfloat16_compute_keeps_float32_parameters_and_statistics():
  model = tiny(dtype='bfloat16')
  x = jnp.ones((2, 16, 16, 3))
  v = helpers.init(model, jax.random.key(0), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(v))
  logits, upd = apply(model, v, x, train=True, mutable=['batch_stats'])
  assert logits.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(upd))
  _, inter = apply(model, v, x, capture_intermediates=True)
  assert inter['intermediates']['stem_conv']['__call__'][0].dtype == jnp.bfloat16


def test_float64_reference_computes_and_keeps_everything_in_float64():
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  with pytest.raises(ValueError, match="dtype='float64' needs jax_enable_x64"):
    tiny(dtype='float64')
  variables = helpers.init(tiny(), jax.random.key(0), x)
  logits32, stats32 = apply(tiny(), variables, x, train=True, mutable=['batch_stats'])
  with jax.enable_x64(True):
    model = tiny(dtype='float64')
    assert all(v.dtype == jnp.float64 for v in jax.tree.leaves(
        helpers.init(model, jax.random.key(0), x)))
    variables64 = jax.tree.map(lambda v: np.asarray(v, np.float64), variables)
    logits64, stats64 = apply(model, variables64, np.asarray(x, np.float64), train=True,
                              mutable=['batch_stats'])
    logits64, stats64 = jax.tree.map(np.asarray, (logits64, stats64))
  assert logits64.dtype == np.float64
  assert all(v.dtype == np.float64 for v in jax.tree.leaves(stats64))
  # The same numbers: float32's distance from float64 is its rounding (relative 2^-24 per
  # operation, a few 1e-7 over this network's logits of about 1), not another computation.
  np.testing.assert_allclose(logits32, logits64, rtol=0, atol=1e-5)
  assert np.abs(np.asarray(logits32, np.float64) - logits64).max() > 0  # float32 rounds
  for a, b in zip(jax.tree.leaves(stats32), jax.tree.leaves(stats64)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_batchnorm_axis_name_averages_statistics_across_devices():
  n = 2
  model = tiny(axis_name='batch')
  x = jax.random.normal(jax.random.key(0), (n, 2, 8, 8, 3))
  x = x.at[1].add(5.0)  # the two devices see different data
  v = helpers.init(tiny(), jax.random.key(1), x[0])

  @functools.partial(jax.jit, static_argnums=1)
  def stats(x, axis_name):
    m = tiny(axis_name=axis_name)
    _, upd = m.apply(v, x, train=True, mutable=['batch_stats'])
    return upd['batch_stats']['head_norm']['mean']

  synced = jax.jit(jax.vmap(lambda x: stats(x, 'batch'), axis_name='batch'))(x)
  local = jax.jit(jax.vmap(lambda x: stats(x, None)))(x)
  whole = stats(x.reshape(-1, 8, 8, 3), None)
  np.testing.assert_allclose(synced[0], synced[1], rtol=1e-5)
  np.testing.assert_allclose(synced[0], whole, rtol=1e-4, atol=1e-6)
  assert not np.allclose(local[0], local[1])
  assert model.axis_name == 'batch'


def test_conv1x1_as_matmul_accounts_for_every_field_of_nn_conv():
  """A field nn.Conv gains (a flax upgrade) must be looked at: the matmul path may ignore it."""
  fields = {f.name for f in dataclasses.fields(nn.Conv)}
  assert fields == set(models.Conv1x1AsMatmul.MATMUL_FIELDS), fields ^ set(
      models.Conv1x1AsMatmul.MATMUL_FIELDS)


def _primitives(module, variables, x):
  return {e.primitive.name for e in jax.make_jaxpr(module.apply)(variables, x).jaxpr.eqns}


@pytest.mark.parametrize('kwargs,matmul', [
    (dict(kernel_size=(1, 1), use_bias=False, padding=((0, 0), (0, 0))), True),
    (dict(kernel_size=(1, 1), use_bias=False, padding='VALID'), True),
    (dict(kernel_size=(1, 1), use_bias=False, padding='VALID', dtype=jnp.bfloat16), True),
    (dict(kernel_size=(1, 1), use_bias=True, padding='VALID'), False),
    (dict(kernel_size=(1, 1), use_bias=False, padding='VALID', strides=(2, 2)), False),
    (dict(kernel_size=(3, 3), use_bias=False, padding=((1, 1), (1, 1))), False),
    (dict(kernel_size=(1, 1), use_bias=False, padding='VALID', feature_group_count=2), False),
    (dict(kernel_size=(1, 1), use_bias=False, padding='VALID',
          mask=np.ones((1, 1, 24, 16), np.float32)), False),
])
def test_conv1x1_as_matmul_gives_nn_convs_outputs(kwargs, matmul):
  x = jax.random.normal(jax.random.key(1), (4, 6, 6, 24))
  ours, peer = models.Conv1x1AsMatmul(16, **kwargs), nn.Conv(16, **kwargs)
  variables = peer.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.key(0), x)) == jax.tree.map(
      jnp.shape, variables)
  assert ('conv_general_dilated' not in _primitives(ours, variables, x)) == matmul
  got = np.asarray(ours.apply(variables, x), np.float64)
  expected = np.asarray(peer.apply(variables, x), np.float64)
  assert got.dtype == expected.dtype and got.shape == expected.shape
  # Noise floor: nn.Conv's own distance from the same convolution in float64 (about 3e-7 at
  # outputs of about 4 in float32, 2e-2 in bfloat16); the matmul must stay within 4x of it.
  x64 = np.asarray(x, np.float64)
  variables64 = jax.tree.map(lambda v: np.asarray(v, np.float64), variables)
  with jax.enable_x64(True):
    exact = np.asarray(nn.Conv(16, **{**kwargs, 'dtype': jnp.float64}).apply(
        variables64, x64))
  floor = np.abs(expected - exact).max()
  assert np.abs(got - exact).max() <= 4 * floor + 1e-12
