"""Imported weights in the training code: --mode=evaluate on a Keras model file, and a new head."""

import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from densenet_jax import augment, convert, inference, input_pipeline, models, weight_sources
from densenet_jax.datasets import DataOptions
from densenet_jax.devices import Topology
from experiments import tiny_tfds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
keras = pytest.importorskip('keras')


pytestmark = pytest.mark.filterwarnings('ignore::DeprecationWarning')  # Keras's model.save


@pytest.fixture(scope='module')
def keras_file(tmp_path_factory):
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


def test_evaluate_mode_scores_imported_keras_weights_like_keras(tmp_path, keras_file):
  path, keras_model = keras_file
  data_dir = tmp_path / 'tfds'
  tiny_tfds.build_imagenet(data_dir, data_dir / 'manual')
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='1')
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/imagenet_densenet121.py', '--mode=evaluate',
       f'--config.init_from={path}', f'--config.data_dir={data_dir}',
       '--config.eval_batch_size=8', f'--workdir={tmp_path / "run"}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  match = re.search(r'validation \((\d+) images, step 0\): top1_error ([\d.]+)% '
                    r'top5_error ([\d.]+)% loss ([\d.]+)', proc.stdout)
  assert match, proc.stdout[-2000:]

  # Keras itself on the same preprocessed (bicubic resize 256, center crop 224) images.
  data = input_pipeline.Data(DataOptions('imagenet2012', str(data_dir), eval_resize='bicubic'))
  batches, _ = data.eval_iterator('validation', Topology(8))
  transform = data.device_transform(train=False)
  losses, errors, count = [], [], 0
  for batch in batches:
    mask = batch['mask'][0] == 1
    images = np.asarray(augment.apply(transform, batch['image'][0][mask]))
    logits = np.asarray(keras_model(images, training=False), np.float64)
    labels = batch['label'][0][mask]
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
    losses.extend(-log_probs[np.arange(len(labels)), labels])
    errors.extend(np.argmax(logits, -1) != labels)
    count += int(mask.sum())
  assert int(match[1]) == count
  assert float(match[2]) == pytest.approx(100 * np.mean(errors), abs=0.01)
  assert float(match[4]) == pytest.approx(np.mean(losses), abs=2e-4)


def test_imported_weights_with_other_classes_get_a_new_head(keras_file):
  path, _ = keras_file
  _, imported = convert.load_pretrained(path)
  model = models.create_model('densenet121', num_classes=10)
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)  # only the init runs: compile fast
  try:
    variables, _ = inference.init_variables(model, jax.random.key(0), (32, 32, 3))
  finally:
    jax.config.update('jax_disable_most_optimizations', previous)
  loaded = weight_sources.load_into(path, variables)
  np.testing.assert_array_equal(loaded['params']['classifier']['kernel'],
                                variables['params']['classifier']['kernel'])  # fresh head
  np.testing.assert_array_equal(
      loaded['params']['block4']['layer16']['composite']['conv']['kernel'],
      imported['params']['block4']['layer16']['composite']['conv']['kernel'])
  np.testing.assert_array_equal(loaded['batch_stats']['head_norm']['var'],
                                imported['batch_stats']['head_norm']['var'])
