"""The code's shape: imports point one way, config checks load neither JAX nor TensorFlow, and
no library function grows past a screen."""

import ast
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_FUNCTION_LINES = 60


def _loaded_after_import(module: str) -> set:
  code = (f'import sys; import {module}; '
          'print(" ".join(m for m in ("jax", "flax", "tensorflow", "tensorflow_datasets") '
          'if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout
  return set(out.split())


def test_config_checks_and_tables_load_neither_jax_nor_tensorflow():
  for module in ('densenet_jax.config_validation', 'densenet_jax.architectures',
                 'densenet_jax.datasets', 'configs.cifar', 'configs.imagenet_densenet121'):
    assert _loaded_after_import(module) == set(), module


def test_models_steps_and_costs_load_no_tensorflow():
  for module in ('densenet_jax.models', 'densenet_jax.steps', 'densenet_jax.costs'):
    assert not _loaded_after_import(module) & {'tensorflow', 'tensorflow_datasets'}, module


def _imports(path: str) -> set:
  names = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module:
      names |= {f'{node.module}.{a.name}' for a in node.names} | {node.module}
    elif isinstance(node, ast.Import):
      names |= {a.name for a in node.names}
  return names


def test_models_know_nothing_of_data_or_training_and_data_nothing_of_models():
  package = os.path.join(ROOT, 'densenet_jax')
  training = {'densenet_jax.train', 'densenet_jax.input_pipeline', 'densenet_jax.checkpoints',
              'densenet_jax.preprocessing', 'densenet_jax.steps'}
  for module in ('models', 'architectures', 'costs'):
    assert not _imports(os.path.join(package, f'{module}.py')) & training, module
  for module in ('input_pipeline', 'preprocessing', 'datasets', 'digits'):
    imported = _imports(os.path.join(package, f'{module}.py'))
    assert not imported & {'densenet_jax.models', 'densenet_jax.costs', 'densenet_jax.train'}


def test_no_library_function_is_longer_than_a_screen():
  for path in glob.glob(os.path.join(ROOT, 'densenet_jax', '*.py')) + [
      os.path.join(ROOT, 'main.py')]:
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        lines = node.end_lineno - node.lineno + 1
        assert lines <= MAX_FUNCTION_LINES, (path, node.name, lines)
