"""Trains or evaluates a DenseNet.

  python main.py --config=configs/digits.py
  python main.py --config=configs/cifar.py:densenet_bc100_k12,c10+ --workdir=runs/bc100
  python main.py --config=configs/imagenet_densenet121.py --workdir=DIR --mode=evaluate
  python main.py --config=configs/cifar.py:densenet40_k12,c10+ --config.model.growth_rate=24

Multi-process (several hosts, or one process per GPU): every process runs the same command;
jax.distributed.initialize() is called when --coordinator_address is given or the cluster
environment (SLURM, Open MPI, Cloud TPU pod) announces more than one process.
"""

import datetime
import logging as std_logging
import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # before TensorFlow loads: no INFO banners

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py[:arg]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard logs and results.json go here; '
                    'default: a new directory under runs/. An existing workdir is resumed.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate'], 'Train (and evaluate), or evaluate '
                  'the best checkpoint of --workdir (or config.init_from).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for multi-process '
                    'runs without a cluster environment that JAX detects.')
flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process\'s index (with --coordinator_address).')
flags.DEFINE_string('compilation_cache_dir', os.path.expanduser('~/.cache/densenet_jax/xla'),
                    'Persistent XLA compilation cache, so a restarted run does not recompile.')

CLUSTER_ENV = {'SLURM_NTASKS': 'SLURM', 'OMPI_COMM_WORLD_SIZE': 'Open MPI',
               'TPU_WORKER_HOSTNAMES': 'Cloud TPU pod'}


def _is_multiprocess_cluster() -> bool:
  for var in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    if int(os.environ.get(var, '1')) > 1:
      return True
  return len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1


class _QuietOrbax(std_logging.Filter):
  """Drops orbax's per-checkpoint INFO lines; its warnings and errors still show."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or '/orbax/' not in record.pathname


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietOrbax())
  import jax  # after flag parsing, so --help is fast
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif _is_multiprocess_cluster():
    jax.distributed.initialize()
  jax.config.update('jax_compilation_cache_dir', FLAGS.compilation_cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)

  config = FLAGS.config
  workdir = FLAGS.workdir
  if workdir is None:
    if jax.process_count() > 1:
      raise app.UsageError('multi-process runs need an explicit --workdir shared by all '
                           'processes')
    path, _, arg = config_flags.get_config_filename(FLAGS['config']).partition(':')
    name = '-'.join(filter(None, [os.path.splitext(os.path.basename(path))[0],
                                  arg.replace(',', '-')]))
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    workdir = os.path.join('runs', f'{name}_{stamp}')
  from densenet_jax import train  # imports TensorFlow (input pipeline)
  logging.info('workdir: %s; %d process(es), %d devices (%s).', workdir, jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)
  if FLAGS.mode == 'train':
    train.train_and_evaluate(config, workdir)
  else:
    train.evaluate(config, workdir)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
