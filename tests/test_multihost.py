"""Two processes on this machine (jax.distributed on localhost, CPU collectives), each with 2 CPU
devices and its own data shard, train as one process with 4 devices fed the same global batches.

A SIGTERM to one process stops both at the same step with a checkpoint (JAX's preemption
service); the restarted pair continues from it. The test split has an odd size, so the two
processes' eval shards differ in size. The two processes sum their all-reduces in another order
than one process does; training amplifies the rounding, so the comparison's tolerance is
measured in the test by a control (the one-process run with its shards rotated over its
devices). The learning rate is 0.01: at 0.1 this tiny model with 2 images per device amplifies
the rounding to 1e-2 in 48 steps.
"""

import contextlib
import functools
import json
import re
import signal

import flax.linen as nn
import jax
import numpy as np
import pytest

from densenet_jax import devices, inference, input_pipeline, models, steps
from densenet_jax.datasets import DataOptions
from densenet_jax.devices import Topology
import helpers
from experiments import tiny_tfds

NUM_TRAIN, NUM_TEST, BATCH, EPOCHS, LEARNING_RATE = 96, 75, 8, 4, 0.01
STEPS = NUM_TRAIN // BATCH * EPOCHS
ARGS = ['--config=configs/cifar.py:densenet40_k12,c10+,quick', '--config.model.growth_rate=4',
        f'--config.batch_size={BATCH}', f'--config.eval_batch_size={BATCH}',
        '--config.log_every_steps=1', f'--config.num_epochs={EPOCHS}',
        f'--config.learning_rate={LEARNING_RATE}', '--config.lr_decay_epochs=(2.5,)']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds')
  tiny_tfds.store('cifar10', root, {
      'train': (np.arange(NUM_TRAIN), np.arange(NUM_TRAIN) % 10),
      'test': (np.arange(1000, 1000 + NUM_TEST), np.arange(NUM_TEST) % 10)})
  return str(root)


def reference_state(data_dir, roll=0, shards_read=(0, 1)):
  """STEPS steps on 4 devices of this process, each batch the two processes' batches.

  roll: the batch's device shards rotated by this many devices (the same global batch, so the
  same arithmetic, but the all-reduces sum in another order). shards_read: which process's data
  each half of the batch is (a planted bug: (0, 0), process 1 reading process 0's shard).
  """
  local_devices = jax.local_devices()[:4]
  model = models.create_model('densenet40_k12', depth=7, growth_rate=4, num_classes=10,
                              axis_name=inference.AXIS_NAME)
  learning_rate_fn = steps.learning_rate_schedule(LEARNING_RATE, NUM_TRAIN // BATCH, (2.5,))
  tx = steps.sgd_nesterov(learning_rate_fn, 0.9, 1e-4)
  state = steps.create_train_state(model, jax.random.key(0), (32, 32, 3), tx)
  transform = input_pipeline.Data(DataOptions('cifar10', data_dir)).device_transform(train=True)
  p_step = jax.pmap(functools.partial(steps.train_step, learning_rate_fn=learning_rate_fn,
                                      transform=transform),
                    axis_name=inference.AXIS_NAME, devices=local_devices)
  shards = [input_pipeline.Data(DataOptions('cifar10', data_dir)).train_iterator(
      Topology(BATCH, i, process_count=2, local_device_count=2)) for i in shards_read]
  p_state = devices.replicate(state, local_devices)
  for _ in range(STEPS):
    parts = [next(shard) for shard in shards]
    batch = {k: np.roll(np.concatenate([part[k] for part in parts]), roll, axis=0)
             for k in parts[0]}
    p_state, _ = p_step(p_state, batch)
  return devices.unreplicate(p_state)


@contextlib.contextmanager
def batch_norm_per_process():
  """A planted bug: BN statistics averaged over each process's two devices instead of all four
  (reference_state's devices 0-1 hold process 0's shard, 2-3 process 1's)."""
  per_process = functools.partial(nn.BatchNorm, axis_index_groups=[[0, 1], [2, 3]])
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(models.nn, 'BatchNorm', per_process)
    yield


def largest_difference(a, b) -> dict:
  """Per collection of the state, the largest |a - b| over its elements."""
  return {name: max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in
                    zip(jax.tree.leaves(a[name]), jax.tree.leaves(getattr(b, name))))
          for name in ('params', 'batch_stats', 'opt_state')}


def test_two_processes_train_stop_resume_and_equal_one_process(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  (status0, log0), (status1, log1) = helpers.run_pair(workdir, data_dir, ARGS,
                                                       sigterm_process_1_at=14)
  assert status0 == status1 == 128 + signal.SIGTERM, (log0[-3000:], log1[-3000:])
  stops = [re.search(r'stopped by SIGTERM after step (\d+),', log) for log in (log0, log1)]
  assert stops[0] and stops[1] and stops[0].group(1) == stops[1].group(1)
  stopped = int(stops[0].group(1))
  assert 14 <= stopped < STEPS
  for log in (log0, log1):  # evaluation ends on both processes, with every test image once
    assert f'step 12 eval test ({NUM_TEST} images)' in log

  (status0, log0), (status1, log1) = helpers.run_pair(workdir, data_dir, ARGS)
  assert status0 == status1 == 0, (log0[-3000:], log1[-3000:])
  resumed = [re.search(rf'Resumed from step {stopped} .*\(sum of \|params\| (\S+)\)', log)
             for log in (log0, log1)]
  assert resumed[0] and resumed[1] and resumed[0].group(1) == resumed[1].group(1)
  results = json.loads((workdir / 'results.json').read_text())
  assert results['final']['step'] == STEPS
  assert results['final']['eval']['test']['count'] == NUM_TEST

  step, state, _ = helpers.last_checkpoint(str(workdir))
  assert step == STEPS
  expected = reference_state(data_dir)
  # Control: the same one-process run with its batches' shards rotated over the devices sums
  # the all-reduces in other orders, as two processes do. Its distance from `expected` is the
  # rounding that 48 steps amplify (measured: 5e-6 for one device's rotation, 1e-4 for two, on
  # params); two processes must stay within twice the largest, per collection.
  controls = [largest_difference(vars(reference_state(data_dir, roll=r)), expected)
              for r in (1, 2, 3)]
  tolerance = {name: 2 * max(c[name] for c in controls) for name in controls[0]}
  assert all(value > 0 for value in tolerance.values()), tolerance
  two_processes = largest_difference(state, expected)
  assert all(two_processes[name] <= tolerance[name] for name in tolerance), (
      two_processes, tolerance)
  # The tolerance still catches planted bugs: a process that trains on the other's data, and
  # BN statistics per process instead of global.
  planted = largest_difference(vars(reference_state(data_dir, shards_read=(0, 0))), expected)
  assert planted['params'] > 10 * tolerance['params'], (planted, tolerance)
  with batch_norm_per_process():
    planted = largest_difference(vars(reference_state(data_dir)), expected)
  assert planted['params'] > 10 * tolerance['params'], (planted, tolerance)
