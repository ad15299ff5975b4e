"""Trains, evaluates, predicts with, embeds with or exports a DenseNet.

  python main.py --config=configs/digits.py
  python main.py --config=configs/cifar.py:densenet_bc100_k12,c10+ --workdir=runs/bc100
  python main.py --config=configs/imagenet_densenet121.py --workdir=DIR --mode=evaluate
  python main.py --config=configs/digits.py --workdir=DIR --mode=export --export_dir=EXPORT
  python main.py --config=configs/cifar.py:densenet40_k12,c10+ --config.model.growth_rate=24

Multi-process (several hosts, or one process per GPU): every process runs the same command;
jax.distributed.initialize() is called when --coordinator_address or --distributed is given or
the cluster environment (SLURM, Open MPI, Cloud TPU pod) announces more than one process.

Exit status: 0 done; 2 bad command line or config (one line on stderr, in seconds, before
TensorFlow is imported or anything compiled); 1 a run that cannot go on (dataset not prepared,
workdir not writable, weights that cannot be downloaded or read, non-finite loss, ...: one line
on stderr); 128 + N stopped by signal N (SIGTERM, SIGINT) after checkpointing its last step: the
same command resumes it exactly.
"""

import gc
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')  # before TensorFlow loads: no INFO banners
# When it loads, TensorFlow imports Keras 3 (and scikit-learn through it) for tf.keras, unless
# told that tf.keras is the separate tf_keras package. Nothing here uses tf.keras (Keras weights
# are read by Keras 3 itself, `import keras`): every start is ~2 s shorter without it.
os.environ.setdefault('TF_USE_LEGACY_KERAS', '1')

from absl import app, flags, logging

from densenet_jax import config_loading, runtime

FLAGS = flags.FLAGS
config_loading.define_config_flag()
flags.DEFINE_string('workdir', None, 'Checkpoints, TensorBoard logs and results.json go here; '
                    'default: a new directory under runs/. An existing workdir is resumed.')
flags.DEFINE_enum('mode', 'train', ['train', 'evaluate', 'predict', 'embed', 'export'],
                  'Train (and evaluate); evaluate the best checkpoint of --workdir (or '
                  'config.init_from); predict the classes of --images with it; embed --images '
                  '(pooled features); or export it to --export_dir.')
flags.DEFINE_list('images', None, '--mode=predict/embed: image files or folders '
                  '(comma-separated).')
flags.DEFINE_integer('top_k', 5, '--mode=predict: classes reported per image.', lower_bound=1)
flags.DEFINE_string('predictions_csv', None, '--mode=predict: the CSV written (default: '
                    'WORKDIR/predictions.csv with --workdir, else predictions.csv).')
flags.DEFINE_string('embeddings', None, '--mode=embed: the .npy written, [files, features], '
                    'with its rows\' files in the same name with .files.txt (default: '
                    'WORKDIR/embeddings.npy with --workdir, else embeddings.npy).')
flags.DEFINE_string('export_dir', None, '--mode=export: the directory written (model.jax, '
                    'saved_model/, torchvision.pth, keras.weights.h5, classes.json).')
flags.DEFINE_list('export_formats', None, '--mode=export: jax, saved_model, torchvision, keras '
                  '(default: all the model can have).')
flags.DEFINE_bool('overwrite', False, '--mode=export: replace an existing --export_dir (once '
                  'the new export is complete).')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() with the settings '
                  'JAX detects (Cloud TPU pod, SLURM, Open MPI) even where main.py sees no '
                  'multi-process cluster in the environment.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for multi-process '
                    'runs without a cluster environment that JAX detects.')
flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator_address).')
flags.DEFINE_integer('process_id', None, 'This process\'s index (with --coordinator_address).')
flags.DEFINE_string('compilation_cache_dir',
                    os.environ.get('JAX_COMPILATION_CACHE_DIR', runtime.DEFAULT_COMPILATION_CACHE),
                    'Persistent XLA compilation cache, so a restarted run does not recompile '
                    '(default: $JAX_COMPILATION_CACHE_DIR if set).')


def _fail(message: str, exit_code: int = 1):
  """Ends the run with one line on stderr: no traceback for a problem the user has to fix."""
  sys.stderr.write(f'main.py: error: {message}\n')
  sys.exit(exit_code)


def _check_inference_flags(config, workdir):
  """What predict, embed and export need on the command line, checked before JAX starts."""
  if FLAGS.mode in ('predict', 'embed') and not FLAGS.images:
    _fail(f'--mode={FLAGS.mode} needs --images=PATH[,PATH...] (image files or folders)', 2)
  if FLAGS.mode == 'export' and not FLAGS.export_dir:
    _fail('--mode=export needs --export_dir=DIR', 2)
  if workdir is None and not config.init_from:
    _fail(f'--mode={FLAGS.mode} needs --workdir=RUN (a trained run) or '
          '--config.init_from=WEIGHTS', 2)


def _predict(config, workdir):
  """--mode=predict: a table on stdout and a CSV of the top-k classes of --images."""
  from densenet_jax import predict  # pylint: disable=import-outside-toplevel (TensorFlow)
  predictions = predict.predict(config, workdir, FLAGS.images, FLAGS.top_k)
  print(predictions.table())
  path = FLAGS.predictions_csv or os.path.join(workdir or '.', 'predictions.csv')
  predictions.write_csv(path)
  print(f'{len(predictions.files)} images predicted, {len(predictions.unreadable)} unreadable; '
        f'top-{FLAGS.top_k} classes written to {path}')


def _embed(config, workdir):
  """--mode=embed: the pooled features of --images as .npy, and the list of their files."""
  from densenet_jax import predict  # pylint: disable=import-outside-toplevel (TensorFlow)
  embeddings = predict.embed(config, workdir, FLAGS.images)
  path = FLAGS.embeddings or os.path.join(workdir or '.', 'embeddings.npy')
  embeddings.save(path)
  for name, reason in embeddings.unreadable:
    print(f'unreadable: {name} ({reason})')
  print(f'{len(embeddings.files)} images embedded ({embeddings.features.shape[1]} features), '
        f'{len(embeddings.unreadable)} unreadable; written to {path} and '
        f'{predict.files_list_path(path)}')


def _export(config, workdir):
  """--mode=export: the model as files that run without this project (densenet_jax/export.py)."""
  from densenet_jax import export, settings  # pylint: disable=import-outside-toplevel
  written = export.export(settings.RunSettings.from_config(config), workdir, FLAGS.export_dir,
                          FLAGS.export_formats, FLAGS.overwrite)
  print('\n'.join(['written:'] + written))


def _train_or_evaluate(config, workdir):
  if workdir is None:
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_count() > 1:
      _fail('multi-process runs need an explicit --workdir shared by all processes', 2)
    workdir = config_loading.default_workdir()
  logging.info('workdir: %s', workdir)
  # pylint: disable=import-outside-toplevel (TensorFlow: after the config is checked)
  from densenet_jax import evaluation, train
  if FLAGS.mode == 'train':
    try:
      train.train_and_evaluate(config, workdir)
    except train.Interrupted as e:
      logging.warning('%s', e)
      sys.exit(128 + e.signum)  # the status of a process ended by that signal
  else:
    print(evaluation.format_evaluation(evaluation.evaluate(config, workdir)))


# The modes that use a trained model (a run's checkpoint or config.init_from), not the dataset.
INFERENCE_MODES = {'predict': _predict, 'embed': _embed, 'export': _export}


def main(argv):
  del argv
  # TensorFlow and JAX make ~400k objects as they load, nearly all of which live as long as the
  # process. Collecting cycles while they load walks them again and again: ~1.3 s of CPU at
  # every start (1,000 collections, 7 of them full). The collector waits until TensorFlow has
  # loaded; what is loaded by then is left out of later collections (gc.freeze).
  gc.disable()
  inference_only = FLAGS.mode in INFERENCE_MODES
  if inference_only:
    _check_inference_flags(FLAGS.config, FLAGS.workdir)
  runtime.quiet_libraries(logging.get_absl_handler())
  import jax  # pylint: disable=import-outside-toplevel (after flag parsing: --help is fast)
  runtime.start_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                            detect=FLAGS.distributed)
  runtime.use_compilation_cache(FLAGS.compilation_cache_dir)
  from densenet_jax import config_validation, errors  # pylint: disable=import-outside-toplevel
  try:
    config_validation.validate(FLAGS.config, jax.device_count(), data=not inference_only)
  except config_validation.ConfigError as e:
    _fail(str(e), exit_code=2)
  logging.info('%d process(es), %d devices (%s).', jax.process_count(), jax.device_count(),
               jax.devices()[0].platform)
  from densenet_jax import weight_sources  # pylint: disable=import-outside-toplevel
  try:
    # Published weights are downloaded (if not cached) before TensorFlow loads, so that a
    # failed download is reported seconds sooner; every mode fetches them again (a no-op).
    weight_sources.fetch(FLAGS.config.init_from)
    runtime.keep_tensorflow_off_accelerators()
    gc.freeze()
    gc.enable()
    if inference_only:
      INFERENCE_MODES[FLAGS.mode](FLAGS.config, FLAGS.workdir)
    else:
      _train_or_evaluate(FLAGS.config, FLAGS.workdir)
  except errors.UserError as e:
    _fail(str(e))


def _parse_flags(argv):
  try:
    remaining = FLAGS(argv)
    FLAGS.config.keys()  # a config file that failed to load raises only when first used
    return remaining
  except Exception as e:  # pylint: disable=broad-except  (config files raise anything)
    _fail(config_loading.flag_error(e, argv), exit_code=2)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main, flags_parser=_parse_flags)
