"""evaluation.py: what --mode=evaluate prints (errors in percent, the loss, each class's recall
and the confusion matrix), from an evaluation's numbers."""

from densenet_jax import evaluation


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
