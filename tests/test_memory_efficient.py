"""Memory-efficient mode of the module implementation ('concat', nn.remat): the plain model's
parameters, outputs, gradients and BN statistics, with residuals (what the forward pass saves
for the backward pass) linear in depth. The shared-buffer implementation: test_shared_block.py."""

import contextlib
import functools
import io
import math
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from densenet_jax import costs, models, steps
import helpers

TINY = dict(block_sizes=(2, 3), growth_rate=4, bottleneck=True, compression=0.5, stem_features=6,
            dropout_rate=0.2, num_classes=5)
SIZE, BATCH = 8, 4
ITEMSIZE = {'f32': 4, 'bf16': 2, 'bool': 1}  # print_saved_residuals' dtype names


def tiny(memory_efficient, **overrides):
  fields = dict(TINY, memory_efficient=memory_efficient, implementation='concat')
  return models.DenseNet(**{**fields, **overrides})


def images(batch=BATCH, size=SIZE):
  return jax.random.normal(jax.random.key(1), (batch, size, size, 3))


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize('bottleneck', [False, True])
def test_same_variables(bottleneck):
  plain = helpers.init(tiny(False, bottleneck=bottleneck), jax.random.key(0), images())
  lean = helpers.init(tiny(True, bottleneck=bottleneck), jax.random.key(0), images())
  assert jax.tree.map(jnp.shape, plain) == jax.tree.map(jnp.shape, lean)
  assert_trees_close(plain, lean, rtol=0, atol=0)


@pytest.mark.parametrize('bottleneck', [False, True])
def test_same_outputs_gradients_and_statistics(bottleneck):
  variables = helpers.init(tiny(False, bottleneck=bottleneck), jax.random.key(0), images())
  x = images()

  @functools.partial(jax.jit, static_argnums=0)
  def loss_and_grad(memory_efficient, params):
    model = tiny(memory_efficient, bottleneck=bottleneck)

    def loss(params):
      logits, updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                    x, train=True, mutable=['batch_stats'],
                                    rngs={'dropout': jax.random.key(2)})
      return jnp.sum(logits * jnp.arange(5.0)), (logits, updates['batch_stats'])

    eval_logits = model.apply(variables, x)
    return jax.value_and_grad(loss, has_aux=True)(params), eval_logits

  ((plain_loss, (plain_logits, plain_stats)), plain_grads), plain_eval = loss_and_grad(
      False, variables['params'])
  ((lean_loss, (lean_logits, lean_stats)), lean_grads), lean_eval = loss_and_grad(
      True, variables['params'])
  np.testing.assert_allclose(lean_loss, plain_loss, rtol=1e-5)
  np.testing.assert_allclose(lean_logits, plain_logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(lean_eval, plain_eval, rtol=1e-5, atol=1e-6)
  assert_trees_close(lean_stats, plain_stats)
  assert_trees_close(lean_grads, plain_grads, rtol=1e-4, atol=1e-5)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(lean_grads)) > 1e-3


def optimizer_and_train_step():
  """The optimizer and the jitted single-device train step, compiled as train.py does."""
  lr = steps.learning_rate_schedule(0.1, 10, [5])
  tx = steps.sgd_nesterov(lr, momentum=0.9, weight_decay=1e-4)
  step = jax.jit(functools.partial(steps.train_step, learning_rate_fn=lr, axis_name=None),
                 compiler_options=steps.compiler_options(jax.default_backend()))
  return tx, step


@pytest.mark.slow
def test_train_step_updates_statistics_once():
  """One train step moves BN running statistics by one momentum step, in both modes alike."""
  tx, step = optimizer_and_train_step()
  batch = {'image': images(), 'label': jnp.arange(BATCH) % 5}
  plain = steps.create_train_state(tiny(False), jax.random.key(0), (SIZE, SIZE, 3), tx)
  # The same variables in both modes (test_same_variables)
  before = {me: plain.replace(apply_fn=tiny(me).apply) for me in (False, True)}
  after = {me: step(state, batch)[0] for me, state in before.items()}
  assert_trees_close(after[True].batch_stats, after[False].batch_stats)
  assert_trees_close(after[True].params, after[False].params, rtol=1e-4, atol=1e-6)

  # By hand: the first unit normalizes the stem output; its running mean starts at 0, so after
  # one update it is (1 - momentum) * batch mean (twice updated, it would be 0.19 * mean).
  stem_kernel = before[True].params['stem_conv']['kernel']
  stem = jax.lax.conv_general_dilated(batch['image'], stem_kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  expected = (1 - models.BN_MOMENTUM) * stem.mean(axis=(0, 1, 2))
  got = after[True].batch_stats['block1']['layer1']['bottleneck']['norm']['mean']
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def one_block(num_layers, memory_efficient):
  return models.DenseNet(block_sizes=(num_layers,), growth_rate=4, bottleneck=True,
                         stem_features=8, memory_efficient=memory_efficient,
                         implementation='concat')


def test_saved_activations_grow_linearly_only_in_memory_efficient_mode():
  batch, k = 8, 4
  saved = {me: [costs.saved_activation_bytes(one_block(n, me), SIZE, batch) for n in (3, 6, 12)]
           for me in (False, True)}
  # Layers 4-6 and 7-12: a linear total grows twice as much over the second span, a quadratic
  # one more than that.
  plain, lean = (np.diff(saved[me]) for me in (False, True))
  assert plain[1] / plain[0] > 2.3  # linear would be exactly 2
  assert lean[1] / lean[0] == pytest.approx(2.0, rel=0.02)
  # Per layer: its float32 conv outputs (the 4k-channel bottleneck and the k new channels), and
  # what the head's BN-ReLU keeps for those k channels (under 4 arrays); plus per-channel sums.
  per_layer, pixels = lean[1] / 6, batch * SIZE * SIZE
  assert pixels * 5 * k * 4 <= per_layer <= pixels * (5 + 4) * k * 4
  assert saved[True][-1] < 0.4 * saved[False][-1]  # measured 0.31 (plain keeps ReLU outputs)


@contextlib.contextmanager
def xla_optimized():
  """Programs compiled inside compile with all of XLA's optimizations, as outside the tests
  (conftest.py turns most of them off)."""
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    yield
  finally:
    jax.config.update('jax_disable_most_optimizations', previous)


@pytest.mark.slow
def test_compiled_train_step_keeps_the_saving():
  """The backend's compiled step (XLA temporaries, with steps.compiler_options) shrinks too:
  without the options XLA:CPU merges the recomputation back and both modes need about the same.
  Only the step compiles optimized: the init (random draws) would take ~7 s more that way."""
  tx, step = optimizer_and_train_step()
  batch = {'image': images(8), 'label': jnp.arange(8) % 10}
  plain = steps.create_train_state(one_block(4, False), jax.random.key(0), (SIZE, SIZE, 3), tx)
  temp = {}
  for memory_efficient in (False, True):  # the same variables (test_same_variables)
    state = plain.replace(apply_fn=one_block(4, memory_efficient).apply)
    with xla_optimized():
      analysis = step.lower(state, batch).compile().memory_analysis()
    temp[memory_efficient] = analysis.temp_size_in_bytes
  # measured: 0.70 at 4 layers, 0.73 at 3 (plain keeps ReLU outputs only)
  assert 0 < temp[True] < 0.8 * temp[False]


def test_saved_activation_bytes_agree_with_jax():
  """The helper counts what jax.ad_checkpoint.print_saved_residuals lists (less arguments)."""
  model = tiny(True)
  x, rng = images(), jax.random.key(0)
  variables = helpers.init(model, rng, x)

  def forward(params):
    return model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                       train=True, mutable=['batch_stats'], rngs={'dropout': rng})

  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(forward, variables['params'])
  listed = 0
  for line in out.getvalue().splitlines():
    if 'from the argument' in line or 'from a literal' in line or 'from a constant' in line:
      continue
    dtype, shape = re.match(r'(\w+)\[([\d,]*)\]', line).groups()
    listed += math.prod(int(d) for d in shape.split(',') if d) * ITEMSIZE[dtype]
  assert listed > 0
  assert costs.saved_activation_bytes(model, SIZE, BATCH) == listed


@pytest.mark.parametrize('implementation', ['concat', 'shared'])
def test_backward_pass_does_not_recompute_batch_statistics(implementation):
  """With cross-device BN, recomputing statistics would repeat an all-reduce per unit."""
  x = images()[None]
  variables = helpers.init(tiny(False), jax.random.key(0), x[0])
  counts = {}
  for memory_efficient in (False, True):
    model = tiny(memory_efficient, axis_name='batch', implementation=implementation)

    def loss(params, x):
      logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                              train=True, mutable=['batch_stats'],
                              rngs={'dropout': jax.random.key(0)})
      return logits.sum()

    grad = jax.pmap(jax.grad(loss), axis_name='batch', in_axes=(None, 0),
                    devices=jax.devices()[:1])
    jaxpr = jax.make_jaxpr(grad)(variables['params'], x).jaxpr
    counts[memory_efficient] = costs.count_primitives(jaxpr, ('psum', 'reduce_sum'))
  assert counts[True]['psum'] == counts[False]['psum'] > 0
  # Both modes compute each BN's sums once forward and once backward, the same number of times.
  assert counts[True]['reduce_sum'] == counts[False]['reduce_sum']
