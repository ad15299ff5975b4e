"""The train and eval steps lower for GPU and TPU (jax.export), without those devices.

pmap cannot be exported, so the per-device steps run under shard_map over a mesh of this
process's CPU devices, collectives (BN statistics, gradient and metric means) included: a
lowering error that only CUDA or TPU would raise shows up here, on every CI run.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from densenet_jax import inference, models, steps

PLATFORMS = ['cuda', 'tpu']
DEVICES = 2
BATCH, SIZE = 4, 8


def _sharded(step):
  """step mapped over the batch axis of a DEVICES-device mesh; state and outputs replicated."""
  mesh = Mesh(np.array(jax.devices()[:DEVICES]), (inference.AXIS_NAME,))
  return jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(inference.AXIS_NAME)),
                               out_specs=P(), check_vma=False))


def _abstract_state(memory_efficient: bool, dtype: str):
  model = models.DenseNet(block_sizes=(1, 1), growth_rate=4, bottleneck=True, compression=0.5,
                          num_classes=10, dropout_rate=0.2, axis_name=inference.AXIS_NAME,
                          memory_efficient=memory_efficient, dtype=dtype)
  lr_fn = steps.learning_rate_schedule(0.1, 10, (5,))
  tx = steps.sgd_nesterov(lr_fn, 0.9, 1e-4)
  state = jax.eval_shape(
      lambda: steps.create_train_state(model, jax.random.key(0), (SIZE, SIZE, 3), tx))
  return state, lr_fn


def _batch(**extra):
  return {'image': jax.ShapeDtypeStruct((BATCH, SIZE, SIZE, 3), jnp.float32),
          'label': jax.ShapeDtypeStruct((BATCH,), jnp.int32), **extra}


@pytest.mark.parametrize('memory_efficient', [False, True])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_train_step_lowers_for_gpu_and_tpu(memory_efficient, dtype):
  state, lr_fn = _abstract_state(memory_efficient, dtype)
  step = _sharded(functools.partial(steps.train_step, learning_rate_fn=lr_fn))
  exported = jax.export.export(step, platforms=PLATFORMS)(state, _batch())
  assert exported.platforms == tuple(PLATFORMS)
  assert exported.nr_devices == DEVICES
  text = exported.mlir_module()
  assert 'all_reduce' in text or 'all-reduce' in text  # the cross-device means are in it
  new_state = exported.out_avals[:len(jax.tree.leaves(state))]
  assert [a.shape for a in new_state] == [a.shape for a in jax.tree.leaves(state)]


def test_eval_step_lowers_for_gpu_and_tpu():
  state, _ = _abstract_state(False, 'float32')
  step = _sharded(functools.partial(inference.eval_step, top5=True, confusion=True))
  batch = _batch(mask=jax.ShapeDtypeStruct((BATCH,), jnp.float32))
  exported = jax.export.export(step, platforms=PLATFORMS)(state, batch)
  assert exported.platforms == tuple(PLATFORMS)
  # the sums of the confusion matrix, count, loss, top-1 and top-5 errors (sorted keys)
  assert exported.out_tree.num_leaves == 5
  num_classes = state.params['classifier']['bias'].shape[0]
  assert [a.shape for a in exported.out_avals] == [(num_classes, num_classes)] + [()] * 4
