"""Prepare -> fine-tune -> predict, end to end in one process, on real photos (variations of
scikit-learn's two sample photos as two classes) with configs/finetune.py on a tiny ImageNet-stem
DenseNet, starting from another run's 3-class weights (a new head); and --mode=predict and
--mode=export of published Keras DenseNet-121 weights (random, made by the test) served through
the download path from 127.0.0.1. (Published weights' download, conversion and cache:
test_weight_sources.py.)"""

import functools
import json
import os

import jax
import numpy as np
import pytest

from configs import finetune, imagenet_densenet121
from densenet_jax import augment, export, inference, predict, run_setup, settings, train
from densenet_jax import preprocessing as pp
from densenet_jax.datasets import SPECS
from experiments import tiny_tfds
import helpers


@pytest.mark.slow
def test_prepare_finetune_and_predict_photos(tmp_path):
  photos = tiny_tfds.sample_photos()
  for i, photo in enumerate(photos):
    split = 'test' if i >= 8 else 'train'
    path = tmp_path / 'photos' / split / ('china', 'flower')[i % 2] / f'{i}.jpg'
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tiny_tfds.jpeg(photo))
  config = finetune.get_config()
  config.dataset = f'folder:{tmp_path / "photos"}'
  config.data_dir = str(tmp_path / 'tfds')
  config.model.block_sizes, config.model.growth_rate = (1, 2), 4  # ImageNet stem, tiny
  config.image_size = 32
  # The pretrained source: a run of the same network on 3 classes (random weights).
  source = helpers.write_random_run(
      tmp_path / 'source', run_setup.build_model(settings.ModelSettings.from_config(config), 3),
      (32, 32, 3), 5, {'class_names': ['a', 'b', 'c']}, np.random.default_rng(0))
  config.init_from = str(tmp_path / 'source')
  config.folder.holdout_fraction = 0.0  # test/ evaluates
  config.batch_size = config.eval_batch_size = 8
  config.num_epochs, config.lr_decay_epochs, config.log_every_steps = 2, (1,), 1
  workdir = str(tmp_path / 'run')
  results = train.train_and_evaluate(config, workdir)
  assert results['final']['step'] == 2 and results['final']['eval']['test']['count'] == 4
  # The source's features were loaded and a new 2-class head made: two SGD steps at lr 0.01
  # move each weight of the source by a few percent of the source's own size (a fresh init
  # would differ by about 100%).
  _, trained, _ = helpers.last_checkpoint(workdir)
  assert trained['params']['classifier']['kernel'].shape[-1] == 2
  source_features = {k: v for k, v in source.params.items() if k != 'classifier'}
  for path, before in jax.tree_util.tree_leaves_with_path(source_features):
    after = functools.reduce(lambda tree, key: tree[key.key], path, trained['params'])
    assert np.linalg.norm(after - before) < 0.05 * np.linalg.norm(before), path
  predictions = predict.predict(config, workdir, [str(tmp_path / 'photos' / 'test')], top_k=2)
  assert predictions.class_names == ['china', 'flower'] and len(predictions.files) == 4
  np.testing.assert_allclose(predictions.top_probabilities.sum(1), 1, rtol=1e-5)
  correct = sum(predictions.class_names[c] == os.path.basename(os.path.dirname(f))
                for f, c in zip(predictions.files, predictions.top_classes[:, 0]))
  best = results['best']['eval']['test']
  assert correct == round((1 - best['top1_error']) * 4)
  # Each file's top-1 is the eval step's argmax for it: the eval pipeline's transform of the
  # files, scored by the eval step against the predicted classes, has no error.
  run = settings.RunSettings.from_config(config)
  data = run_setup.open_data(run.data)
  preprocess = data.eval_preprocessor()
  images = np.stack([preprocess(open(f, 'rb').read()).numpy() for f in predictions.files])
  state = run_setup.inference_state(run, workdir, data.info)
  eval_step = jax.jit(functools.partial(inference.eval_step, axis_name=None,
                                        transform=data.device_transform(train=False)))
  sums = eval_step(state, {'image': images, 'label': predictions.top_classes[:, 0],
                           'mask': np.ones(4, np.float32)})
  assert float(sums['count']) == 4 and float(sums['top1_error']) == 0
  assert json.loads((tmp_path / 'run' / 'results.json').read_text())['final_per_class']


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')  # Keras's own
def test_published_weights_predict_and_export_as_keras_scores_them(
    server, tmp_path, monkeypatch):
  """--mode=predict without a run: config.init_from's 1000-class weights, ImageNet's class
  names and the weights' own eval transform (bilinear resize); the top classes are the Keras
  model's own on the same input. --mode=export of the same weights for Keras (no ImageNet
  prepared) scores as predict in a new keras.applications.DenseNet121."""
  body, keras_model = helpers.keras_densenet121_weights(tmp_path)
  helpers.serve(server, monkeypatch, 'keras:densenet121', body)
  monkeypatch.setenv('DENSENET_JAX_WEIGHTS_DIR', str(tmp_path / 'weights'))
  photos = [tmp_path / f'{i}.jpg' for i in range(2)]
  for path, photo in zip(photos, tiny_tfds.sample_photos()):
    path.write_bytes(tiny_tfds.jpeg(photo))
  (tmp_path / 'bad.jpg').write_bytes(b'no')
  config = imagenet_densenet121.get_config()
  config.init_from = 'keras:densenet121'
  predictions = predict.predict(config, None, [str(p) for p in photos] +
                                [str(tmp_path / 'bad.jpg')], top_k=3)
  assert [f for f, _ in predictions.unreadable] == [str(tmp_path / 'bad.jpg')]
  images = np.stack([pp.imagenet_eval(p.read_bytes(), 'bilinear').numpy() for p in photos])
  normalized = augment.apply(augment.DeviceTransform(*SPECS['imagenet2012'].normalization),
                             images)
  expected = np.argsort(-np.asarray(keras_model(np.asarray(normalized), training=False)),
                        axis=1)[:, :3]
  np.testing.assert_array_equal(predictions.top_classes, expected)
  names = dict(predict.shipped_classes(SPECS['imagenet2012']))
  assert predictions.class_names[expected[0, 0]] == list(names.values())[expected[0, 0]]

  # The same weights exported for Keras load into a new keras.applications model: predict's
  # top classes, and the source model's logits within ten times Keras's own float32 error
  # (against itself in float64). (Probabilities would not do: these random
  # weights make softmax round to 0 and 1.)
  written = export.export(settings.RunSettings.from_config(config), None,
                          str(tmp_path / 'export'), ['keras'])
  assert sorted(os.path.basename(p) for p in written) == ['classes.json', 'keras.weights.h5']
  logits = helpers.keras_export_logits(tmp_path / 'export', images)
  np.testing.assert_array_equal(np.argsort(-logits, axis=1)[:, :3], predictions.top_classes)
  reference = helpers.keras_float64_logits(keras_model, np.asarray(normalized))
  noise = np.abs(np.asarray(keras_model(np.asarray(normalized), training=False)) - reference).max()
  print(f'keras.weights.h5: max |logits - Keras float64| {np.abs(logits - reference).max():.3g}, '
        f'Keras float32 {noise:.3g}')
  assert 0 < noise and np.abs(logits - reference).max() <= 10 * noise
