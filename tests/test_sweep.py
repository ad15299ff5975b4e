"""experiments/sweep.py: spec parsing, checks before any run, and a real resumable sweep over a
folder of images."""

import csv
import json
import os
import shlex

import jax
import pytest

from densenet_jax import architectures, train
from densenet_jax.settings import RunSettings
from experiments import sweep, tiny_tfds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = 'configs/digits.py'


def test_spec_zips_with_plus_and_multiplies_with_x():
  axes = sweep.parse_spec('model.bottleneck=False,True + model.compression=1.0,0.5 '
                          'x model.depth=10,16 x lr_decay_epochs=(1,2),(2,3)')
  assert axes == [{'model.bottleneck': ['False', 'True'], 'model.compression': ['1.0', '0.5']},
                  {'model.depth': ['10', '16']}, {'lr_decay_epochs': ['(1,2)', '(2,3)']}]
  points = sweep.make_points(DIGITS, axes)
  assert [dict(p.overrides) for p in points[:3]] == [
      {'model.bottleneck': 'False', 'model.compression': '1.0', 'model.depth': '10',
       'lr_decay_epochs': '(1,2)'},
      {'model.bottleneck': 'False', 'model.compression': '1.0', 'model.depth': '10',
       'lr_decay_epochs': '(2,3)'},
      {'model.bottleneck': 'False', 'model.compression': '1.0', 'model.depth': '16',
       'lr_decay_epochs': '(1,2)'}]
  assert len(points) == 2 * 2 * 2
  assert len({p.name for p in points}) == 8
  assert points[-1].name == ('model.bottleneck=True_model.compression=0.5_model.depth=16_'
                             'lr_decay_epochs=-2-3-')


def test_one_value_lists_are_fixed_overrides_left_out_of_the_names():
  points = sweep.make_points(DIGITS, sweep.parse_spec('model.depth=10,16 x num_epochs=3'))
  assert [p.name for p in points] == ['model.depth=10', 'model.depth=16']
  assert all(dict(p.overrides)['num_epochs'] == '3' for p in points)
  command = points[0].command('runs/s')
  assert command[2:] == ['--config=configs/digits.py', '--workdir=runs/s/model.depth=10',
                         '--config.model.depth=10', '--config.num_epochs=3']


def test_sweep_file_values_may_hold_commas_and_python_values(tmp_path):
  path = tmp_path / 'file.py'
  path.write_text("AXES = [{'config': ['configs/cifar.py:densenet40_k12,c10+',\n"
                  "                    'configs/cifar.py:densenet_bc100_k12,svhn']},\n"
                  "        {'model.dtype': ['bfloat16'], 'lr_decay_epochs': [(1, 2.5)]}]\n")
  config, axes = sweep.load_sweep_file(str(path))
  assert config is None
  points = sweep.make_points(None, axes)
  assert [p.name for p in points] == ['cifar-densenet40_k12-c10+', 'cifar-densenet_bc100_k12-svhn']
  assert points[1].config == 'configs/cifar.py:densenet_bc100_k12,svhn'
  assert dict(points[1].overrides) == {'model.dtype': 'bfloat16', 'lr_decay_epochs': '(1, 2.5)'}
  configs = sweep.check_points(points)
  assert configs[1].model.bottleneck and configs[1].dataset == 'svhn_cropped'
  assert configs[0].lr_decay_epochs == (1, 2.5) and configs[0].model.dtype == 'bfloat16'


@pytest.mark.parametrize('spec,message', [
    ('model.nope=1,2', "unknown config key 'model.nope'"),
    ('model.depth=', "'model.depth' has an empty value"),
    ('model.depth=10,,16', "'model.depth' has an empty value"),
    ('model.depth=10,16 + model.growth_rate=4,6,8', 'zipped lists differ in length'),
    ('model.depth=10 x model.depth=16', "'model.depth' appears twice"),
    ('model.depth 10', 'is not KEY=V1,V2'),
    ('model.depth=ten', "invalid literal for int() with base 10: 'ten'"),
    ('model.depth=10,11', 'depth=11 is not a CIFAR/SVHN DenseNet'),
    ('num_epochs=2', 'config.lr_decay_epochs=(15, 22.5): must be increasing epochs'),
])
def test_bad_specs_fail_before_any_run(tmp_path, capsys, spec, message):
  root = tmp_path / 'sweep'
  with pytest.raises(SystemExit) as exit_info:
    sweep.main([f'--config={DIGITS}', f'--root={root}', f'--sweep={spec}'])
  assert exit_info.value.code == 2
  assert message in capsys.readouterr().err
  assert not root.exists()


def test_bad_sweep_files_and_configs_are_clear_errors(tmp_path):
  path = tmp_path / 'file.py'
  path.write_text("AXES = [{'model.depth': []}]\n")
  with pytest.raises(ValueError, match=r"'model.depth' has an empty value list \[\]"):
    sweep.make_points(DIGITS, sweep.load_sweep_file(str(path))[1])
  path.write_text("SWEEP = 'model.depth=10'\n")
  with pytest.raises(ValueError, match='has no AXES list'):
    sweep.load_sweep_file(str(path))
  with pytest.raises(ValueError, match='no base config'):
    sweep.make_points(None, sweep.parse_spec('model.depth=10,16'))
  with pytest.raises(ValueError, match="model 'nope' is not in Table 2"):
    sweep.check_points(sweep.make_points('configs/cifar.py:nope,c10', [{'seed': [1]}]))


def test_reported_error_follows_the_papers_protocol():
  def results(final, best):
    return {'final': {'eval': final}, 'best': {'eval': best}}
  split = lambda e: {'top1_error': e, 'loss': 1.0}  # pylint: disable=unnecessary-lambda-assignment
  # SVHN: the test error of the checkpoint with the lowest validation error.
  svhn = results({'validation': split(0.03), 'test': split(0.02)},
                 {'validation': split(0.01), 'test': split(0.025)})
  assert sweep.reported_error(svhn) == (pytest.approx(2.5), 'test')
  # CIFAR: the final test error (not the best one); ImageNet: the final validation error.
  cifar = results({'test': split(0.05)}, {'test': split(0.04)})
  assert sweep.reported_error(cifar) == (pytest.approx(5.0), 'test')
  assert sweep.reported_error(results({'validation': split(0.25)}, {'validation': split(0.2)})
                              ) == (pytest.approx(25.0), 'validation')


def test_all_sweep_files_expand_to_valid_points():
  counts = {'table2.py': 27, 'figure4.py': 12, 'figure3.py': 4, 'digits.py': 4}
  for name, count in counts.items():
    config, axes = sweep.load_sweep_file(os.path.join(ROOT, 'experiments', 'sweeps', name))
    points = sweep.make_points(config, axes)
    assert len(points) == count, name
    sweep.check_points(points)


def test_figure4_rows_name_twelve_networks_and_the_paper_only_where_it_has_them():
  config, axes = sweep.load_sweep_file(os.path.join(ROOT, 'experiments', 'sweeps', 'figure4.py'))
  points = sweep.make_points(config, axes)
  rows = []
  for point, point_config in zip(points, sweep.check_points(points)):
    results = {'final': {'epoch': 300, 'eval': {'test': {'top1_error': 0.05, 'loss': 0.2}}},
               'num_params': 1, 'wall_time_sec': 1.0,
               **train.built_and_paper(RunSettings.from_config(point_config))}
    results['best'] = results['final']
    rows.append(sweep.result_row(point, point_config, results, gmacs=0.1))
  assert len({r['model'] for r in rows}) == 12
  assert {r['model'] for r in rows if r['depth'] == 40} == {
      'densenet40_k12', 'densenet_b40_k12', 'densenet_c40_k12', 'densenet_bc40_k12'}
  papered = {r['model']: (r['paper_error_pct'], r['paper_source']) for r in rows
             if r['paper_error_pct'] != ''}
  table2 = architectures.TABLE2
  assert papered == {name: (table2[name][1], 'Table 2, C10+')
                     for name in ('densenet40_k12', 'densenet100_k12', 'densenet_bc100_k12')}


@pytest.fixture
def run_sweep(capsys, monkeypatch):
  """experiments/sweep.py's main in this process (its points run main.py in subprocesses, on one
  device each): what it prints. Its setting of jax_platforms is put back afterwards."""
  monkeypatch.setenv('JAX_NUM_CPU_DEVICES', '1')
  monkeypatch.chdir(ROOT)
  platforms = jax.config.jax_platforms

  def run(args):
    capsys.readouterr()
    sweep.main([f'--config={DIGITS}', *args])
    return capsys.readouterr().out
  yield run
  jax.config.update('jax_platforms', platforms)


@pytest.mark.slow
def test_sweep_over_a_folder_of_images_runs_collects_plots_and_resumes(tmp_path, run_sweep):
  """The sweep a user runs on their own images (a folder dataset, its options from the config;
  a zipped and a multiplied axis): --print lists the commands and runs nothing; both points
  train, and collecting (multiply-adds from the opened folder) writes results.csv, results.md
  and the plots; run again, a finished point is skipped and one without results.json resumes
  from its complete checkpoint."""
  folder = tmp_path / 'digits'
  counts = tiny_tfds.digits_folder(folder)
  root = tmp_path / 'sweep'
  args = [f'--root={root}',
          f'--sweep=dataset=folder:{folder} x data_dir={tmp_path / "tfds"} x model.depth=10 x '
          'image_size=8 x log_every_steps=11', '--sweep=num_epochs=1 + lr_decay_epochs=(0.5,0.75)',
          '--sweep=model.growth_rate=6,12']
  printed = run_sweep([*args, '--print']).splitlines()
  names = ['model.growth_rate=6', 'model.growth_rate=12']
  assert len(printed) == 2 and not root.exists()
  assert shlex.split(printed[1])[3:4] == [f'--workdir={root}/{names[1]}']

  assert '2 of 2 points finished.' in run_sweep(args)
  with open(root / 'results.csv') as f:
    rows = list(csv.DictReader(f))
  assert [r['point'] for r in rows] == names
  assert [r['model'] for r in rows] == ['densenet_bc10_k6', 'densenet_bc10_k12']
  results = [json.load(open(root / n / 'results.json')) for n in names]
  for row, result in zip(rows, results):
    assert row['dataset'] == f'folder:{folder}' and row['variant'] == 'DenseNet-BC'
    assert result['final']['eval']['test']['count'] == counts['test']
    assert int(row['num_params']) == result['num_params']
    assert float(row['error_pct']) == pytest.approx(
        100 * result['final']['eval']['test']['top1_error'])
    assert row['model'] == result['architecture']['name'] and row['paper_error_pct'] == ''
  assert int(rows[0]['num_params']) < int(rows[1]['num_params'])
  assert 0 < float(rows[0]['gmacs']) < float(rows[1]['gmacs'])
  table = (root / 'results.md').read_text().splitlines()
  assert len(table) == 4 and table[2].startswith(f'| {names[0]} | DenseNet-BC | folder:')
  for png in ('error_vs_params.png', 'error_vs_flops.png'):
    assert (root / png).stat().st_size > 10_000

  # Run again: the finished point is skipped; the one without results.json runs (its
  # checkpoint is complete, so main.py only resumes and rewrites results.json).
  first_mtime = os.path.getmtime(root / names[0] / 'results.json')
  os.remove(root / names[1] / 'results.json')
  log = run_sweep(args)
  assert f'[1/2] {names[0]}: done, skipped' in log
  assert f'[2/2] {names[1]}: ' in log and '2 of 2 points finished.' in log
  assert os.path.getmtime(root / names[0] / 'results.json') == first_mtime
  resumed = json.load(open(root / names[1] / 'results.json'))
  assert resumed['final'] == results[1]['final']
