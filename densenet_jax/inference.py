"""The model applied outside training: variables, the model's input, losses and the per-device
eval step. Pure JAX/Flax, no optimizer (optax) and no TensorFlow: prediction, evaluation and
exports import this, training (steps.py) builds on it.

The steps take the input pipeline's uint8 batches and make the model's input with an
`augment.DeviceTransform` (normalization, and for training the augmentation); without one the
batch's images are the model's input as they are.
"""

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from densenet_jax import augment

AXIS_NAME = 'batch'  # the pmap axis: BN statistics and gradients are averaged over it


@flax.struct.dataclass
class InferenceState:
  """What evaluation and prediction need of a model: its apply function, parameters, BN
  statistics and the step they are of (the fields of steps.TrainState that they read)."""
  step: Any
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  params: Any = None
  batch_stats: Any = None


def init_variables(model: nn.Module, rng: jax.Array, image_shape: Sequence[int]) -> tuple:
  """(variables, dropout key): the model initialized on a dummy batch of shape (1, *image_shape)
  (jitted: one compile) from the first half of `rng` (a typed key); the second half is the
  base key of training's dropout masks."""
  init_rng, dropout_rng = jax.random.split(rng)
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  variables = jax.jit(lambda r: model.init(r, dummy, train=False))(init_rng)
  return {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}, \
      dropout_rng


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy in float32 (float64 for float64 logits):
  logsumexp(logits) - logits[label] (optax's softmax_cross_entropy_with_integer_labels)."""
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - label_logits


def per_example_errors(logits: jax.Array, labels: jax.Array, top5: bool) -> dict:
  """Per-example 0/1 top-1 (and top-5) errors."""
  errors = {'top1_error': (jnp.argmax(logits, -1) != labels).astype(jnp.float32)}
  if top5:
    _, top = jax.lax.top_k(logits, 5)
    errors['top5_error'] = 1.0 - jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)
  return errors


def model_input(transform: Optional[augment.DeviceTransform], batch: dict) -> jax.Array:
  """The batch's images as the model's input (`transform` of the uint8 images, or as they are)."""
  if transform is None:
    return batch['image']
  return augment.apply(transform, batch['image'], batch.get('epoch'), batch.get('index'))


def eval_step(state, batch: dict, *, transform: Optional[augment.DeviceTransform] = None,
              top5: bool = False, confusion: bool = False,
              axis_name: Optional[str] = AXIS_NAME) -> dict:
  """Sums of loss and errors over the examples whose mask is 1 (padding has mask 0); with
  `confusion`, also the confusion matrix counts [true class, predicted class]. `state`: an
  InferenceState or a steps.TrainState.

  An image batch of shape [batch, crops, H, W, C] (10-crop) is scored by the mean of the crops'
  logits.
  """
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  images = model_input(transform, batch)
  if images.ndim == 5:
    crops = images.shape[1]
    logits = state.apply_fn(variables, images.reshape(-1, *images.shape[2:]), train=False)
    logits = logits.reshape(-1, crops, logits.shape[-1]).mean(axis=1)
  else:
    logits = state.apply_fn(variables, images, train=False)
  mask = batch['mask'].astype(jnp.float32)
  per_example = per_example_errors(logits, batch['label'], top5)
  per_example['loss'] = cross_entropy(logits, batch['label'])
  sums = {k: jnp.sum(v * mask) for k, v in per_example.items()}
  sums['count'] = jnp.sum(mask)
  if confusion:
    num_classes = logits.shape[-1]
    sums['confusion'] = jnp.zeros((num_classes, num_classes), jnp.float32).at[
        batch['label'], jnp.argmax(logits, -1)].add(mask)
  if axis_name is not None:
    sums = jax.lax.psum(sums, axis_name)
  return sums


def average_batch_stats(batch_stats, axis_name: str = AXIS_NAME):
  """Mean of per-device BN running statistics (used when BN statistics are per device)."""
  return jax.lax.pmean(batch_stats, axis_name)
