"""Does the test suite catch the bugs this codebase could have? Plants one bug at a time in a
copy of the repository and runs the suite on it; every planted bug must make it fail.

  python experiments/mutation_check.py                  # every bug, the README's test command
  python experiments/mutation_check.py --only nesterov  # bugs whose name contains 'nesterov'
  python experiments/mutation_check.py --tree DIR       # the bugs planted in another checkout
                                                        # (an older commit: before/after)
  python experiments/mutation_check.py --pytest_args='-n 0' --first=tests/test_steps.py,...
                                                        # one process, these files first

Each bug is a text edit of the source (densenet_jax/ only, never tests/): an optimizer,
architecture, data, training or prediction mistake that still runs. The suite runs with `-x`:
it stops at the first failure, so a caught bug costs the tests that run before it. Which run
first is only a matter of time (the whole suite fails either way): `--durations LOG` (what
`pytest --durations=0` printed) runs the test files shortest first, `--first` names files to
run before those. With xdist (`-n 2`) a worker finishes the file it holds after another fails,
so `-n 0` (one process) stops sooner.
Prints a markdown table: bug, caught or SURVIVED, the first failing test, seconds; exits 1 if
any bug survived. (That the unchanged tree passes is what CI shows.)
"""

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Bug:
  name: str
  kind: str
  edits: tuple  # ((path, old text, new text), ...); old must occur in the file

  def plant(self, tree: str):
    for path, old, new in self.edits:
      full = os.path.join(tree, path)
      with open(full) as f:
        text = f.read()
      if old not in text:
        raise SystemExit(f'{self.name}: {path} has no {old!r} (the code moved: update the bug)')
      with open(full, 'w') as f:
        f.write(text.replace(old, new))


M, S, IP = 'densenet_jax/models.py', 'densenet_jax/steps.py', 'densenet_jax/input_pipeline.py'
BUGS = (
    Bug('momentum halved', 'optimizer',
        ((S, 'momentum=momentum, nesterov=True', 'momentum=momentum / 2, nesterov=True'),)),
    Bug('nesterov off (heavy ball)', 'optimizer',
        ((S, 'nesterov=True)', 'nesterov=False)'),)),
    Bug('weight decay 10x smaller', 'optimizer',
        ((S, 'optax.add_decayed_weights(weight_decay)',
          'optax.add_decayed_weights(weight_decay / 10)'),)),
    Bug('compression rounds up', 'architecture',
        ((M, 'int(math.floor(self.compression * channels))',
          'int(math.ceil(self.compression * channels))'),)),
    Bug('bottleneck width 2k instead of 4k', 'architecture',
        ((M, 'self.unit(4 * self.growth_rate, 1', 'self.unit(2 * self.growth_rate, 1'),
         (M, 'UnitVariables(self.in_features, 4 * k, 1, dtype)',
          'UnitVariables(self.in_features, 2 * k, 1, dtype)'),
         (M, 'width = 4 * k if', 'width = 2 * k if'),
         ('densenet_jax/shared_block.py', '(((4 * self.growth_rate, 1),)',
          '(((2 * self.growth_rate, 1),)'))),
    Bug('BN epsilon 1e-3', 'architecture', ((M, 'BN_EPSILON = 1e-5', 'BN_EPSILON = 1e-3'),)),
    Bug('BN momentum 0.99 (torch 0.01)', 'architecture',
        ((M, 'BN_MOMENTUM = 0.9', 'BN_MOMENTUM = 0.99'),)),
    Bug('ImageNet max-pool padded on one side', 'architecture',
        ((M, 'nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))',
          'nn.max_pool(x, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)))'),)),
    Bug('CIFAR translation pads with zeros, not the mean', 'data',
        (('densenet_jax/datasets.py', 'translate=CIFAR_PAD, pad_with_mean=True',
          'translate=CIFAR_PAD, pad_with_mean=False'),)),
    Bug('same shuffle every epoch', 'data',
        ((IP, 'seed=_epoch_seed(seed, epoch)', 'seed=_epoch_seed(seed, 0)'),)),
    Bug('one augmentation key for every example', 'data',
        (('densenet_jax/augment.py', 'jax.random.fold_in(jax.random.fold_in(base, e), i)',
          'jax.random.fold_in(jax.random.fold_in(base, e), 0 * i)'),)),
    Bug('eval center crop: odd margin on the other side', 'data',
        (('densenet_jax/preprocessing.py', '(shape[0] - size + 1) // 2, (shape[1] - size + 1) // 2',
          '(shape[0] - size) // 2, (shape[1] - size) // 2'),)),
    Bug('hold-out takes the first examples, not the last', 'data',
        ((IP, "start, stop = (cut, sizes['train']) if validation else (0, cut)",
          "start, stop = (0, holdout.last) if validation else (holdout.last, sizes['train'])"),)),
    Bug('every process reads shard 0', 'data',
        ((IP, 'lo = subset.size * process_index // process_count',
          'lo = subset.size * 0 // process_count'),
         (IP, 'hi = subset.size * (process_index + 1) // process_count',
          'hi = subset.size * 1 // process_count'))),
    Bug('learning-rate decay one step late', 'training',
        ((S, 'int(round(e * steps_per_epoch)): decay_factor',
          'int(round(e * steps_per_epoch)) + 1: decay_factor'),)),
    Bug('best checkpoint: the highest error', 'training',
        (('densenet_jax/run_setup.py', 'return min(reversed(candidates),',
          'return max(reversed(candidates),'),)),
    Bug('resume skips one batch too many', 'training',
        ((IP, '.skip(step_in_epoch * local_batch)', '.skip((step_in_epoch + 1) * local_batch)'),)),
    Bug('BN statistics per device, not cross-replica', 'training',
        ((M, 'axis_name=self.axis_name)', 'axis_name=None)'),
         (M, 'axis_name=self.axis_name, name=', 'axis_name=None, name='))),
    Bug('predict ranks the lowest logits first', 'prediction',
        (('densenet_jax/predict.py', 'np.argsort(-logits, axis=1', 'np.argsort(logits, axis=1'),)),
    Bug('folder class names in reverse order', 'prediction',
        (('densenet_jax/folder_listing.py', 'class_names = tuple(_class_dirs(train_dir))',
          'class_names = tuple(reversed(_class_dirs(train_dir)))'),)),
)


def copy_tree(source: str, destination: str):
  """The files git knows of (tracked or not ignored), as a checkout has them."""
  files = subprocess.run(['git', 'ls-files', '--cached', '--others', '--exclude-standard', '-z'],
                         cwd=source, check=True, capture_output=True, text=True).stdout
  for path in filter(None, files.split('\0')):
    if os.path.isfile(os.path.join(source, path)):
      os.makedirs(os.path.dirname(os.path.join(destination, path)), exist_ok=True)
      shutil.copy2(os.path.join(source, path), os.path.join(destination, path))


SHORTEST_FIRST = """
import json, os
import pytest
SECONDS = json.load(open(os.environ['MUTATION_CHECK_DURATIONS']))
FIRST = [f for f in os.environ.get('MUTATION_CHECK_FIRST', '').split(',') if f]
@pytest.hookimpl(trylast=True)  # after the suite's own order (conftest.py)
def pytest_collection_modifyitems(items):
  files = {}
  for item in items:
    files[item.path] = files.get(item.path, 0) + SECONDS.get(item.nodeid, 60)
  first = lambda item: next((i for i, f in enumerate(FIRST) if item.nodeid.startswith(f + '::')),
                            len(FIRST))
  # each file's tests together, as they were
  items.sort(key=lambda item: (first(item), files[item.path]))
"""


def durations(log: str) -> dict:
  """{test id: seconds} of the call phases `pytest --durations=0` printed."""
  seconds = {}
  for match in re.finditer(r'^([\d.]+)s (?:call|setup)\s+(\S+)$', open(log).read(), re.M):
    seconds[match[2]] = seconds.get(match[2], 0) + float(match[1])
  return seconds


FAILED = re.compile(r'^(?:FAILED|ERROR) (\S+)', re.M)


def run_suite(tree: str, pytest_args: list, order: str = None, first: str = '') -> tuple:
  """(passed, first failing test or its output's end, seconds) of the suite in `tree`; `order`:
  a JSON file of test durations to run them shortest first, after the files `first` names."""
  start = time.time()
  env = dict(os.environ, PYTHONDONTWRITEBYTECODE='1')
  if order:
    with open(os.path.join(tree, '_shortest_first.py'), 'w') as f:
      f.write(SHORTEST_FIRST)
    pytest_args = ['-p', '_shortest_first', *pytest_args]
    env.update(MUTATION_CHECK_DURATIONS=order, MUTATION_CHECK_FIRST=first, PYTHONPATH=tree)
  proc = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-x', '-p', 'no:cacheprovider',
                         *pytest_args, 'tests'], cwd=tree, env=env, capture_output=True,
                        text=True)
  failed = FAILED.findall(proc.stdout)
  return proc.returncode == 0, (failed[0] if failed else proc.stdout[-300:]), time.time() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tree', default=ROOT, help='checkout to plant the bugs in')
  parser.add_argument('--only', default='', help='bugs whose name contains this')
  parser.add_argument('--pytest_args', default='-n 2', help='more pytest arguments')
  parser.add_argument('--durations', help="a `pytest --durations=0` log: shortest tests first")
  parser.add_argument('--first', default='', help='test files to run first, comma-separated')
  args = parser.parse_args()
  order = None
  if args.durations or args.first:
    order = os.path.join(tempfile.mkdtemp(), 'durations.json')
    with open(order, 'w') as f:
      json.dump(durations(args.durations) if args.durations else {}, f)
  bugs = [b for b in BUGS if args.only in b.name]
  if not bugs:
    raise SystemExit(f'--only={args.only!r}: no such bug; bugs: ' +
                     ', '.join(b.name for b in BUGS))
  print('| bug | kind | result | first failing test | s |\n|---|---|---|---|---|', flush=True)
  survived = []
  for bug in bugs:
    with tempfile.TemporaryDirectory() as tree:
      copy_tree(args.tree, tree)
      bug.plant(tree)
      passed, first, seconds = run_suite(tree, args.pytest_args.split(), order, args.first)
    if passed:
      survived.append(bug.name)
    print(f'| {bug.name} | {bug.kind} | {"SURVIVED" if passed else "caught"} | '
          f'{"" if passed else "`" + first + "`"} | {seconds:.0f} |', flush=True)
  print(f'\n{len(bugs) - len(survived)} of {len(bugs)} bugs caught' +
        (f'; survived: {", ".join(survived)}' if survived else ''))
  sys.exit(1 if survived else 0)


if __name__ == '__main__':
  main()
