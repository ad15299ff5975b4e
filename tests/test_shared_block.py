"""The shared-storage dense block (shared_block.py, the default implementation) against the
module implementation ('concat') and the float64 reference: the same variables, outputs,
gradients and BN statistics, to the float32 (or bfloat16) rounding measured here; what each mode
saves for the backward pass; no concatenation anywhere in its training step."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from densenet_jax import costs, models, shared_block
import helpers

SIZE, BATCH, CLASSES = 8, 8, 5
VARIANTS = {  # name: DenseNet fields (one with dropout: XLA:CPU compiles its draws slowly)
    'basic': dict(bottleneck=False, compression=1.0, dropout_rate=0.2),
    'B': dict(bottleneck=True, compression=1.0),
    'C': dict(bottleneck=False, compression=0.5),
    'BC': dict(bottleneck=True, compression=0.5),
}
# (implementation, memory_efficient) of the shared block's modes; ('concat', False), the module
# implementation, is the reference whose distance from float64 sets the noise floor (its own
# memory-efficient mode is compared with it in test_memory_efficient.py).
REFERENCE = ('concat', False)
MODES = [('shared', False), ('shared', True)]


def tiny(variant, implementation, memory_efficient, dtype='float32', **overrides):
  return models.DenseNet(block_sizes=(1, 2), growth_rate=4, stem_features=6,
                         num_classes=CLASSES, dtype=dtype, implementation=implementation,
                         memory_efficient=memory_efficient, **VARIANTS[variant], **overrides)


def images(batch=BATCH):
  return jax.random.normal(jax.random.key(1), (batch, SIZE, SIZE, 3))


def loss_grads_stats(model, variables, x):
  """Training logits, gradients of a weighted sum of their sines, new BN statistics and eval
  logits."""
  def loss(params):
    logits, updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                  x, train=True, mutable=['batch_stats'],
                                  rngs={'dropout': jax.random.key(2)})
    weights = jnp.arange(1.0, CLASSES + 1, dtype=logits.dtype)
    return jnp.sum(jnp.sin(logits) * weights), (logits, updates['batch_stats'])

  # The loss itself is left out: a sum of sines, its relative rounding is a matter of luck in
  # the cancellations (measured between 3e-7 and 2e-6 for the same program).
  (_, (logits, stats)), grads = jax.value_and_grad(loss, has_aux=True)(variables['params'])
  return {'logits': logits, 'grads': grads, 'stats': stats, 'eval': model.apply(variables, x)}


def as64(tree):
  return jax.tree.map(lambda v: np.asarray(v, np.float64), tree)


def relative_error(tree, truth) -> float:
  """The largest relative L2 error |a - truth| / |truth| of truth's parts (each top-level entry
  of a dict or tuple, its leaves taken together)."""
  assert jax.tree.structure(tree) == jax.tree.structure(truth)
  parts = truth.keys() if isinstance(truth, dict) else range(len(truth))
  worst = 0.0
  for part in parts:
    got, want = (np.concatenate([np.ravel(np.asarray(v, np.float64)) for v in jax.tree.leaves(t)])
                 for t in (tree[part], truth[part]))
    worst = max(worst, float(np.linalg.norm(got - want) / (np.linalg.norm(want) + 1e-300)))
  return worst


def errors_against_float64(variant, dtype, run, shared64=False):
  """Relative error of the reference and of each mode in `dtype` against the module
  implementation in float64 (and, with shared64, of the shared block in float64).

  Everything runs with x64 enabled, so that dropout draws the same masks in every dtype.
  run(model, variables, x) -> a tree of results.
  """
  with jax.enable_x64(True):
    x = images()
    variables = helpers.init(tiny(variant, 'concat', False), jax.random.key(0), x)
    truth = run(tiny(variant, 'concat', False, dtype='float64'), as64(variables),
                np.asarray(x, np.float64))
    truth = as64(truth)
    errors = {}
    for implementation, memory_efficient in [REFERENCE] + MODES:
      model = tiny(variant, implementation, memory_efficient, dtype=dtype)
      errors[implementation, memory_efficient] = relative_error(run(model, variables, x), truth)
    if shared64:
      errors['shared float64'] = relative_error(
          run(tiny(variant, 'shared', False, dtype='float64'), as64(variables),
              np.asarray(x, np.float64)), truth)
  return errors


@pytest.mark.parametrize('variant', list(VARIANTS))
@pytest.mark.parametrize('memory_efficient', [False, True])
def test_same_variables_as_the_module_implementation(variant, memory_efficient):
  x = images()
  reference = helpers.init(tiny(variant, 'concat', False), jax.random.key(0), x)
  shared = helpers.init(tiny(variant, 'shared', memory_efficient), jax.random.key(0), x)
  assert jax.tree.structure(shared) == jax.tree.structure(reference)
  for a, b in zip(jax.tree.leaves(shared), jax.tree.leaves(reference)):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_outputs_gradients_and_statistics_within_float32_noise(variant):
  errors = errors_against_float64(variant, 'float32', jax.jit(loss_grads_stats, static_argnums=0),
                                  shared64=variant == 'BC')
  floor = errors[REFERENCE]  # the module implementation's own float32 rounding
  assert 0 < floor < 1e-4
  for mode in MODES:
    assert errors[mode] <= 4 * floor, (mode, errors)
  if variant == 'BC':  # in float64 both compute the same numbers up to float64 rounding
    assert errors['shared float64'] < 1e-12


def test_bfloat16_within_bfloat16_noise():
  errors = errors_against_float64('BC', 'bfloat16', jax.jit(loss_grads_stats, static_argnums=0))
  floor = errors[REFERENCE]
  assert 1e-4 < floor < 0.2  # bfloat16 rounds (8 bits of mantissa), but the numbers are right
  for mode in MODES:
    assert errors[mode] <= 3 * floor, (mode, errors)


def test_cross_replica_batch_norm_under_pmap():
  """Four devices, BN statistics averaged over the pmap axis: every mode within float32 noise of
  float64, in training logits, gradients (summed over devices) and statistics."""
  devices = jax.devices()[:4]

  def run(model, variables, x):
    model = model.clone(axis_name='batch')
    shards = x.reshape(len(devices), -1, *x.shape[1:])

    def per_device(params, shard):
      out = loss_grads_stats(model, {'params': params, 'batch_stats': variables['batch_stats']},
                             shard)
      del out['eval']
      out['grads'] = jax.lax.psum(out['grads'], 'batch')
      return out

    out = jax.pmap(per_device, axis_name='batch', in_axes=(None, 0),
                   devices=devices)(variables['params'], shards)
    return dict(out, grads=jax.tree.map(lambda g: g[0], out['grads']),
                stats=jax.tree.map(lambda s: s[0], out['stats']))

  errors = errors_against_float64('BC', 'float32', run)
  floor = errors[REFERENCE]
  assert 0 < floor < 1e-4
  for mode in MODES:
    assert errors[mode] <= 4 * floor, (mode, errors)


def train_step_jaxpr(model, x):
  variables = helpers.init(model, jax.random.key(0), x)

  def step(params):
    def loss(params):
      logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                              train=True, mutable=['batch_stats'],
                              rngs={'dropout': jax.random.key(0)})
      return logits.sum()
    return jax.grad(loss)(params)

  return jax.make_jaxpr(step)(variables['params']).jaxpr


@pytest.mark.parametrize('memory_efficient', [False, True])
def test_no_concatenation_forward_or_backward(memory_efficient):
  """The shared block's step writes slices of one buffer: not one concatenate in the traced
  forward and backward passes (the block's custom backward included), where the module
  implementation has one per unit and more."""
  x = images()
  counts = {impl: costs.count_primitives(
      train_step_jaxpr(tiny('BC', impl, memory_efficient), x), ('concatenate',
                                                                 'dynamic_update_slice'))
            for impl in ('shared', 'concat')}
  assert counts['shared'].get('concatenate', 0) == 0
  assert counts['shared']['dynamic_update_slice'] > 0
  assert counts['concat']['concatenate'] >= 2 + 3  # one per layer at least


def one_block(num_layers, implementation, memory_efficient, bottleneck=True):
  return models.DenseNet(block_sizes=(num_layers,), growth_rate=4, bottleneck=bottleneck,
                         stem_features=8, implementation=implementation,
                         memory_efficient=memory_efficient)


@pytest.mark.parametrize('bottleneck', [False, True])
def test_saved_bytes_per_layer_equal_a_hand_count(bottleneck):
  """What one more dense layer adds to the residuals, in float32 bytes per pixel of the batch.

  Shared, memory-efficient: its k new channels in the buffer; BN moments are O(channels).
  Shared, plain: also each unit's ReLU output (c_l channels for the first unit, 4k for the
  composite after a bottleneck) and the bottleneck's output (4k).
  PyTorch's autograd keeps per unit BN's input and the ReLU output (plus the buffer's k): the
  plain shared block keeps one copy of the unit input fewer, c_l per layer less.
  """
  batch, k, c0 = 8, 4, 8
  pixels = batch * SIZE * SIZE
  layers = (3, 4)
  for memory_efficient in (False, True):
    saved = [costs.saved_activation_bytes(one_block(n, 'shared', memory_efficient, bottleneck),
                                          SIZE, batch) for n in layers]
    c_l = c0 + layers[0] * k  # the input channels of the added layer
    if memory_efficient:
      channels = k
    elif bottleneck:
      channels = k + c_l + 4 * k + 4 * k
    else:
      channels = k + c_l
    added = saved[1] - saved[0]
    # Besides: per-channel vectors (BN moments, the head's sums): a few floats per channel, far
    # below one more channel of the batch (pixels * 4 = 2,048 bytes).
    per_channel = added - pixels * 4 * channels
    assert 0 < per_channel <= 8 * 4 * (c_l + 4 * k + k)
    torch_like = (k + 2 * c_l + (2 * 4 * k + 4 * k if bottleneck else 0)) * pixels * 4
    assert saved[1] - saved[0] < torch_like


def test_residuals_grow_linearly_in_depth_when_memory_efficient():
  saved = {me: [costs.saved_activation_bytes(one_block(n, 'shared', me), SIZE, 8)
                for n in (3, 6, 12)] for me in (False, True)}
  plain, lean = (np.diff(saved[me]) for me in (False, True))
  # 6 more layers vs 3: linear in the batch's pixels (k channels a layer); only the BN moments,
  # a few floats per input channel, grow with the layer (measured 2.06).
  assert lean[1] / lean[0] == pytest.approx(2.0, rel=0.05)
  assert plain[1] / plain[0] > 2.3  # plain keeps each layer's input: quadratic (linear: 2)
  assert saved[True][-1] < 0.25 * saved[False][-1]


def test_keep_policies_are_checked():
  with pytest.raises(ValueError, match="keep='all': allowed values are activations, bottleneck"):
    shared_block.BlockSpec(1, 4, True, 1e-5, 'float32', 'float32', keep='all')
  with pytest.raises(ValueError, match="implementation='buffer': allowed values are shared"):
    tiny('B', 'buffer', False)


@pytest.mark.parametrize('keep', shared_block.KEEP)
def test_custom_backward_equals_autodiff_of_the_forward(keep):
  """The pure block: its custom backward pass, with each keep policy, gives JAX's own gradients
  of the same forward pass (autodiff through the buffer's updates), to float32 noise."""
  def loss(spec, x0, params, autodiff):
    block = ((lambda *a: shared_block.forward(*a)[0]) if autodiff
             else (lambda *a: shared_block.train_block(*a)[0]))
    return jnp.sum(jnp.sin(block(spec, x0, params, ((None, None),) * 2)))

  def gradients(dtype, autodiff):
    spec = shared_block.BlockSpec(2, 4, True, 1e-5, dtype, dtype, keep=keep)
    cast = lambda tree: jax.tree.map(lambda v: jnp.asarray(v, dtype), tree)
    grad = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=(0, 3))
    return grad(spec, cast(x0), cast(params), autodiff)

  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.key(1), 5)
    x0 = jax.random.normal(keys[4], (4, SIZE, SIZE, 6), jnp.float32)
    params = []
    for layer in range(2):
      c = 6 + 4 * layer
      k1, k2 = jax.random.split(keys[layer])
      params.append(((1.0 + 0.1 * jnp.arange(c, dtype=jnp.float32), 0.1 * jnp.ones(c),
                      jax.random.normal(k1, (1, 1, c, 16), jnp.float32) / math.sqrt(c)),
                     (jnp.ones(16), jnp.zeros(16),
                      jax.random.normal(k2, (3, 3, 16, 4), jnp.float32) / 12)))
    params = tuple(params)
    truth = as64(gradients('float64', autodiff=True))
    floor = relative_error(gradients('float32', autodiff=True), truth)
    custom = relative_error(gradients('float32', autodiff=False), truth)
    custom64 = relative_error(gradients('float64', autodiff=False), truth)
  assert 0 < floor < 1e-4
  assert custom <= 4 * floor
  assert custom64 < 1e-12
