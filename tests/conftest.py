"""Test setup: 8 virtual CPU devices and one persistent compilation cache for the whole run, and
the fixtures several modules use (`server`: a weights publisher on 127.0.0.1).

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


