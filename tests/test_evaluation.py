"""evaluation.py: what --mode=evaluate prints (errors in percent, the loss, each class's recall
and the confusion matrix), from an evaluation's numbers; imported weights evaluated as their
source evaluates them."""

import numpy as np
import pytest
import scipy.special

from configs import imagenet_densenet121
from densenet_jax import augment, evaluation, input_pipeline
from densenet_jax.datasets import DataOptions
from densenet_jax.devices import Topology
from experiments import tiny_tfds


def test_format_evaluation_prints_every_split_and_the_per_class_table():
  result = {'step': 44,
            'eval': {'test': {'top1_error': 0.125, 'top5_error': 0.0, 'loss': 0.31234,
                              'count': 8}},
            'per_class': {'test': {'class_names': ['cat', 'a'], 'recall': [0.75, None],
                                   'confusion_matrix': [[3, 1], [0, 0]]}}}
  assert evaluation.format_evaluation(result).splitlines() == [
      'test (8 images, step 44): top1_error 12.50% top5_error 0.00% loss 0.3123',
      'test: recall per class, then the confusion matrix (row: true, column: predicted)',
      '  cat  75.00% |    3    1',
      '    a       - |    0    0']
  del result['per_class']
  assert len(evaluation.format_evaluation(result).splitlines()) == 1


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')  # Keras's own
def test_imported_keras_weights_score_as_keras_scores_them(tmp_path, keras_file):
  """--mode=evaluate's numbers (evaluation.evaluate; main.py prints them: test_main.py) for a
  Keras DenseNet-121, against Keras itself on the same preprocessed validation images."""
  path, keras_model = keras_file
  data_dir = tmp_path / 'tfds'
  tiny_tfds.build_imagenet(data_dir, data_dir / 'manual')
  config = imagenet_densenet121.get_config()
  config.init_from, config.data_dir, config.eval_batch_size = path, str(data_dir), 8
  result = evaluation.evaluate(config, None)['eval']['validation']

  # Keras on the images as the eval pipeline gives them (bicubic resize 256, center crop 224).
  data = input_pipeline.Data(DataOptions('imagenet2012', str(data_dir), eval_resize='bicubic'))
  batches, _ = data.eval_iterator('validation', Topology(8))
  transform = data.device_transform(train=False)
  log_probs, labels = [], []
  for batch in batches:
    mask = batch['mask'][0] == 1
    images = np.asarray(augment.apply(transform, batch['image'][0][mask]))
    logits = np.asarray(keras_model(images, training=False), np.float64)
    log_probs.append(logits - scipy.special.logsumexp(logits, axis=-1, keepdims=True))
    labels.append(batch['label'][0][mask])
  log_probs, labels = np.concatenate(log_probs), np.concatenate(labels)
  assert result['count'] == len(labels)
  assert result['top1_error'] == pytest.approx(np.mean(log_probs.argmax(-1) != labels), abs=1e-6)
  assert result['loss'] == pytest.approx(-np.mean(log_probs[np.arange(len(labels)), labels]),
                                         abs=2e-4)
