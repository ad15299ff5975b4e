"""bfloat16 compute: float32 parameters, optimizer state, BN statistics and loss, and a bf16
train step that stays close to the float32 one."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from densenet_jax import costs, models, steps

SIZE, BATCH = 8, 8


def tiny(dtype, memory_efficient=False):
  return models.DenseNet(block_sizes=(2, 2), growth_rate=4, bottleneck=True, compression=0.5,
                         stem_features=8, num_classes=5, dtype=dtype,
                         memory_efficient=memory_efficient)


LR = steps.learning_rate_schedule(0.1, 10, [5])
TX = steps.sgd_nesterov(LR, momentum=0.9, weight_decay=1e-4)
BATCH_DATA = {'image': jax.random.normal(jax.random.key(1), (BATCH, SIZE, SIZE, 3)),
              'label': jnp.arange(BATCH) % 5}
STEP = jax.jit(functools.partial(steps.train_step, learning_rate_fn=LR, axis_name=None))


def one_step(dtype, memory_efficient=False):
  state = steps.create_train_state(tiny(dtype, memory_efficient), jax.random.key(0),
                                   (SIZE, SIZE, 3), TX)
  return state, *STEP(state, BATCH_DATA)


def flat(tree):
  return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])


def test_bf16_model_computes_convolutions_in_bf16():
  model = tiny('bfloat16')
  variables = costs.init_shapes(model, SIZE)
  x = jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, x).jaxpr
  convs = [e for e in costs.equations(jaxpr)  # nested ones too (remat, custom_vjp)
           if e.primitive.name in ('conv_general_dilated', 'dot_general')]
  assert len(convs) == 1 + 2 * 4 + 1 + 1  # stem, 4 bottleneck layers, transition, classifier
  assert all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))


@pytest.mark.parametrize('memory_efficient', [False, True])
def test_bf16_state_and_loss_stay_float32(memory_efficient):
  _, state, metrics = one_step('bfloat16', memory_efficient)
  for tree in (state.params, state.opt_state, state.batch_stats):
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert leaves and all(x.dtype == jnp.float32 for x in leaves)
  assert metrics['loss'].dtype == jnp.float32 and bool(metrics['finite'])


@pytest.mark.parametrize('memory_efficient', [False, True])
def test_bf16_step_stays_close_to_float32_step(memory_efficient):
  before, f32_state, f32_metrics = one_step('float32')
  _, bf16_state, bf16_metrics = one_step('bfloat16', memory_efficient)
  # bf16 keeps 8 significant bits (relative rounding 2^-9): the loss agrees to about 1%.
  np.testing.assert_allclose(bf16_metrics['loss'], f32_metrics['loss'], rtol=2e-2)
  # The parameter update points the same way and has the same size.
  f32_update = flat(f32_state.params) - flat(before.params)
  bf16_update = flat(bf16_state.params) - flat(before.params)
  cosine = jnp.dot(f32_update, bf16_update) / (
      jnp.linalg.norm(f32_update) * jnp.linalg.norm(bf16_update))
  assert cosine > 0.98  # measured 0.99: bf16 rounding noise, larger in the earliest layers
  assert jnp.linalg.norm(bf16_update) == pytest.approx(float(jnp.linalg.norm(f32_update)),
                                                       rel=0.05)
  np.testing.assert_allclose(flat(bf16_state.batch_stats), flat(f32_state.batch_stats),
                             rtol=5e-2, atol=5e-3)
