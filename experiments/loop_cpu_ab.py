"""CPU-seconds of whole training runs: this checkout against an earlier git revision, A/B.

Each run is `python main.py ...` in a fresh process with an empty compilation cache, as a new
user's first run; its CPU time is the process tree's user + system time (the kernel's
accounting of waited-for children), beside wall time:
  digits        configs/digits.py as the README runs it (30 epochs of 1,437 8x8 images)
  cifar-shaped  configs/cifar.py:densenet40_k12,c10+,quick (L=7, shift and flip augmentation)
                for 3 epochs of a synthetic 5,000-image CIFAR-10 built here in tfds's format
The sides alternate (A B B A A B ...), so that the drifts of a shared machine fall on both;
repeat i runs with --config.seed=i on both sides, and the table gives the final test accuracy.

  python experiments/loop_cpu_ab.py --before REV [--repeats 3]
"""

import argparse
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {
    'digits': ['--config=configs/digits.py'],
    'cifar-shaped': ['--config=configs/cifar.py:densenet40_k12,c10+,quick',
                     '--config.num_epochs=3', '--config.lr_decay_epochs=(1.5,2.25)'],
}


def extract(revision: str, into: str) -> str:
  archive = subprocess.run(['git', '-C', ROOT, 'archive', revision], capture_output=True,
                           check=False)
  if archive.returncode:
    sys.exit(f'--before {revision}: {archive.stderr.decode().strip()}')
  with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
    tar.extractall(into, filter='data')
  return into


def cifar_shaped(data_dir: str):
  """A 5,000 + 1,000 image cifar10 in data_dir (random pixels, as the tests' fixtures)."""
  sys.path[:0] = [ROOT]
  from experiments import tiny_tfds  # pylint: disable=import-outside-toplevel
  train, test = np.arange(5000), np.arange(5000, 6000)
  tiny_tfds.store('cifar10', data_dir, {'train': (train, train % 10),
                                         'test': (test, test % 10)})


def run(code_root: str, args: list, workdir: str) -> tuple:
  """(CPU seconds, wall seconds, final test accuracy) of one training run."""
  before = resource.getrusage(resource.RUSAGE_CHILDREN)
  start = time.perf_counter()
  done = subprocess.run([sys.executable, 'main.py', *args, f'--workdir={workdir}',
                         f'--compilation_cache_dir={workdir}-xla'],
                        cwd=code_root, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - start
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  if done.returncode:
    sys.exit(f'{code_root}: main.py {" ".join(args)} failed: {done.stderr[-2000:]}')
  cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
  with open(os.path.join(workdir, 'results.json')) as f:
    accuracy = 1 - json.load(f)['final']['eval']['test']['top1_error']
  return cpu, wall, accuracy


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--before', required=True, help='git revision to compare with')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--runs', default=','.join(RUNS), help=f'comma-separated: {list(RUNS)}')
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    sides = {'after': ROOT, 'before': extract(args.before, os.path.join(tmp, 'before'))}
    data_dir = os.path.join(tmp, 'tfds')
    cifar_shaped(data_dir)
    env_args = {'digits': [], 'cifar-shaped': [f'--config.data_dir={data_dir}']}
    figures = {}
    for name in args.runs.split(','):
      for repeat in range(args.repeats):
        order = ('after', 'before') if repeat % 2 == 0 else ('before', 'after')
        for side in order:
          workdir = os.path.join(tmp, f'{name}-{side}-{repeat}')
          figure = run(sides[side], [*RUNS[name], *env_args[name], f'--config.seed={repeat}'],
                       workdir)
          figures.setdefault((name, side), []).append(figure)
          print(f'{name} {side} seed {repeat}: {figure[0]:.1f} CPU-s, {figure[1]:.1f} s wall, '
                f'test accuracy {100 * figure[2]:.2f}%', flush=True)
  print(f'\n| run | code | CPU-s (median of {args.repeats}) | CPU-s, seeds 0.. | wall s (median) '
        '| test accuracy %, seeds 0.. (median) |')
  print('|---|---|---|---|---|---|')
  for (name, side), values in figures.items():
    cpus, walls, accuracies = zip(*values)
    print(f'| {name} | {side if side == "after" else f"before ({args.before})"} | '
          f'{statistics.median(cpus):.1f} | {", ".join(f"{c:.1f}" for c in cpus)} | '
          f'{statistics.median(walls):.1f} | {", ".join(f"{100 * a:.2f}" for a in accuracies)} '
          f'({100 * statistics.median(accuracies):.2f}) |')


if __name__ == '__main__':
  main()
