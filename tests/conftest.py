"""Test setup: 8 virtual CPU devices and one persistent compilation cache for the whole run, the
order the tests start in, and the fixtures several modules use (`server`: a weights publisher on
127.0.0.1; `keras_file`: a saved Keras DenseNet-121).

Devices, cache and compiler settings must be set before JAX starts, so they are environment
variables, set here in pytest's main process before it starts the xdist workers: the workers and
the subprocesses that tests start inherit them. The cache is a directory this run creates (and
removes at its end), so a run starts cold, as CI does, and every worker and subprocess compiles
each program once. XLA compiles without most of its optimizations (JAX_DISABLE_MOST_OPTIMIZATIONS)
and, where XLA still has it (jaxlib 0.10), with XLA:CPU's older elementwise code generator
instead of its fusion emitters (--xla_cpu_use_fusion_emitters=false): what a program computes
is the same, it compiles several times faster (a tiny DenseNet's train step 3.1 s -> 0.9 s, a
DenseNet-121-sized one 25 s -> 11 s) and runs slower
(irrelevant at the tests' sizes). A test about what the optimizing compiler makes of a program
(the memory of a compiled step: test_memory_efficient.py) compiles that program, and only that
one, with all of them.

pytest's main process loads this file too, before it starts the workers, and with `-n` runs no
test: it imports neither JAX nor the test helpers (TensorFlow through them), which the fixtures
that use them import, so that the workers start about 6 s sooner.
"""
import collections
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='densenet_jax_test_cache_')
  os.environ['DENSENET_JAX_TEST_CACHE_OWNER'] = str(os.getpid())
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# As main.py does: TensorFlow does not import Keras 3 for tf.keras, which nothing here uses (1.3-2 s
# of CPU in each worker, kernel and subprocess that imports TensorFlow; `import keras` still
# gives Keras 3, which reads Keras weights).
os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')


def _xla_accepts(flag: str) -> bool:
  """Whether this jaxlib's XLA knows `flag` (it aborts a process on an unknown XLA_FLAGS entry;
  jaxlib 0.10 knows --xla_cpu_use_fusion_emitters, 0.11.2 and 0.12 no longer do)."""
  env = dict(os.environ, XLA_FLAGS=f'{os.environ.get("XLA_FLAGS", "")} {flag}',
             JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-c', 'import jax; jax.devices()'], env=env,
                        capture_output=True, check=False).returncode == 0


if 'DENSENET_JAX_TEST_XLA_FLAGS' not in os.environ:  # pytest's main process: probe once
  _FAST_COMPILES = '--xla_cpu_use_fusion_emitters=false'
  if _FAST_COMPILES not in os.environ.get('XLA_FLAGS', '') and _xla_accepts(_FAST_COMPILES):
    os.environ['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} {_FAST_COMPILES}'.strip()
  os.environ['DENSENET_JAX_TEST_XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '')

import http.server  # pylint: disable=wrong-import-position
import threading  # pylint: disable=wrong-import-position

import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position


def pytest_configure(config):
  config.addinivalue_line('markers', 'slow: takes 10 s or more (its file starts first, so that '
                                     'two workers end together); -m "not slow": a fast inner loop')


def pytest_collection_modifyitems(items):
  """Files with the most slow tests first: xdist hands the files out in this order
  (pyproject.toml: --dist loadfile), and a long one started last would leave the other worker
  idle at the end. Each file's tests stay together and in order, so that a module fixture is
  built once."""
  slow_tests = collections.Counter(item.path for item in items if item.get_closest_marker('slow'))
  items.sort(key=lambda item: -slow_tests[item.path])


def pytest_unconfigure(config):
  if (not hasattr(config, 'workerinput')
      and os.environ.get('DENSENET_JAX_TEST_CACHE_OWNER') == str(os.getpid())):
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)

@pytest.fixture
def server(monkeypatch):
  import helpers  # pylint: disable=import-outside-toplevel (the main process: module docstring)
  httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), helpers.Publisher)
  httpd.files = {'good.bin': helpers.WEIGHTS_BODY, 'cut.bin': helpers.WEIGHTS_BODY}
  thread = threading.Thread(target=httpd.serve_forever, daemon=True)
  thread.start()
  monkeypatch.setenv('DENSENET_JAX_WEIGHTS_MIRROR', f'http://127.0.0.1:{httpd.server_port}/')
  helpers.Publisher.requests = []
  yield httpd
  httpd.shutdown()
  httpd.server_close()


@pytest.fixture(scope='session')
def keras_file(tmp_path_factory):
  """A Keras DenseNet-121 with random weights and random BN statistics, saved to .keras."""
  keras = pytest.importorskip('keras')
  model = keras.applications.DenseNet121(weights=None, classifier_activation=None)
  rng = np.random.default_rng(0)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      c = layer.gamma.shape[0]
      layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 0.1, c),
                         rng.normal(0, 0.1, c), rng.uniform(0.5, 1.5, c)])
  path = str(tmp_path_factory.mktemp('keras') / 'densenet121.keras')
  model.save(path)
  return path, model
