"""Sweeps: a base config plus a product and/or zip of override lists, run point by point.

  python experiments/sweep.py --config=configs/digits.py --root=runs/digits_sweep \
      --sweep='model.bottleneck=False,True + model.compression=1.0,0.5 x model.depth=10,16'
  python experiments/sweep.py --sweep_file=experiments/sweeps/figure4.py --root=runs/figure4
  add --print to print one main.py command per point (for a cluster launcher) and run nothing,
  or --collect_only to only gather the finished points' results.

Spec: `KEY=V1,V2,...` is a list of values of one config field (KEY as in main.py's
--config.KEY overrides, e.g. lr_decay_epochs=(1,2),(2,3); `config` sweeps over config files,
but a config argument with commas needs a sweep file); ` + ` zips lists of equal length (their
i-th values go together); ` x ` multiplies the zipped groups, and so do repeated --sweep flags.
A one-value list is a fixed override for every point. A sweep file is a Python file with CONFIG
(the base config, as --config; --config wins) and AXES, a list of {KEY: [values]} dicts, each
dict a zip, the dicts multiplied; its values may contain commas
(`configs/cifar.py:densenet40_k12,c10+`). --sweep's groups are multiplied with the file's.
Config paths are relative to the current folder.

Every point is checked (unknown keys, bad values, bad config arguments) before anything runs.
Each point runs as `python main.py --config=CONFIG --workdir=ROOT/NAME --config.KEY=VALUE ...`,
NAME made of the values that vary; a point whose results.json exists is skipped, so a stopped
sweep resumes (a half-trained point resumes from its checkpoint). Changing a fixed override does
not change NAME: use a new --root. Then all finished points are gathered into ROOT/results.csv
and ROOT/results.md and plotted (ROOT/error_vs_params.png, ROOT/error_vs_flops.png).
"""

import argparse
import csv
import dataclasses
import itertools
import json
import os
import re
import runpy
import shlex
import subprocess
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # before TensorFlow loads: no INFO banners

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # densenet_jax, and `configs` for the config files
# pylint: disable=wrong-import-position
from densenet_jax import analysis, config_loading, config_validation
MAIN = os.path.join(REPO, 'main.py')
SYNTAX = 'KEY=V1,V2,... lists joined by " + " (zip) and " x " (product)'


@dataclasses.dataclass(frozen=True)
class Point:
  name: str  # also the workdir under the sweep's root
  config: str  # main.py's --config
  overrides: tuple  # ((key, value as a command-line string), ...)

  def command(self, root: str, python: str = sys.executable, main: str = MAIN) -> list:
    return [python, main, f'--config={self.config}', f'--workdir={os.path.join(root, self.name)}',
            *(f'--config.{key}={value}' for key, value in self.overrides)]


def parse_spec(spec: str) -> list:
  """'a=1,2 + b=3,4 x c=5,6' -> [{'a': ['1', '2'], 'b': ['3', '4']}, {'c': ['5', '6']}]."""
  axes = []
  for group in re.split(r'\s+x\s+', spec.strip()):
    axis = {}
    for term in re.split(r'\s+\+\s+', group):
      key, equals, values = term.partition('=')
      if not equals or not re.fullmatch(r'[A-Za-z_][\w.]*', key):
        raise ValueError(f'sweep term {term!r} is not {SYNTAX}')
      if key in axis:
        raise ValueError(f'sweep key {key!r} appears twice')
      axis[key] = _split_values(values)
    axes.append(axis)
  return axes


def _split_values(text: str) -> list:
  """Splits at the commas outside brackets: '(1,2),(3,4)' -> ['(1,2)', '(3,4)']."""
  values, depth, current = [], 0, ''
  for char in text:
    if char == ',' and depth == 0:
      values.append(current)
      current = ''
      continue
    depth += (char in '([') - (char in ')]')
    current += char
  return values + [current]


def load_sweep_file(path: str) -> tuple:
  """(CONFIG or None, AXES) of a sweep file."""
  if not os.path.isfile(path):
    raise ValueError(f'sweep file {path!r} does not exist')
  module = runpy.run_path(path)
  if not isinstance(module.get('AXES'), list):
    raise ValueError(f'sweep file {path!r} has no AXES list of {{KEY: [values]}} dicts')
  return module.get('CONFIG'), module['AXES']


def check_axes(axes: list):
  """Raises ValueError for an empty list, zipped lists of unequal lengths or a repeated key."""
  seen = set()
  for axis in axes:
    if not isinstance(axis, dict) or not axis:
      raise ValueError(f'sweep group {axis!r} is not a non-empty {{KEY: [values]}} dict')
    for key, values in axis.items():
      if key in seen:
        raise ValueError(f'sweep key {key!r} appears twice')
      seen.add(key)
      if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f'sweep key {key!r} has an empty value list {values!r}; give one or more '
                         'values')
      if any(isinstance(v, str) and not v.strip() for v in values):
        raise ValueError(f'sweep key {key!r} has an empty value in {values!r}')
    lengths = {key: len(values) for key, values in axis.items()}
    if len(set(lengths.values())) > 1:
      raise ValueError(f'zipped lists differ in length: {lengths}; zip (" + ") needs equal '
                       'lengths, use " x " for a product')


def _flag_value(value) -> str:
  return value if isinstance(value, str) else repr(value)


def _slug(key: str, value: str) -> str:
  if key == 'config':  # configs/cifar.py:densenet40_k12,c10+ -> cifar-densenet40_k12-c10+
    path, _, arg = value.partition(':')
    text = '-'.join(filter(None, [os.path.splitext(os.path.basename(path))[0],
                                  arg.replace(',', '-')]))
  else:
    text = f'{key}={value}'
  return re.sub(r'[^\w.+=-]', '-', text)


def make_points(config, axes: list) -> list:
  """The sweep's points, in order (the last group varies fastest)."""
  check_axes(axes)
  varying = [key for axis in axes for key, values in axis.items() if len(values) > 1]
  points = []
  for combination in itertools.product(*(range(len(next(iter(a.values())))) for a in axes)):
    values = {key: _flag_value(vals[i]) for axis, i in zip(axes, combination)
              for key, vals in axis.items()}
    point_config = values.pop('config', config)
    if not point_config:
      raise ValueError('no base config: give --config or CONFIG in the sweep file')
    name = '_'.join(_slug(key, values.get(key, point_config)) for key in varying) or 'base'
    points.append(Point(name, point_config, tuple(values.items())))
  names = [p.name for p in points]
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise ValueError(f'several points share the workdir name(s) {repeated}: repeated values?')
  return points


def _last_line(error: Exception) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def check_points(points: list) -> list:
  """Each point's ConfigDict, as main.py will build it; ValueError naming the first bad one.

  Checks the keys, the values' types and every field main.py checks (the model included), for
  one device (the batch sizes' divisibility by the device count is left to main.py).
  """
  bases, configs = {}, []
  for point in points:
    if point.config not in bases:
      try:
        bases[point.config] = config_loading.load(point.config)
      except Exception as e:  # config_flags raises several types for a bad file or argument
        raise ValueError(f'config {point.config!r}: {_last_line(e)}') from e
    for key, _ in point.overrides:
      reason = config_validation.unknown_field(bases[point.config], key)
      if reason:
        raise ValueError(f'unknown config key {key!r} ({point.config}): {reason}')
    try:
      configs.append(config_loading.load(point.config, point.overrides))
      config_validation.validate(configs[-1], device_count=1)
    except Exception as e:
      raise ValueError(f'point {point.name}: {_last_line(e)}') from e
  return configs


def _results_path(root: str, point: Point) -> str:
  return os.path.join(root, point.name, 'results.json')


def run(points: list, root: str) -> list:
  """Runs the points without results.json, one after another; returns the names that failed."""
  failed = []
  for i, point in enumerate(points, 1):
    if os.path.exists(_results_path(root, point)):
      print(f'[{i}/{len(points)}] {point.name}: done, skipped', flush=True)
      continue
    command = point.command(root)
    print(f'[{i}/{len(points)}] {point.name}: {shlex.join(command)}', flush=True)
    if subprocess.run(command, check=False).returncode:
      failed.append(point.name)
  return failed


def reported_error(results: dict) -> tuple:
  """(error %, split): the paper's protocol.

  With a held-out validation split (SVHN): the test error of the checkpoint with the lowest
  validation error. Otherwise the final error on the one eval split (test; ImageNet: validation).
  """
  final, best = results['final']['eval'], results['best']['eval']
  if 'validation' in final and 'test' in final:
    return 100 * best['test']['top1_error'], 'test'
  split = next(iter(final))
  return 100 * final[split]['top1_error'], split


def _metrics(prefix: str, evals: dict) -> dict:
  row = {}
  for split, metrics in evals.items():
    for name, value in metrics.items():
      if name.endswith('error'):
        row[f'{prefix}_{split}_{name}_pct'] = 100 * value
      elif name == 'loss':
        row[f'{prefix}_{split}_loss'] = value
  return row


def result_row(point: Point, config, results: dict, gmacs: float) -> dict:
  """The CSV row of a finished point: the network its run built (results.json's architecture),
  its errors, and the paper's number only where that network is the paper's row."""
  error, split = reported_error(results)
  architecture, paper = results['architecture'], results['paper']
  return {
      'point': point.name, 'config': point.config, **dict(point.overrides),
      'model': architecture['name'], 'depth': architecture['depth'],
      'growth_rate': architecture['growth_rate'], 'bottleneck': architecture['bottleneck'],
      'compression': architecture['compression'], 'variant': architecture['variant'],
      'dataset': config.dataset, 'augment': config.augment, 'num_epochs': config.num_epochs,
      'num_params': results['num_params'], 'gmacs': gmacs,
      'error_pct': error, 'error_split': split,
      'paper_error_pct': paper['top1_error_pct'] if paper else '',
      'paper_source': paper['source'] if paper else '',
      'final_epoch': results['final']['epoch'],
      **_metrics('final', results['final']['eval']), **_metrics('best', results['best']['eval']),
      'wall_time_sec': results['wall_time_sec'],
  }


def multiply_adds(config) -> float:
  """G multiply-adds of one forward pass at the size the run is fed (3 input channels assumed)."""
  # TensorFlow (input pipeline) loads only here, so checking and --print stay fast.
  # pylint: disable=import-outside-toplevel
  from densenet_jax import costs, run_setup, runtime, settings
  runtime.keep_tensorflow_off_accelerators()
  run = settings.RunSettings.from_config(config)
  info = run_setup.open_data(run.data).info
  model = run_setup.build_model(run.model, info.num_classes)
  return costs.count_multiply_adds(model, info.image_shape[0]) / 1e9


def collect(points: list, configs: list, root: str) -> list:
  """A row per finished point (see result_row); points without results.json are left out."""
  rows = []
  for point, config in zip(points, configs):
    if os.path.exists(_results_path(root, point)):
      with open(_results_path(root, point)) as f:
        results = json.load(f)
      rows.append(result_row(point, config, results, multiply_adds(config)))
  return rows


def write_csv(rows: list, path: str):
  columns = list(dict.fromkeys(key for row in rows for key in row))
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)


def markdown_table(rows: list) -> str:
  lines = ['| point | variant | dataset | params | GFLOPs | error % | paper % | epochs | time |',
           '|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    paper = f'{r["paper_error_pct"]:.2f}' if r['paper_error_pct'] != '' else '-'
    lines.append(f'| {r["point"]} | {r["variant"]} | {r["dataset"]} | {r["num_params"]:,} | '
                 f'{r["gmacs"]:.3g} | {r["error_pct"]:.2f} ({r["error_split"]}) | {paper} | '
                 f'{r["final_epoch"]:g} | {r["wall_time_sec"] / 60:.1f} min |')
  return '\n'.join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], epilog=SYNTAX)
  parser.add_argument('--config', help='base config, as main.py\'s --config (FILE[:ARG])')
  parser.add_argument('--sweep', action='append', default=[],
                      help='e.g. "model.growth_rate=12,24 x model.depth=40,100"; repeatable')
  parser.add_argument('--sweep_file', help='a Python sweep file (experiments/sweeps/*.py)')
  parser.add_argument('--root', required=True, help='folder of the points\' workdirs and results')
  parser.add_argument('--print', action='store_true', help='print the commands, run nothing')
  parser.add_argument('--collect_only', action='store_true', help='only gather the results')
  args = parser.parse_args(argv)
  try:
    config, axes = load_sweep_file(args.sweep_file) if args.sweep_file else (None, [])
    axes = axes + [axis for spec in args.sweep for axis in parse_spec(spec)]
    if not axes:
      raise ValueError('nothing to sweep: give --sweep and/or --sweep_file')
    points = make_points(args.config or config, axes)
    configs = check_points(points)
  except ValueError as e:
    parser.error(str(e))
  if args.print:
    for point in points:
      print(shlex.join(point.command(args.root, 'python', os.path.relpath(MAIN))))
    return
  # This process only counts FLOPs: the accelerators are left to the points' main.py processes
  # (this setting is not an environment variable, so they do not inherit it).
  jax.config.update('jax_platforms', 'cpu')
  failed = [] if args.collect_only else run(points, args.root)
  rows = collect(points, configs, args.root)
  print(f'{len(rows)} of {len(points)} points finished.')
  if rows:
    write_csv(rows, os.path.join(args.root, 'results.csv'))
    table = markdown_table(rows)
    with open(os.path.join(args.root, 'results.md'), 'w') as f:
      f.write(table + '\n')
    print(table)
    print('\n'.join([os.path.join(args.root, 'results.csv'), os.path.join(args.root, 'results.md'),
                     *analysis.render_sweep(os.path.join(args.root, 'results.csv'))]))
  if failed:
    sys.exit(f'{len(failed)} point(s) failed: {", ".join(failed)}')


if __name__ == '__main__':
  main()
