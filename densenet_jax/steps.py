"""The optimizer, the learning-rate schedule, the train state and the per-device train/eval steps.

Pure JAX/Flax/optax: no TensorFlow, data or checkpoint code, so the benchmark and a GPU machine
without TensorFlow can import it. `train.py` pmaps these steps over all local devices. The steps
take the input pipeline's uint8 batches and make the model's input with an
`augment.DeviceTransform` (normalization, and for training the augmentation); without one the
batch's images are the model's input as they are.
"""

import ctypes
import ctypes.util
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from densenet_jax import augment

AXIS_NAME = 'batch'  # the pmap axis: BN statistics and gradients are averaged over it


def compiler_options(platform: str) -> dict:
  """XLA options to compile the train step with on `platform` ('cpu', 'gpu', 'tpu').

  jax.checkpoint (the memory-efficient mode) fences its recomputation with optimization barriers.
  XLA:CPU expands them before CSE, which then merges the recomputation back into the forward
  pass and undoes the saving; keeping them (their expander pass disabled) makes the saving real
  on CPU as it is on GPU and TPU, which keep them. A step without barriers compiles as before.
  """
  return {'xla_disable_hlo_passes': 'cse_barrier_expander'} if platform == 'cpu' else {}


def release_freed_heap() -> bool:
  """Hands the heap memory the process has freed back to the OS (glibc's malloc_trim).

  Call it after compiling. XLA's compiler allocates and frees some GB of small objects for a
  deep DenseNet, and glibc keeps freed pages mapped, so without this the process holds them as
  long as it runs: DenseNet-BC-100 at batch 64 on 2 CPU cores holds 2,109 MiB after compiling
  and 844 MiB after this (docs/performance.md). False where there is no glibc (nothing done).
  """
  name = ctypes.util.find_library('c')
  try:
    trim = ctypes.CDLL(name).malloc_trim if name else None
  except (OSError, AttributeError):
    trim = None
  if trim is None:
    return False
  trim(0)
  return True


def learning_rate_schedule(base_lr: float, steps_per_epoch: int,
                           decay_epochs: Sequence[float], decay_factor: float = 0.1):
  """Piecewise constant: base_lr, times decay_factor after each of decay_epochs (completed)."""
  boundaries = {int(round(e * steps_per_epoch)): decay_factor for e in decay_epochs}
  return optax.piecewise_constant_schedule(base_lr, boundaries)


def sgd_nesterov(learning_rate, momentum: float, weight_decay: float):
  """Torch's SGD(nesterov=True, dampening=0, weight_decay): the original code's optimizer.

  g <- g + wd * p (every parameter, BN and bias included); v <- mu * v + g;
  p <- p - lr * (g + mu * v).
  """
  return optax.chain(
      optax.add_decayed_weights(weight_decay),
      optax.sgd(learning_rate, momentum=momentum, nesterov=True))


class TrainState(train_state.TrainState):
  """Params, optimizer state and step, plus BN running statistics and the dropout base key."""
  batch_stats: Any
  dropout_rng: jax.Array


def create_train_state(model: nn.Module, rng: jax.Array, image_shape: Sequence[int],
                       tx: optax.GradientTransformation) -> TrainState:
  """Initializes variables on a dummy batch of shape (1, *image_shape) (jitted: one compile).

  rng: a typed key (jax.random.key); the state's dropout_rng is one too.
  """
  init_rng, dropout_rng = jax.random.split(rng)
  dummy = jnp.zeros((1, *image_shape), jnp.float32)
  variables = jax.jit(lambda r: model.init(r, dummy, train=False))(init_rng)
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables.get('batch_stats', {}), tx=tx,
                           dropout_rng=dropout_rng)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy in float32 (float64 for float64 logits)."""
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


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


def train_step(state: TrainState, batch: dict, *, learning_rate_fn: Callable,
               transform: Optional[augment.DeviceTransform] = None, top5: bool = False,
               axis_name: Optional[str] = AXIS_NAME):
  """One SGD step on this device's shard; gradients are averaged over `axis_name`.

  Dropout masks depend on (dropout_rng, step, device index) only, so a resumed run draws the
  same masks as an uninterrupted one. A batch with a 'weight' per example (class weights)
  minimizes the mean of weight * loss.
  """
  rng = jax.random.fold_in(state.dropout_rng, state.step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  images = model_input(transform, batch)

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        mutable=['batch_stats'], rngs={'dropout': rng})
    losses = cross_entropy(logits, batch['label'])
    if 'weight' in batch:
      losses = losses * batch['weight']
    return losses.mean(), (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  metrics = {'loss': loss, 'learning_rate': learning_rate_fn(state.step)}
  metrics.update({k: v.mean() for k, v in
                  per_example_errors(logits, batch['label'], top5).items()})
  if axis_name is not None:
    grads = jax.lax.pmean(grads, axis_name)
    metrics = jax.lax.pmean(metrics, axis_name)
  metrics['finite'] = jnp.all(jnp.array(
      [jnp.isfinite(loss)] + [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, metrics


def eval_step(state: TrainState, batch: dict, *,
              transform: Optional[augment.DeviceTransform] = None, top5: bool = False,
              confusion: bool = False, axis_name: Optional[str] = AXIS_NAME) -> dict:
  """Sums of loss and errors over the examples whose mask is 1 (padding has mask 0); with
  `confusion`, also the confusion matrix counts [true class, predicted class].

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
