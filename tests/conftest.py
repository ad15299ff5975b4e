"""Test setup: 8 virtual CPU devices and one persistent compilation cache for the whole run, and
the fixtures several modules use (`server`: a weights publisher on 127.0.0.1; `keras_file`: a
saved Keras DenseNet-121).

Both must be set before JAX starts, so they are environment variables; subprocesses that tests
start inherit them.
"""
import os
import tempfile

os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'densenet_jax_test_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import http.server  # pylint: disable=wrong-import-position
import threading  # pylint: disable=wrong-import-position

import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

import helpers  # pylint: disable=wrong-import-position

@pytest.fixture
def server(monkeypatch):
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
  keras = pytest.importorskip('keras')
  """A Keras DenseNet-121 with random weights and random BN statistics, saved to .keras."""
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
