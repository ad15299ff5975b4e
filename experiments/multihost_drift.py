"""Why two processes train to other parameters than one process does: rounding or computation?

Trains the multi-host test's tiny DenseNet (7 layers, k=4, lr 0.01 decayed at 2.5 epochs of 12
steps) on its data (a 96-image CIFAR-10 fixture through the real input pipeline, c10+, global
batches of 8, each process reading its own shard) in three ways:

  one process, 4 devices                          (the reference)
  the same, the batch's device shards rotated by 1, 2, 3 devices  (same arithmetic, other
                                                   all-reduce orders: the control)
  two processes (jax.distributed on localhost), 2 devices each

in float32 and in float64, and prints the largest parameter difference from the reference after
1, 12, 24, 36 and 48 steps, and the per-step losses of the reference and the two processes side
by side. If two processes computed something else (BN statistics or gradients over other
devices, another data shard), the difference would stay large in float64; if it is the order of
the all-reduce sums, it falls by the ratio of the two precisions' rounding (~1e9).

  python experiments/multihost_drift.py            # ~4 minutes on 2 CPU cores

tests/test_multihost.py runs its float64 comparison through `launch`, with the planted bugs of
RUNS as the runs its tolerance must reject.
"""

import argparse
import contextlib
import functools
import json
import os
import socket
import subprocess
import sys
import tempfile

import numpy as np

STEPS, BATCH, STEPS_PER_EPOCH, LEARNING_RATE = 48, 8, 12, 0.01
REPORT_AFTER = (1, 12, 24, 36, 48)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN = BATCH * STEPS_PER_EPOCH


def batches(data_dir: str, roll: int, shards_read=(0, 1)):
  """This process's share of each global batch: with one process, the shards of `shards_read`
  concatenated (both processes' shards, as two processes read them), then rotated by `roll`
  devices."""
  import jax

  from densenet_jax import input_pipeline
  from densenet_jax.datasets import DataOptions
  from densenet_jax.devices import Topology
  shards = shards_read if jax.process_count() == 1 else (jax.process_index(),)
  iterators = [input_pipeline.Data(DataOptions('cifar10', data_dir)).train_iterator(
      Topology(BATCH, i, process_count=2, local_device_count=2)) for i in shards]
  while True:
    parts = [next(it) for it in iterators]
    batch = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    yield {k: np.roll(v, roll, axis=0) for k, v in batch.items()}  # [devices, per device, ...]


# What one-process runs can be: the reference ('roll0'), its batches rotated over the devices
# (the control: the same arithmetic, the all-reduces summed in other orders), and two planted
# bugs of multi-host training that tests/test_multihost.py must catch.
RUNS = ('roll0', 'roll1', 'roll2', 'roll3', 'one_shard', 'bn_per_process')


@contextlib.contextmanager
def planted(run: str):
  """'bn_per_process': BN statistics averaged over each process's two devices instead of all
  four (devices 0-1 hold process 0's shard, 2-3 process 1's); other runs: nothing."""
  if run != 'bn_per_process':
    yield
    return
  import flax.linen as nn

  from densenet_jax import models
  original = nn.BatchNorm
  models.nn.BatchNorm = functools.partial(original, axis_index_groups=[[0, 1], [2, 3]])
  try:
    yield
  finally:
    models.nn.BatchNorm = original


def train(dtype: str, runs, data_dir: str, steps: int = STEPS) -> dict:
  """{run: per-step losses and flat params after the steps of REPORT_AFTER up to `steps` and after
  `steps` (process 0's copy)} for each of `runs` (RUNS; two processes: 'roll0'), in this
  process's topology. Every run starts from one initial state; the runs without a planted BN
  bug share one compiled step."""
  import jax

  from densenet_jax import devices, inference, input_pipeline, models
  from densenet_jax import steps as train_steps
  from densenet_jax.datasets import DataOptions

  model = models.create_model('densenet40_k12', depth=7, growth_rate=4, num_classes=10,
                              dtype=dtype, axis_name=inference.AXIS_NAME)
  learning_rate_fn = train_steps.learning_rate_schedule(LEARNING_RATE, STEPS_PER_EPOCH, (2.5,))
  tx = train_steps.sgd_nesterov(learning_rate_fn, 0.9, 1e-4)
  initial = devices.replicate(
      train_steps.create_train_state(model, jax.random.key(0), (32, 32, 3), tx))
  transform = input_pipeline.Data(DataOptions('cifar10', data_dir)).device_transform(train=True)
  p_steps = {}  # by whether BN is planted: a step is traced (in `planted`) at its first call
  results = {}
  for run in runs:
    bn_planted = run == 'bn_per_process'
    with planted(run):
      if bn_planted not in p_steps:
        p_steps[bn_planted] = jax.pmap(
            functools.partial(train_steps.train_step, learning_rate_fn=learning_rate_fn,
                              transform=transform), axis_name=inference.AXIS_NAME)
      p_step = p_steps[bn_planted]
      roll = int(run[4:]) if run.startswith('roll') else 0
      source = batches(data_dir, roll, shards_read=(0, 0) if run == 'one_shard' else (0, 1))
      p_state, losses, params = initial, [], {}
      for step, batch in zip(range(1, steps + 1), source):
        p_state, metrics = p_step(p_state, batch)
        losses.append(float(devices.unreplicate(metrics)['loss']))
        if step in REPORT_AFTER or step == steps:
          leaves = jax.tree.leaves(devices.unreplicate(p_state.params))
          params[step] = np.concatenate([np.ravel(x) for x in leaves]).astype(np.float64)
    results[run] = {'losses': losses, 'params': params}
  return results


def worker(args):
  """One run in a subprocess (several with --num_processes); process 0 saves what it saw."""
  import jax
  if args.dtype == 'float64':
    jax.config.update('jax_enable_x64', True)
  if args.num_processes > 1:
    jax.distributed.initialize(f'localhost:{args.port}', args.num_processes, args.process_id)
  runs = train(args.dtype, args.runs, args.data_dir, args.steps)
  if jax.process_index() == 0:
    np.savez(args.out, **{f'{run}_losses': r['losses'] for run, r in runs.items()},
             **{f'{run}_params_{s}': p for run, r in runs.items()
                for s, p in r['params'].items()})
  print(json.dumps({'jax': jax.__version__, 'devices': jax.device_count()}))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def launch(out: str, dtype: str, num_processes: int, data_dir: str, runs=('roll0',),
           steps: int = STEPS) -> subprocess.Popen:
  """Starts the worker processes of one run (4 devices in all); `wait` ends them. Process 0
  saves to `out`: {run}_losses and {run}_params_{step} of each of `runs`."""
  port = free_port()
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(4 // num_processes), JAX_PLATFORMS='cpu',
             TF_CPP_MIN_LOG_LEVEL='1')
  procs = [subprocess.Popen(
      [sys.executable, __file__, '--worker', f'--out={out}', f'--dtype={dtype}',
       f'--num_processes={num_processes}', f'--process_id={i}', f'--port={port}',
       f'--runs={",".join(runs)}', f'--steps={steps}', f'--data_dir={data_dir}'],
      env=dict(env, PYTHONPATH=ROOT), stdout=subprocess.PIPE, text=True)
      for i in range(num_processes)]
  return procs


def wait(procs) -> dict:
  """{'jax': version, 'devices': count} of a launched run, once all its processes ended."""
  for i, p in enumerate(procs):
    stdout, _ = p.communicate(timeout=900)
    if p.returncode:
      raise RuntimeError(f'worker {i} of {len(procs)} failed with status {p.returncode}')
  return json.loads(stdout.strip().splitlines()[-1])


def compare(dtype: str, tmp: str):
  one, two = os.path.join(tmp, f'one_{dtype}.npz'), os.path.join(tmp, f'two_{dtype}.npz')
  data_dir = os.path.join(tmp, 'tfds')
  info = wait(launch(one, dtype, 1, data_dir, runs=('roll0', 'roll1', 'roll2', 'roll3')))
  wait(launch(two, dtype, 2, data_dir))
  one, two = np.load(one), np.load(two)
  print(f'\n## {dtype} (jax {info["jax"]}): largest |params - reference| after n steps\n')
  print('| run | ' + ' | '.join(f'n={s}' for s in REPORT_AFTER) + ' |')
  print('|---|' + '---|' * len(REPORT_AFTER))
  rows = [(f'one process, shards rotated by {r}', one, f'roll{r}') for r in (1, 2, 3)]
  for label, run, name in rows + [('two processes', two, 'roll0')]:
    cells = [np.abs(run[f'{name}_params_{s}'] - one[f'roll0_params_{s}']).max()
             for s in REPORT_AFTER]
    print(f'| {label} | ' + ' | '.join(f'{c:.1e}' for c in cells) + ' |')
  return one['roll0_losses'], two['roll0_losses']


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--out')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--process_id', type=int, default=0)
  parser.add_argument('--port', type=int)
  parser.add_argument('--data_dir')
  parser.add_argument('--runs', default='roll0', type=lambda s: tuple(s.split(',')))
  parser.add_argument('--steps', type=int, default=STEPS)
  args = parser.parse_args()
  if args.worker:
    return worker(args)
  with tempfile.TemporaryDirectory() as tmp:
    sys.path[:0] = [ROOT]
    from experiments import tiny_tfds  # the multi-host test's data
    tiny_tfds.store('cifar10', os.path.join(tmp, 'tfds'), {
        'train': (np.arange(NUM_TRAIN), np.arange(NUM_TRAIN) % 10),
        'test': (np.arange(1000, 1010), np.arange(10))})
    losses = {dtype: compare(dtype, tmp) for dtype in ('float32', 'float64')}
  print('\n## per-step training loss: one process (4 devices) | two processes, difference\n')
  print('| step | float32 one | float32 two | diff | float64 one | float64 two | diff |')
  print('|---|---|---|---|---|---|---|')
  for step in range(STEPS):
    cells = []
    for dtype in ('float32', 'float64'):
      a, b = losses[dtype]
      cells += [f'{a[step]:.9f}', f'{b[step]:.9f}', f'{b[step] - a[step]:.1e}']
    print(f'| {step + 1} | ' + ' | '.join(cells) + ' |')


if __name__ == '__main__':
  main()
