"""Optimizer, schedule and the pmapped train step (8 devices vs 1)."""

import functools

import jax
import numpy as np
import pytest

from densenet_jax import inference, models, steps
from densenet_jax.devices import replicate


def test_optimizer_matches_torch_style_nesterov_sgd_with_weight_decay():
  rng = np.random.default_rng(0)
  params = {'w': rng.normal(size=(3, 4)).astype(np.float32),
            'bn': {'scale': np.ones(4, np.float32), 'bias': rng.normal(size=4).astype(np.float32)}}
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
           for _ in range(5)]
  lr, mu, wd = 0.1, 0.9, 1e-4
  tx = steps.sgd_nesterov(lr, mu, wd)
  opt_state = tx.init(params)
  ours = params
  for g in grads:
    updates, opt_state = tx.update(g, opt_state, ours)
    ours = jax.tree.map(lambda p, u: p + u, ours, updates)

  # torch.optim.SGD(nesterov=True, dampening=0, weight_decay=wd), written out by hand.
  def torch_sgd(p, gs):
    p, v = p.astype(np.float64), None
    for g in gs:
      d = g + wd * p
      v = d if v is None else mu * v + d  # Torch starts the buffer at the first gradient
      p = p - lr * (d + mu * v)
    return p

  for path in (('w',), ('bn', 'scale'), ('bn', 'bias')):
    get = lambda t: functools.reduce(lambda x, k: x[k], path, t)
    expected = torch_sgd(get(params), [get(g) for g in grads])
    np.testing.assert_allclose(get(ours), expected, rtol=1e-5, atol=1e-6)


def test_learning_rate_drops_tenfold_at_each_boundary():
  steps_per_epoch = 782
  fn = steps.learning_rate_schedule(0.1, steps_per_epoch, (150, 225))
  b1, b2 = 150 * steps_per_epoch, 225 * steps_per_epoch
  for step, expected in [(0, 0.1), (b1 - 1, 0.1), (b1, 0.01), (b1 + 1, 0.01), (b2 - 1, 0.01),
                         (b2, 0.001), (b2 + 1, 0.001), (300 * steps_per_epoch, 0.001)]:
    assert float(fn(step)) == pytest.approx(expected, rel=1e-6), step


def test_imagenet_schedule_with_three_drops():
  fn = steps.learning_rate_schedule(0.1, 10, (30, 60, 90))
  values = [float(fn(s)) for s in (299, 300, 599, 600, 899, 900)]
  np.testing.assert_allclose(values, [0.1, 0.01, 0.01, 0.001, 0.001, 0.0001], rtol=1e-6)


@functools.lru_cache(maxsize=None)
def _initial_state_and_step(num_devices, cross_replica_bn):
  """(initial state, pmapped train step) on the first num_devices devices: built, traced and
  compiled once for the tests that share them."""
  devices = jax.devices()[:num_devices]
  model = models.DenseNet(block_sizes=(2, 2), growth_rate=4, bottleneck=True, compression=0.5,
                          num_classes=10,
                          axis_name=inference.AXIS_NAME if cross_replica_bn else None)
  lr_fn = steps.learning_rate_schedule(0.1, 2, (1,))
  state = steps.create_train_state(model, jax.random.key(0), (16, 16, 3),
                                   steps.sgd_nesterov(lr_fn, 0.9, 1e-4))
  p_step = jax.pmap(functools.partial(steps.train_step, learning_rate_fn=lr_fn),
                    axis_name=inference.AXIS_NAME, devices=devices)
  return replicate(state, devices), p_step


def _run_steps(num_devices, batches, cross_replica_bn=True):
  p_state, p_step = _initial_state_and_step(num_devices, cross_replica_bn)
  for batch in batches:
    shard = {k: v.reshape(num_devices, -1, *v.shape[1:]) for k, v in batch.items()}
    p_state, metrics = p_step(p_state, shard)
  return jax.device_get(jax.tree.map(lambda x: x[0], p_state)), metrics


def test_eight_devices_equal_one_device_on_the_same_global_batches():
  assert jax.device_count() >= 8, 'tests/conftest.py sets JAX_NUM_CPU_DEVICES=8'
  rng = np.random.default_rng(0)
  batches = [{'image': rng.normal(size=(16, 16, 16, 3)).astype(np.float32),
              'label': rng.integers(0, 10, size=16).astype(np.int32)} for _ in range(3)]
  one, m1 = _run_steps(1, batches)
  eight, m8 = _run_steps(8, batches)
  for tree in ('params', 'batch_stats'):
    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
        getattr(eight, tree), getattr(one, tree))
  np.testing.assert_allclose(m8['loss'][0], m1['loss'][0], rtol=1e-5)
  assert int(eight.step) == 3


def test_per_device_batchnorm_differs_from_cross_replica():
  rng = np.random.default_rng(1)
  batches = [{'image': (rng.normal(size=(16, 16, 16, 3)) +
                        np.repeat(np.arange(8), 2)[:, None, None, None]).astype(np.float32),
              'label': rng.integers(0, 10, size=16).astype(np.int32)}]
  synced, _ = _run_steps(8, batches)
  local, _ = _run_steps(8, batches, cross_replica_bn=False)
  assert not np.allclose(synced.params['classifier']['kernel'], local.params['classifier']['kernel'])


def test_train_step_with_class_weights_minimizes_the_weighted_mean_loss():
  model = models.DenseNet(block_sizes=(1,), growth_rate=4, num_classes=3)
  state = steps.create_train_state(model, jax.random.key(0), (8, 8, 3),
                                   steps.sgd_nesterov(0.1, 0.9, 0.0))
  images = np.random.default_rng(2).normal(size=(4, 8, 8, 3)).astype(np.float32)
  labels = np.array([0, 1, 2, 0], np.int32)
  weight = np.array([0.5, 2.0, 1.0, 0.5], np.float32)
  logits, _ = jax.jit(functools.partial(state.apply_fn, train=True, mutable=['batch_stats']))(
      {'params': state.params, 'batch_stats': state.batch_stats}, images)
  losses = np.asarray(inference.cross_entropy(logits, labels))
  step = jax.jit(functools.partial(steps.train_step, learning_rate_fn=lambda step: 0.1,
                                   axis_name=None))
  _, metrics = step(state, {'image': images, 'label': labels, 'weight': weight})
  np.testing.assert_allclose(metrics['loss'], np.mean(weight * losses), rtol=1e-6)
  _, plain = step(state, {'image': images, 'label': labels})
  np.testing.assert_allclose(plain['loss'], losses.mean(), rtol=1e-6)
