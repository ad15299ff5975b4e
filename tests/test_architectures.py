"""The one table of networks and paper results: names, depths, lookups, and that nothing else in
the project writes those numbers down again."""

import ast
import glob
import importlib
import os
import re

import pytest

from configs import cifar, digits
from densenet_jax import architectures
from densenet_jax.architectures import Architecture

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The project's code, tests excluded (tests restate the paper's numbers as their oracles).
SOURCES = sorted(set(glob.glob(os.path.join(ROOT, '*.py')) +
                     glob.glob(os.path.join(ROOT, 'densenet_jax', '*.py')) +
                     glob.glob(os.path.join(ROOT, 'configs', '*.py')) +
                     glob.glob(os.path.join(ROOT, 'experiments', '**', '*.py'), recursive=True)))
TABLE_FILE = os.path.join(ROOT, 'densenet_jax', 'architectures.py')


def test_named_networks_have_the_depth_in_their_name():
  for name, architecture in architectures.NAMED.items():
    depth = int(re.search(r'densenet(?:_bc)?(\d+)', name).group(1))
    # DenseNet-264's blocks 6-12-64-48 give 2 * 130 + 5 = 265 layers: the paper's name is off
    # by one (docs/reference.md); every other name is its depth.
    assert architecture.depth == (265 if name == 'densenet264' else depth), name
    assert architecture.name == name


@pytest.mark.parametrize('fields,name,variant', [
    (dict(depth=22, growth_rate=12, bottleneck=True, compression=0.5), 'densenet_bc22_k12',
     'DenseNet-BC'),
    (dict(depth=7, growth_rate=12), 'densenet7_k12', 'DenseNet'),
    (dict(depth=64, growth_rate=12, bottleneck=True), 'densenet_b64_k12', 'DenseNet-B'),
    (dict(depth=40, growth_rate=12, compression=0.5), 'densenet_c40_k12', 'DenseNet-C'),
    (dict(depth=40, growth_rate=12, compression=0.7), 'densenet_c40_k12_theta0.7', 'DenseNet-C'),
    (dict(block_sizes=(6, 12, 24, 16), growth_rate=24, bottleneck=True, compression=0.5,
          stem='imagenet'), 'densenet_bc121_k24_imagenet_6-12-24-16', 'DenseNet-BC'),
    (dict(block_sizes=(2, 3), growth_rate=4), 'densenet8_k4_cifar_2-3', 'DenseNet'),
])
def test_a_built_network_is_named_for_what_it_is(fields, name, variant):
  architecture = architectures.build(**fields)
  assert (architecture.name, architecture.variant) == (name, variant)
  assert architectures.build(**architecture.config_fields()) == architecture


def test_config_fields_round_trip_every_named_network():
  for name, architecture in architectures.NAMED.items():
    fields = architecture.config_fields()
    assert ('depth' in fields) == (architecture.stem == 'cifar'), name
    assert architectures.build(**fields) == architecture


def test_depth_and_block_sizes_exclude_each_other():
  with pytest.raises(ValueError, match='give one of them'):
    architectures.build(depth=40, block_sizes=(12, 12, 12), growth_rate=12)
  with pytest.raises(ValueError, match='needs depth'):
    architectures.build(growth_rate=12)


def test_paper_result_only_for_the_papers_networks():
  bc100 = architectures.NAMED['densenet_bc100_k12']
  assert architectures.paper_result(bc100, 'cifar10', True) == {
      'source': 'Table 2, C10+', 'top1_error_pct': architectures.TABLE2['densenet_bc100_k12'][1]}
  assert architectures.paper_result(bc100, 'svhn_cropped', False)['source'] == 'Table 2, SVHN'
  assert architectures.paper_result(bc100, 'svhn_cropped', True) is None  # no such column
  assert architectures.paper_result(bc100, 'digits', True) is None
  deeper = architectures.build(depth=64, growth_rate=12, bottleneck=True, compression=0.5)
  assert architectures.paper_result(deeper, 'cifar10', True) is None
  bc190 = architectures.NAMED['densenet_bc190_k40']
  assert architectures.paper_result(bc190, 'cifar10', False) is None  # '-' in the table
  d121 = architectures.NAMED['densenet121']
  result = architectures.paper_result(d121, 'imagenet2012', True)
  assert result['source'] == 'Table 3'
  assert [result[f'{c}_pct'] for c in architectures.TABLE3_COLUMNS] == list(
      architectures.TABLE3['densenet121'])
  assert architectures.paper_result(d121, 'cifar10', True) is None
  d161 = architectures.paper_result(architectures.NAMED['densenet161'], 'imagenet2012', True)
  assert d161 == {'source': "authors' README", 'top1_error_pct': 22.2}
  wider = Architecture(d121.block_sizes, 48, True, 0.5, 'imagenet')
  assert architectures.paper_result(wider, 'imagenet2012', True) is None


def test_the_digits_and_quick_configs_name_what_they_build():
  from densenet_jax.settings import ModelSettings
  architecture_of = lambda config: ModelSettings.from_config(config).architecture
  assert architecture_of(digits.get_config()).name == 'densenet_bc22_k12'
  assert architecture_of(cifar.get_config('densenet_bc100_k12,c10+,quick')).name == (
      'densenet_bc10_k12')
  assert architecture_of(cifar.get_config('densenet40_k12,c10,quick')).name == 'densenet7_k12'


def _paper_literals() -> tuple:
  """The float errors of Tables 2 and 3 and the block-size tuples of the named networks."""
  errors = {e for row in architectures.TABLE2.values() for e in row if e is not None}
  errors |= {e for row in architectures.TABLE3.values() for e in row}
  errors |= set(architectures.AUTHORS_README_TOP1.values())
  blocks = {a.block_sizes for a in architectures.NAMED.values() if a.stem == 'imagenet'}
  return errors, blocks


def _literals(path: str):
  """(float constants, int tuples) written in a Python file's code (docstrings are strings)."""
  tree = ast.parse(open(path).read())
  floats, tuples = set(), set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Constant) and isinstance(node.value, float):
      floats.add(node.value)
    if isinstance(node, ast.Tuple) and node.elts and all(
        isinstance(e, ast.Constant) and type(e.value) is int for e in node.elts):
      tuples.add(tuple(e.value for e in node.elts))
  return floats, tuples


def test_architectures_and_paper_errors_are_written_in_one_file_only():
  errors, blocks = _paper_literals()
  assert TABLE_FILE in SOURCES and len(SOURCES) > 20
  floats, tuples = _literals(TABLE_FILE)
  assert errors <= floats and blocks <= tuples  # the scan sees them where they are
  for path in SOURCES:
    if path != TABLE_FILE:
      floats, tuples = _literals(path)
      assert not floats & errors, (path, floats & errors)
      assert not tuples & blocks, (path, tuples & blocks)


def test_the_literal_scan_fails_for_a_copy(tmp_path):
  copy = tmp_path / 'copy.py'
  copy.write_text('PAPER = {"densenet121": 25.02}\nBLOCKS = (6, 12, 24, 16)\n')
  floats, tuples = _literals(str(copy))
  errors, blocks = _paper_literals()
  assert floats & errors == {25.02} and tuples & blocks == {(6, 12, 24, 16)}


@pytest.mark.parametrize('name', ['121', '169', '201', '264', '161'])
def test_imagenet_config_docstrings_state_the_tables_numbers(name):
  module = importlib.import_module(f'configs.imagenet_densenet{name}')
  doc = ' '.join(module.__doc__.split())
  architecture = architectures.NAMED[f'densenet{name}']
  blocks = '-'.join(map(str, architecture.block_sizes))
  assert f'k={architecture.growth_rate}' in doc and f'blocks {blocks}' in doc
  if f'densenet{name}' in architectures.TABLE3:
    top1, top5, ten_top1, ten_top5 = architectures.TABLE3[f'densenet{name}']
    assert (f'Paper: {top1:.2f}% top-1 / {top5:.2f}% top-5 validation error single-crop, '
            f'{ten_top1:.2f}% / {ten_top5:.2f}% 10-crop') in doc
  else:
    assert f'{architectures.AUTHORS_README_TOP1[f"densenet{name}"]}% top-1' in doc


def test_reference_page_holds_the_tables_as_the_code_does():
  reference = open(os.path.join(ROOT, 'docs', 'reference.md')).read()
  assert architectures.paper_tables() in reference


# The notes outside the repository that a clone does not have (split so as not to match itself).
OUTSIDE = re.compile(r'\.\./shar' r'ed|densenet-fa' r'cts')


def test_nothing_refers_to_notes_outside_the_repository():
  files = [p for p in glob.glob(os.path.join(ROOT, '**', '*'), recursive=True)
           if os.path.isfile(p) and '.venv' not in p and '/runs/' not in p
           and p.endswith(('.py', '.md', '.ipynb', '.sh', '.txt', '.toml'))]
  assert len(files) > 40
  for path in files:
    assert not OUTSIDE.search(open(path, encoding='utf-8').read()), path
