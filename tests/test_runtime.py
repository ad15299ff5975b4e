"""runtime.py: what a program sets up at its start; the library log filter and the cluster
detection (the rest, jax.distributed and the cache, runs in every main.py test)."""

import logging

from densenet_jax import runtime


def record(pathname, level, name='absl'):
  return logging.LogRecord(name, level, pathname, 1, 'message', None,
                           (ValueError, ValueError('x'), None))


def test_quiet_libraries_drops_orbax_info_and_keeps_its_warnings_without_a_trace():
  quiet = runtime.QuietLibraries()
  assert not quiet.filter(record('/site-packages/orbax/checkpoint/manager.py', logging.INFO))
  assert not quiet.filter(record('/site-packages/jax/_src/xla_bridge.py', logging.INFO))
  assert quiet.filter(record('/densenet_jax/train.py', logging.INFO))
  warning = record('/site-packages/orbax/checkpoint/manager.py', logging.WARNING)
  assert quiet.filter(warning) and warning.exc_info is None


def test_a_cluster_of_several_processes_is_detected_from_its_environment(monkeypatch):
  for var in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE', 'TPU_WORKER_HOSTNAMES'):
    monkeypatch.delenv(var, raising=False)
  assert not runtime.is_multiprocess_cluster()
  monkeypatch.setenv('SLURM_NTASKS', '1')
  assert not runtime.is_multiprocess_cluster()
  monkeypatch.setenv('OMPI_COMM_WORLD_SIZE', '4')
  assert runtime.is_multiprocess_cluster()
  monkeypatch.delenv('OMPI_COMM_WORLD_SIZE')
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'a,b')
  assert runtime.is_multiprocess_cluster()
