"""What a program of this project sets up when it starts: which devices TensorFlow may use, the
logging of the libraries, jax.distributed and the persistent compilation cache.

main.py calls these; so do the notebooks and the benchmarks, which use the library without it.
Nothing here runs at import time.
"""

import logging as std_logging
import os
import sys
from typing import Optional

DEFAULT_COMPILATION_CACHE = os.path.expanduser('~/.cache/densenet_jax/xla')


def keep_tensorflow_off_accelerators():
  """Hides the GPUs from TensorFlow, so that the input pipeline never takes accelerator memory
  from JAX. Call it before TensorFlow runs anything (once it has, devices are fixed)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tf.config.set_visible_devices([], 'GPU')


class QuietLibraries(std_logging.Filter):
  """Drops orbax's per-checkpoint INFO lines and JAX's report of each backend it probes (e.g.
  "Unable to initialize backend 'tpu'"). Warnings and errors of orbax and asyncio keep their
  message but lose their stack trace: a failed checkpoint write or read is reported in one
  line, with its cause, when the run raises."""

  def filter(self, record):
    library = '/orbax/' in record.pathname or record.name == 'asyncio'
    if record.levelno < std_logging.WARNING:
      return not (library or record.pathname.endswith('xla_bridge.py'))
    if library:
      record.exc_info, record.exc_text = None, None
    return True


def _unraisable(unraisable):
  """After orbax gives up on a failed read or write, tensorstore still calls back into the
  asyncio loop that orbax closed; those echoes of an error already reported are dropped."""
  if not (isinstance(unraisable.exc_value, RuntimeError)
          and str(unraisable.exc_value) == 'Event loop is closed'):
    sys.__unraisablehook__(unraisable)


def quiet_libraries(handler: std_logging.Handler):
  """Installs QuietLibraries on `handler` (absl's) and drops tensorstore's late echoes."""
  handler.addFilter(QuietLibraries())
  sys.unraisablehook = _unraisable


def is_multiprocess_cluster() -> bool:
  """Whether SLURM, Open MPI or a Cloud TPU pod announces more than one process."""
  for var in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    if int(os.environ.get(var, '1')) > 1:
      return True
  return len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1


def start_distributed(coordinator_address: Optional[str], num_processes: Optional[int],
                      process_id: Optional[int], detect: bool):
  """jax.distributed.initialize with an explicit coordinator, or with what JAX detects when
  `detect` or the environment announces a multi-process cluster; else nothing."""
  import jax  # pylint: disable=import-outside-toplevel
  if coordinator_address:
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif detect or is_multiprocess_cluster():
    jax.distributed.initialize()


def use_compilation_cache(directory: str):
  """XLA's persistent cache in `directory`, for compiles of a second or more (unless
  $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise): a restarted run does not
  recompile."""
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update('jax_compilation_cache_dir', directory)
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
