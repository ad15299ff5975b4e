"""Test setup: 8 virtual CPU devices and one persistent compilation cache for the whole run.

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
