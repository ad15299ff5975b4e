"""The training iterator, `Data.train_iterator`, of this checkout against a git revision's.

Per side, in its own process, on a CIFAR-10 of random 32x32 images stored as tfds stores CIFAR
(PNG), batches of 256 on one device, taken one per --step_ms (a training step's time; 0: as
fast as the pipeline goes), after the first batch:
  images/s         while iterating for --seconds
  CPU-ms/image     the process's CPU time over the images
  release s        how long dropping the iterator then takes (what a run's end, a stop and
                   each eval pass wait for: with tf.data's autotuning, until its model thread
                   wakes from a sleep that doubles up to 60 s)
The sides alternate, --trials times each.

  python experiments/iterator_benchmark.py --before REV [--seconds 8] [--step_ms 20] [--trials 3]
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 256
NUM_TRAIN = 8192


def measure(data_dir: str, seconds: float, step_ms: float) -> dict:
  # pylint: disable-next=import-outside-toplevel (the side's densenet_jax, after PYTHONPATH)
  from densenet_jax import datasets, devices, input_pipeline
  data = input_pipeline.Data(datasets.DataOptions(dataset='cifar10', data_dir=data_dir))
  batches = data.train_iterator(devices.Topology.of_this_process(BATCH))
  next(batches)
  cpu, start = time.process_time(), time.time()
  count = 0
  while time.time() - start < seconds:
    count += next(batches)['label'].size
    time.sleep(step_ms / 1000)
  wall, cpu = time.time() - start, time.process_time() - cpu
  released = time.time()
  del batches
  return {'images_per_sec': count / wall, 'cpu_ms_per_image': 1000 * cpu / count,
          'release_sec': time.time() - released}


def run_side(code_root: str, data_dir: str, seconds: float, step_ms: float) -> dict:
  from experiments import pipeline_benchmark  # pylint: disable=import-outside-toplevel
  env = dict(os.environ, PYTHONPATH=f'{code_root}{os.pathsep}{ROOT}', TF_CPP_MIN_LOG_LEVEL='2',
             JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES='1')
  command = [sys.executable, os.path.abspath(__file__), '--measure', data_dir,
             '--seconds', str(seconds), '--step_ms', str(step_ms)]
  return pipeline_benchmark.result_of(command, f'measuring {code_root}', env)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--before', help='git revision to compare with (required)')
  parser.add_argument('--seconds', type=float, default=8.0)
  parser.add_argument('--step_ms', type=float, default=20.0)
  parser.add_argument('--trials', type=int, default=3)
  parser.add_argument('--measure', metavar='DATA_DIR', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.measure:
    print('RESULT ' + json.dumps(measure(args.measure, args.seconds, args.step_ms)), flush=True)
    return
  if not args.before:
    parser.error('--before REV is required')
  sys.path.insert(0, ROOT)  # not in --measure, whose densenet_jax is the side's
  # pylint: disable-next=import-outside-toplevel
  from experiments import pipeline_benchmark, tiny_tfds
  with tempfile.TemporaryDirectory() as data_dir, tempfile.TemporaryDirectory() as folder:
    ids = np.arange(NUM_TRAIN)
    tiny_tfds.store('cifar10', data_dir, {'train': (ids, ids % 10),
                                          'test': (ids[:100], ids[:100] % 10)})
    sides = {'this checkout': ROOT,
             f'before ({args.before})': pipeline_benchmark.extract(args.before, folder)}
    print(f'{len(os.sched_getaffinity(0))} CPU cores; iterating {args.seconds:g} s a trial, '
          f'a batch every {args.step_ms:g} ms\n')
    print('| code | trial | images/s | CPU-ms/image | release s |\n|---|---|---|---|---|')
    for trial in range(1, args.trials + 1):
      for side, code_root in sides.items():
        r = run_side(code_root, data_dir, args.seconds, args.step_ms)
        print(f'| {side} | {trial} | {r["images_per_sec"]:,.0f} | {r["cpu_ms_per_image"]:.3f} '
              f'| {r["release_sec"]:.2f} |', flush=True)


if __name__ == '__main__':
  main()
