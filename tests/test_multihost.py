"""Two processes on this machine (jax.distributed on localhost, CPU collectives), each with 2 CPU
devices and its own data shard, train as one process with 4 devices fed the same global batches.

A SIGTERM to one process stops both at the same step with a checkpoint (JAX's preemption
service); the restarted pair continues from it. The test split has an odd size, so the two
processes' eval shards differ in size. The learning rate is 0.01: at 0.1, this tiny model with
2 images per device amplifies the all-reduces' rounding differences (two processes sum in
another order than one) to 1e-2 in 48 steps; at 0.01 they stay at 3e-7 (measured).
"""

import concurrent.futures
import functools
import json
import re
import signal
import socket

import jax
import numpy as np
import pytest

from densenet_jax import input_pipeline, models, steps, train
import main_runs
import tfds_fixtures

NUM_TRAIN, NUM_TEST, BATCH, EPOCHS, LEARNING_RATE = 96, 75, 8, 4, 0.01
STEPS = NUM_TRAIN // BATCH * EPOCHS
ARGS = ['--config=configs/cifar.py:densenet40_k12,c10+,quick', '--config.model.growth_rate=4',
        f'--config.batch_size={BATCH}', f'--config.eval_batch_size={BATCH}',
        '--config.log_every_steps=1', f'--config.num_epochs={EPOCHS}',
        f'--config.learning_rate={LEARNING_RATE}', '--config.lr_decay_epochs=(2.5,)']


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds')
  tfds_fixtures.store('cifar10', root, {
      'train': (np.arange(NUM_TRAIN), np.arange(NUM_TRAIN) % 10),
      'test': (np.arange(1000, 1000 + NUM_TEST), np.arange(NUM_TEST) % 10)})
  return str(root)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def run_pair(workdir, data_dir, sigterm_process_1_at=None):
  """[(exit status, log)] of the two processes of one run."""
  port = free_port()
  procs = [main_runs.start([*ARGS, f'--config.data_dir={data_dir}', f'--workdir={workdir}',
                            f'--coordinator_address=localhost:{port}', '--num_processes=2',
                            f'--process_id={i}'], num_devices=2) for i in range(2)]
  finish = functools.partial(main_runs.finish, timeout=300)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    futures = [pool.submit(finish, procs[0]),
               pool.submit(finish, procs[1], signal_at=sigterm_process_1_at,
                           signum=signal.SIGTERM if sigterm_process_1_at else None)]
    return [f.result() for f in futures]


def reference_state(data_dir):
  """STEPS steps on 4 devices of this process, each batch the two processes' batches."""
  devices = jax.local_devices()[:4]
  model = models.create_model('densenet40_k12', depth=7, growth_rate=4, num_classes=10,
                              axis_name=steps.AXIS_NAME)
  learning_rate_fn = steps.learning_rate_schedule(LEARNING_RATE, NUM_TRAIN // BATCH, (2.5,))
  tx = steps.sgd_nesterov(learning_rate_fn, 0.9, 1e-4)
  state = steps.create_train_state(model, jax.random.PRNGKey(0), (32, 32, 3), tx)
  p_step = jax.pmap(functools.partial(steps.train_step, learning_rate_fn=learning_rate_fn),
                    axis_name=steps.AXIS_NAME, devices=devices)
  shards = [input_pipeline.create_train_iterator(
      'cifar10', data_dir=data_dir, global_batch_size=BATCH, seed=0, process_index=i,
      process_count=2, local_device_count=2) for i in range(2)]
  p_state = train.replicate(state, devices)
  for _ in range(STEPS):
    parts = [next(shard) for shard in shards]
    batch = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    p_state, _ = p_step(p_state, batch)
  return train.unreplicate(p_state)


def test_two_processes_train_stop_resume_and_equal_one_process(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  (status0, log0), (status1, log1) = run_pair(workdir, data_dir, sigterm_process_1_at=14)
  assert status0 == status1 == 128 + signal.SIGTERM, (log0[-3000:], log1[-3000:])
  stops = [re.search(r'stopped by SIGTERM after step (\d+),', log) for log in (log0, log1)]
  assert stops[0] and stops[1] and stops[0].group(1) == stops[1].group(1)
  stopped = int(stops[0].group(1))
  assert 14 <= stopped < STEPS
  for log in (log0, log1):  # evaluation ends on both processes, with every test image once
    assert f'step 12 eval test ({NUM_TEST} images)' in log

  (status0, log0), (status1, log1) = run_pair(workdir, data_dir)
  assert status0 == status1 == 0, (log0[-3000:], log1[-3000:])
  resumed = [re.search(rf'Resumed from step {stopped} .*\(sum of \|params\| (\S+)\)', log)
             for log in (log0, log1)]
  assert resumed[0] and resumed[1] and resumed[0].group(1) == resumed[1].group(1)
  results = json.loads((workdir / 'results.json').read_text())
  assert results['final']['step'] == STEPS
  assert results['final']['eval']['test']['count'] == NUM_TEST

  step, state, _ = main_runs.last_checkpoint(str(workdir))
  assert step == STEPS
  expected = reference_state(data_dir)
  # All-reduces sum in another order than one process does: equal up to rounding. Momentum
  # (sums of recent gradients) is the most sensitive: up to 8e-5 apart (measured).
  for name, atol in (('params', 1e-6), ('batch_stats', 1e-6), ('opt_state', 2e-4)):
    np.testing.assert_allclose(
        np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(state[name])]),
        np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(getattr(expected, name))]),
        rtol=1e-5, atol=atol, err_msg=name)
