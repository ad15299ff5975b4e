"""predict.py: the top-k ranking, names and probabilities of image files, against the model
applied by hand, in one batch and in several; a prediction process that loads neither optax nor
the training loop; the table and CSV it writes."""

import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import digits
from densenet_jax import predict, run_setup
from densenet_jax.datasets import SPECS
from densenet_jax.settings import ModelSettings
import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASS_NAMES = [f'digit {d}' for d in range(10)]


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A run's workdir as training leaves it (a checkpoint and classes.json) of a tiny digits
  DenseNet with random weights and BN statistics, and five 8x8 PNGs of digits (0..16)."""
  root = tmp_path_factory.mktemp('predict')
  config = digits.get_config()
  config.model.depth, config.model.growth_rate, config.image_size = 10, 4, 8  # as the script's
  model = run_setup.build_model(ModelSettings.from_config(config), num_classes=10)
  rng = np.random.default_rng(0)
  workdir = root / 'run'
  state = helpers.write_random_run(workdir, model, (8, 8, 1), 7, {
      'dataset': 'digits', 'class_names': CLASS_NAMES, 'image_shape': [8, 8, 1],
      'normalization': [16.0, [0.0], [1.0]]}, rng)
  images = rng.integers(0, 17, (5, 8, 8), dtype=np.uint8)
  files = []
  for i, image in enumerate(images):
    files.append(root / 'images' / f'{i}.png')
    files[-1].parent.mkdir(exist_ok=True)
    Image.fromarray(image).save(files[-1])
  (root / 'images' / 'broken.png').write_bytes(b'not a png')
  logits = np.asarray(model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                                  images[..., None] / 16.0, train=False))
  return workdir, root / 'images', files, logits


def test_predict_loads_no_optax_and_ranks_as_the_model(run):
  """In a fresh process: importing and running predict loads no optax (nor train.py or
  steps.py); its top-3 classes and probabilities are the model's logits ranked by hand."""
  workdir, images, files, logits = run
  script = f'''
import json, sys
sys.path.insert(0, {ROOT!r})
from configs import digits
from densenet_jax import predict
config = digits.get_config()
config.model.depth, config.model.growth_rate, config.image_size = 10, 4, 8
predictions = predict.predict(config, {str(workdir)!r}, [{str(images)!r}], top_k=3)
loaded = [m for m in ('optax', 'densenet_jax.train', 'densenet_jax.steps') if m in sys.modules]
print(json.dumps({{'loaded': loaded, 'files': predictions.files,
                  'classes': predictions.top_classes.tolist(),
                  'probabilities': predictions.top_probabilities.tolist(),
                  'names': predictions.class_names, 'unreadable': predictions.unreadable}}))
'''
  proc = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_NUM_CPU_DEVICES='1'))
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['loaded'] == []
  assert out['files'] == [str(f) for f in files] and out['names'] == CLASS_NAMES
  assert [f for f, _ in out['unreadable']] == [str(images / 'broken.png')]
  order = np.argsort(-logits, axis=1, kind='stable')[:, :3]
  assert len(np.unique(logits)) == logits.size  # no ties: the ranking is the only one
  np.testing.assert_array_equal(out['classes'], order)
  probabilities = np.exp(logits - logits.max(1, keepdims=True))
  probabilities /= probabilities.sum(1, keepdims=True)
  # float32 softmax of float32 logits: a few ulps of 1.
  np.testing.assert_allclose(out['probabilities'], np.take_along_axis(probabilities, order, 1),
                             rtol=1e-5)


def test_files_are_scored_in_batches_every_one_once_in_order(run, monkeypatch):
  """Up to BATCH files a forward pass, fewer in one pass of the smallest power of two that holds
  them (one compile either way): with BATCH = 2, the five images and the broken file take three
  passes, the last one padded, and rank as the model does."""
  assert [predict.batch_size(n) for n in (1, 2, 3, 5, 8, 9, 31, 32, 33, 1000)] == [
      1, 2, 4, 8, 8, 16, 32, 32, 32, 32]
  workdir, images, files, logits = run
  config = digits.get_config()
  config.model.depth, config.model.growth_rate, config.image_size = 10, 4, 8
  monkeypatch.setattr(predict, 'BATCH', 2)
  predictions = predict.predict(config, str(workdir), [str(images)], top_k=3)
  assert predictions.files == [str(f) for f in files]
  assert [f for f, _ in predictions.unreadable] == [str(images / 'broken.png')]
  np.testing.assert_array_equal(predictions.top_classes,
                                np.argsort(-logits, axis=1, kind='stable')[:, :3])


def test_embeddings_are_the_classifiers_input(run, tmp_path):
  """embed's features times the checkpoint's classifier are the model's logits (to the
  rounding bound of that matmul), in the order of the files that decoded; save writes the
  .npy and the list of its rows' files."""
  workdir, images, files, logits = run
  config = digits.get_config()
  config.model.depth, config.model.growth_rate, config.image_size = 10, 4, 8
  embeddings = predict.embed(config, str(workdir), [str(images)])
  assert embeddings.files == [str(f) for f in files]
  assert [f for f, _ in embeddings.unreadable] == [str(images / 'broken.png')]
  _, state, _ = helpers.last_checkpoint(str(workdir))
  kernel, bias = state['params']['classifier']['kernel'], state['params']['classifier']['bias']
  features = embeddings.features
  assert features.dtype == np.float32 and features.shape == (len(files), kernel.shape[0])
  bound = kernel.shape[0] * np.finfo(np.float32).eps * (np.abs(features) @ np.abs(kernel)
                                                          + np.abs(bias)).max()
  np.testing.assert_allclose(features @ kernel + bias, logits, rtol=0, atol=bound)
  embeddings.save(str(tmp_path / 'e.npy'))
  np.testing.assert_array_equal(np.load(tmp_path / 'e.npy'), features)
  assert (tmp_path / 'e.files.txt').read_text().splitlines() == embeddings.files


def test_image_files_walk_folders_sorted_and_name_a_missing_path(tmp_path):
  for name in ('b/2.png', 'b/1.JPG', 'a/0.jpeg', 'a/notes.txt'):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_bytes(b'')
  assert predict.image_files([str(tmp_path), str(tmp_path / 'a' / 'notes.txt')]) == [
      str(tmp_path / 'a' / '0.jpeg'), str(tmp_path / 'b' / '1.JPG'),
      str(tmp_path / 'b' / '2.png'), str(tmp_path / 'a' / 'notes.txt')]
  with pytest.raises(predict.MissingImages, match=r'^--images: .*/nothing: no such file'):
    predict.image_files([str(tmp_path / 'nothing')])


def test_table_and_csv_name_the_classes_best_first(tmp_path):
  predictions = predict.Predictions(
      files=['x.png', 'y.png'], top_classes=np.array([[2, 0], [1, 2]]),
      top_probabilities=np.array([[0.7, 0.2], [0.5, 0.25]]), class_names=['a', 'b', 'c'],
      unreadable=[('z.png', 'truncated')])
  assert predictions.table().splitlines() == [
      'x.png | c 0.700 | a 0.200', 'y.png | b 0.500 | c 0.250', 'unreadable: z.png (truncated)']
  predictions.write_csv(tmp_path / 'p.csv')
  with open(tmp_path / 'p.csv') as f:
    rows = list(csv.reader(f))
  assert rows == [['file', 'class_1', 'probability_1', 'class_2', 'probability_2'],
                  ['x.png', 'c', '0.700000', 'a', '0.200000'],
                  ['y.png', 'b', '0.500000', 'c', '0.250000']]


def test_imagenet_class_names_ship_in_label_order():
  import tensorflow_datasets as tfds
  classes = predict.shipped_classes(SPECS['imagenet2012'])
  assert classes[0] == ('n01440764', 'tench, Tinca tinca') and len(classes) == 1000
  assert [wnid for wnid, _ in classes] == tfds.builder('imagenet2012').info.features[
      'label'].names
  assert all(name for _, name in classes)
