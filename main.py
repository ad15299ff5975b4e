"""Trains or evaluates a DenseNet.

  python main.py --config=configs/digits.py
  python main.py --config=configs/cifar.py:densenet_bc100_k12,c10+ --workdir=runs/bc100
  python main.py --config=configs/imagenet_densenet121.py --workdir=DIR --mode=evaluate
  python main.py --config=configs/cifar.py:densenet40_k12,c10+ --config.model.growth_rate=24

Multi-process (several hosts, or one process per GPU): every process runs the same command;
jax.distributed.initialize() is called when --coordinator_address or --distributed is given or
the cluster environment (SLURM, Open MPI, Cloud TPU pod) announces more than one process.

Exit status: 0 done; 2 bad command line or config (one line on stderr, in seconds, before
TensorFlow is imported or anything compiled); 1 a run that cannot go on (dataset not prepared,
workdir not writable, non-finite loss, ...: one line on stderr); 128 + N stopped by signal N
(SIGTERM, SIGINT) after checkpointing its last step: the same command resumes it exactly.
"""

import datetime
import logging as std_logging
import os
import re
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # before TensorFlow loads: no INFO banners

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/*.py[:arg]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard logs and results.json go here; '
                    'default: a new directory under runs/. An existing workdir is resumed.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate', 'predict'], 'Train (and evaluate); '
                  'evaluate the best checkpoint of --workdir (or config.init_from); or predict '
                  'the classes of --images with it.')
flags.DEFINE_list('images', None, '--mode=predict: image files or folders (comma-separated).')
flags.DEFINE_integer('top_k', 5, '--mode=predict: classes reported per image.', lower_bound=1)
flags.DEFINE_string('predictions_csv', None, '--mode=predict: the CSV written (default: '
                    'WORKDIR/predictions.csv with --workdir, else predictions.csv).')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() with the settings '
                  'JAX detects (Cloud TPU pod, SLURM, Open MPI) even where main.py sees no '
                  'multi-process cluster in the environment.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for multi-process '
                    'runs without a cluster environment that JAX detects.')
flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process\'s index (with --coordinator_address).')
flags.DEFINE_string('compilation_cache_dir',
                    os.environ.get('JAX_COMPILATION_CACHE_DIR',
                                   os.path.expanduser('~/.cache/densenet_jax/xla')),
                    'Persistent XLA compilation cache, so a restarted run does not recompile '
                    '(default: $JAX_COMPILATION_CACHE_DIR if set).')


def _is_multiprocess_cluster() -> bool:
  for var in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE'):
    if int(os.environ.get(var, '1')) > 1:
      return True
  return len(os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',')) > 1


class _QuietLibraries(std_logging.Filter):
  """Drops orbax's per-checkpoint INFO lines and JAX's report of each backend it probes (e.g.
  "Unable to initialize backend 'tpu'"). Warnings and errors of orbax and asyncio keep their
  message but lose their stack trace: a failed checkpoint write or read is reported in one
  line, with its cause, when train.py raises."""

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


def _fail(message: str, exit_code: int = 1):
  """Ends the run with one line on stderr: no traceback for a problem the user has to fix."""
  sys.stderr.write(f'main.py: error: {message}\n')
  sys.exit(exit_code)


def _print_evaluation(evaluation: dict):
  """One line per split: its errors in percent and its loss; then, where computed, each
  class's recall and the confusion matrix (rows: true class, columns: predicted)."""
  for split, values in evaluation['eval'].items():
    errors = ' '.join(f'{k} {100 * v:.2f}%' for k, v in values.items() if k.endswith('error'))
    print(f'{split} ({values["count"]} images, step {evaluation["step"]}): {errors} '
          f'loss {values["loss"]:.4f}')
  for split, per_class in (evaluation.get('per_class') or {}).items():
    names = per_class['class_names']
    width = max(len(n) for n in names)
    print(f'{split}: recall per class, then the confusion matrix (row: true, column: predicted)')
    for name, recall, row in zip(names, per_class['recall'], per_class['confusion_matrix']):
      shown = '-' if recall is None else f'{100 * recall:.2f}%'
      print(f'  {name:>{width}} {shown:>7} | ' + ' '.join(f'{c:>4}' for c in row))


def _predict(config, workdir):
  """--mode=predict: a table on stdout and a CSV of the top-k classes of --images."""
  if not FLAGS.images:
    _fail('--mode=predict needs --images=PATH[,PATH...] (image files or folders)', 2)
  if workdir is None and not config.init_from:
    _fail('--mode=predict needs --workdir=RUN (a trained run) or --config.init_from=WEIGHTS', 2)
  from densenet_jax import checkpoints, predict, train  # imports TensorFlow
  try:
    predictions = predict.predict(config, workdir, FLAGS.images, FLAGS.top_k)
  except (FileNotFoundError, train.RunError, checkpoints.CheckpointError) as e:
    _fail(str(e))
  print(predictions.table())
  path = FLAGS.predictions_csv or os.path.join(workdir or '.', 'predictions.csv')
  predictions.write_csv(path)
  print(f'{len(predictions.files)} images predicted, {len(predictions.unreadable)} unreadable; '
        f'top-{FLAGS.top_k} classes written to {path}')


def _config_arg(argv):
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg.split('=', 1)[1]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _flag_error(error: Exception, argv) -> str:
  """One line for a command line that cannot be parsed."""
  message = str(error).strip()
  if '\n' in message:  # the config file is missing or raised: the last line says why
    return f'--config={_config_arg(argv)}: {message.splitlines()[-1].strip()}'
  if isinstance(error, (KeyError, AttributeError)):  # an override of a field that does not exist
    from densenet_jax import config_validation
    config = FLAGS['config'].parser.parse(_config_arg(argv))
    for arg in argv:
      if arg.startswith('--config.'):
        reason = config_validation.unknown_field(config, arg[len('--config.'):].split('=')[0])
        if reason:
          return f'{arg}: {reason}'
  match = re.match(r'flag (--(config\.[\w.]+)=.*?): ', message)
  if match and match.group(2) in FLAGS:  # an override of the wrong type
    return f'{match.group(1)}: expected {FLAGS[match.group(2)].parser.flag_type()} ({message})'
  return ' '.join(message.split())


def _parse_flags(argv):
  try:
    remaining = FLAGS(argv)
    FLAGS.config.keys()  # a config file that failed to load raises only when first used
    return remaining
  except Exception as e:  # pylint: disable=broad-except  (config files raise anything)
    _fail(_flag_error(e, argv), exit_code=2)


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  sys.unraisablehook = _unraisable
  import jax  # after flag parsing, so --help is fast
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif FLAGS.distributed or _is_multiprocess_cluster():
    jax.distributed.initialize()
  jax.config.update('jax_compilation_cache_dir', FLAGS.compilation_cache_dir)
  if 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS' not in os.environ:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)

  config = FLAGS.config
  from densenet_jax import config_validation  # no TensorFlow: a bad config fails in seconds
  try:
    config_validation.validate(config, jax.device_count(), data=FLAGS.mode != 'predict')
  except config_validation.ConfigError as e:
    _fail(str(e), exit_code=2)
  workdir = FLAGS.workdir
  if FLAGS.mode == 'predict':
    return _predict(config, workdir)
  if workdir is None:
    if jax.process_count() > 1:
      _fail('multi-process runs need an explicit --workdir shared by all processes', 2)
    path, _, arg = config_flags.get_config_filename(FLAGS['config']).partition(':')
    name = '-'.join(filter(None, [os.path.splitext(os.path.basename(path))[0],
                                  arg.replace(',', '-')]))
    stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
    workdir = os.path.join('runs', f'{name}_{stamp}')
  from densenet_jax import checkpoints, train  # imports TensorFlow (input pipeline)
  logging.info('workdir: %s; %d process(es), %d devices (%s).', workdir, jax.process_count(),
               jax.device_count(), jax.devices()[0].platform)
  try:
    if FLAGS.mode == 'train':
      train.train_and_evaluate(config, workdir)
    else:
      _print_evaluation(train.evaluate(config, workdir))
  except train.Interrupted as e:
    logging.warning('%s', e)
    sys.exit(128 + e.signum)  # the status of a process ended by that signal
  except (train.RunError, checkpoints.CheckpointError) as e:
    _fail(str(e))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=_parse_flags)
