"""Training on a device: the optimizer, the learning-rate schedule, the train state and the
per-device train step, and the XLA options it is compiled with.

Pure JAX/Flax/optax: no TensorFlow, data or checkpoint code, so the benchmark and a GPU machine
without TensorFlow can import it. `train.py` pmaps the step over all local devices; the model's
input, the losses and the eval step are densenet_jax/inference.py's.
"""

import ctypes
import ctypes.util
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from densenet_jax import augment, inference
from densenet_jax.inference import AXIS_NAME, cross_entropy, model_input, per_example_errors


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
  """Initializes variables on a dummy batch of shape (1, *image_shape) and the optimizer state
  (each jitted: one compile).

  rng: a typed key (jax.random.key); the state's dropout_rng is one too.
  """
  variables, dropout_rng = inference.init_variables(model, rng, image_shape)
  # Jitted: optax's init builds a zero array per parameter, which eagerly is one compile per
  # distinct shape (67 for DenseNet-121, 2.6 s in all on a 2-core CPU).
  opt_state = jax.jit(tx.init)(variables['params'])
  return TrainState(step=0, apply_fn=model.apply, params=variables['params'], tx=tx,
                    opt_state=opt_state, batch_stats=variables['batch_stats'],
                    dropout_rng=dropout_rng)


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
