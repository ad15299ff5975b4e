"""inference.py: the eval step (masked sums, 10-crop means, the confusion matrix) and the loss,
against hand computations and optax's own loss; no optimizer involved."""

import jax
import numpy as np
import optax
import pytest

from densenet_jax import inference, models


def inference_state(model) -> inference.InferenceState:
  variables, _ = inference.init_variables(model, jax.random.key(0), (8, 8, 3))
  return inference.InferenceState(step=0, apply_fn=model.apply, **variables)


def test_eval_step_counts_only_unmasked_examples_and_averages_ten_crops():
  model = models.DenseNet(block_sizes=(1,), growth_rate=4, num_classes=3)
  state = inference_state(model)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
  labels = np.array([0, 1, 2, 0], np.int32)
  mask = np.array([1, 1, 1, 0], np.float32)
  sums = inference.eval_step(state, {'image': images, 'label': labels, 'mask': mask},
                             axis_name=None)
  logits = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats}, images)
  errors = (np.argmax(logits, -1) != labels)[:3]
  assert float(sums['count']) == 3
  assert float(sums['top1_error']) == pytest.approx(errors.sum())
  crops = np.stack([images, images[:, :, ::-1]], axis=1)  # [batch, 2 crops, H, W, C]
  flipped = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                           images[:, :, ::-1])
  mean_logits = (np.asarray(logits) + np.asarray(flipped)) / 2
  sums = inference.eval_step(state, {'image': crops, 'label': labels, 'mask': mask},
                             axis_name=None)
  expected = (np.argmax(mean_logits, -1) != labels)[:3].sum()
  assert float(sums['top1_error']) == pytest.approx(expected)


def test_eval_step_confusion_matrix_counts_unmasked_examples_by_true_and_predicted_class():
  model = models.DenseNet(block_sizes=(1,), growth_rate=4, num_classes=3)
  state = inference_state(model)
  images = np.random.default_rng(1).normal(size=(6, 8, 8, 3)).astype(np.float32)
  labels = np.array([0, 1, 2, 0, 1, 2], np.int32)
  mask = np.array([1, 1, 1, 1, 1, 0], np.float32)
  sums = inference.eval_step(state, {'image': images, 'label': labels, 'mask': mask},
                             confusion=True, axis_name=None)
  predicted = np.argmax(state.apply_fn({'params': state.params,
                                        'batch_stats': state.batch_stats}, images), -1)
  expected = np.zeros((3, 3))
  for true, guess in zip(labels[:5], predicted[:5]):
    expected[true, guess] += 1
  np.testing.assert_array_equal(sums['confusion'], expected)
  assert float(sums['top1_error']) == 5 - np.trace(expected)


def test_cross_entropy_is_optaxs_and_the_float64_hand_value():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(5, 7)) * 10
  labels = rng.integers(0, 7, 5)
  exact = np.log(np.exp(logits).sum(-1)) - logits[np.arange(5), labels]  # float64
  ours = inference.cross_entropy(logits.astype(np.float32), labels)
  peer = optax.softmax_cross_entropy_with_integer_labels(logits.astype(np.float32), labels)
  noise = np.abs(np.asarray(peer) - exact).max()  # optax's own float32 error
  assert ours.dtype == np.float32
  np.testing.assert_allclose(ours, exact, atol=max(4 * noise, 1e-6))


def test_top5_error_counts_a_label_outside_the_five_largest_logits():
  logits = np.array([[9, 8, 7, 6, 5, 4], [4, 5, 6, 7, 8, 9]], np.float32)
  errors = inference.per_example_errors(logits, np.array([4, 0]), top5=True)
  np.testing.assert_array_equal(errors['top1_error'], [1, 1])
  np.testing.assert_array_equal(errors['top5_error'], [0, 1])
