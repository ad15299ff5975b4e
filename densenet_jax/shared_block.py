"""A dense block on one shared feature buffer, with its own backward pass (pure JAX, no Flax).

The idea of Pleiss et al. ("Memory-Efficient Implementation of DenseNets", 2017), done the JAX
way. Layer l of a block reads the concatenation [x_0, ..., x_{l-1}]; here that concatenation is
never built. The block preallocates one buffer of all its channels, c_0 + L * k, and each layer
writes its k new channels into it in place (`lax.dynamic_update_slice` under jit), so layer l's
input is the buffer's first c_l = c_0 + l * k channels, a slice.

The backward pass is `jax.custom_vjp` over the whole block, because the buffer is overwritten:
autodiff would keep every intermediate version of it. The finished buffer holds every layer's
input as a prefix, so the forward pass saves only the buffer (the block's output, which the
next transition keeps anyway), each BN's batch moments, and what `keep` names. The backward
pass walks the layers in reverse with one gradient buffer of the same shape, accumulating each
layer's input gradient into its first c_l channels in place: no gradient per concatenation
exists either.

  keep='activations'  each unit's ReLU output (its conv's input) and, with a bottleneck, the
                      bottleneck's output: the backward pass recomputes nothing but BN's
                      elementwise normalization (which PyTorch's BN backward recomputes too).
  keep='bottleneck'   only the bottleneck's output (4k channels) besides the buffer.
  keep='nothing'      the buffer and the moments: BN-ReLU (and the bottleneck's 1x1 conv) are
                      recomputed.

The arithmetic is Flax's BatchNorm (fast variance, float32 reductions for float32/bfloat16,
batch moments averaged over `axis_name`), its Dropout and models.Conv1x1AsMatmul / nn.Conv, so
outputs, gradients and statistics equal the module implementation's up to rounding.
"""

import dataclasses
import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

KEEP = ('activations', 'bottleneck', 'nothing')


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """What the block computes, fixed at trace time."""
  num_layers: int
  growth_rate: int
  bottleneck: bool
  epsilon: float
  dtype: str                      # compute dtype: float32, bfloat16 or float64
  reduce_dtype: str               # BN's reductions: float32, or float64 for float64
  axis_name: Optional[str] = None  # average the batch moments over this pmap axis
  dropout_rate: float = 0.0
  keep: str = 'nothing'

  def __post_init__(self):
    if self.keep not in KEEP:
      raise ValueError(f'keep={self.keep!r}: allowed values are {", ".join(KEEP)}')

  @property
  def units(self) -> Tuple[Tuple[int, int], ...]:
    """(features, kernel size) of each unit of a layer: [1x1 4k bottleneck,] 3x3 k."""
    composite = ((self.growth_rate, 3),)
    return (((4 * self.growth_rate, 1),) if self.bottleneck else ()) + composite

  def channels_in(self, x0_channels: int, layer: int) -> int:
    return x0_channels + layer * self.growth_rate


# ---------------------------------------------------------------------------------------------
# One unit, BN-ReLU-Conv-dropout, split where its pieces are saved or recomputed.

def local_moments(spec: BlockSpec, x):
  """This device's mean of x and of x^2 per channel, in the reduction dtype."""
  x = x.astype(spec.reduce_dtype)
  return jnp.mean(x, axis=(0, 1, 2)), jnp.mean(lax.square(x), axis=(0, 1, 2))


def global_moments(spec: BlockSpec, moments):
  """The moments over the whole batch: averaged over `axis_name` (one all-reduce)."""
  if spec.axis_name is None:
    return moments
  both = lax.pmean(jnp.stack(moments), spec.axis_name)
  return both[0], both[1]


def variance(moments):
  mean, mean_sq = moments
  return jnp.maximum(0.0, mean_sq - lax.square(mean))


def batch_moments(spec: BlockSpec, x):
  return global_moments(spec, local_moments(spec, x))


def normalize_relu(spec: BlockSpec, x, mean, var, scale, bias):
  """relu(BN(x)) given the statistics: Flax's order of operations, in the compute dtype."""
  y = (x - mean) * (lax.rsqrt(var + spec.epsilon) * scale) + bias
  return jax.nn.relu(y.astype(spec.dtype))


def conv_dropout(spec: BlockSpec, x, kernel, key):
  """The unit's convolution (1x1 as a matmul, 3x3 padded by 1, no bias), then dropout."""
  kernel = kernel.astype(spec.dtype)
  if kernel.shape[0] == 1:
    y = jnp.dot(x, kernel[0, 0])
  else:
    y = lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                 dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  if spec.dropout_rate > 0:
    keep_prob = 1.0 - spec.dropout_rate
    mask = jax.random.bernoulli(jax.random.wrap_key_data(key), p=keep_prob, shape=y.shape)
    y = lax.select(mask, y / keep_prob, jnp.zeros_like(y))
  return y


# ---------------------------------------------------------------------------------------------
# The block.

def forward(spec: BlockSpec, x0, params, keys, statistics=None):
  """The block's buffer [B, H, W, c_0 + L * k], batch moments per unit, and what is kept.

  params: per layer, per unit, (scale, bias, kernel HWIO). keys: per layer, per unit, the
  dropout key's data (or None without dropout). statistics: per layer, per unit, (mean, var)
  to normalize with (evaluation); None: the batch's own (training).
  """
  c0 = x0.shape[-1]
  buffer = jnp.zeros(x0.shape[:-1] + (spec.channels_in(c0, spec.num_layers),), spec.dtype)
  buffer = lax.dynamic_update_slice(buffer, x0.astype(spec.dtype), (0, 0, 0, 0))
  moments, kept = [], []
  for layer in range(spec.num_layers):
    # lax.slice: indexing lowers to a gather under a symbolic batch size (jax.export).
    x = lax.slice_in_dim(buffer, 0, spec.channels_in(c0, layer), axis=-1)
    layer_moments, layer_kept = [], []
    for unit, (scale, bias, kernel) in enumerate(params[layer]):
      if statistics is None:
        unit_moments = batch_moments(spec, x)
        mean, var = unit_moments[0], variance(unit_moments)
        layer_moments.append(unit_moments)
      else:
        mean, var = statistics[layer][unit]
      activation = normalize_relu(spec, x, mean, var, scale, bias)
      x = conv_dropout(spec, activation, kernel, keys[layer][unit])
      layer_kept.append(_kept(spec, unit, activation, x))
    moments.append(tuple(layer_moments))
    kept.append(tuple(layer_kept))
    buffer = lax.dynamic_update_slice(buffer, x, (0, 0, 0, spec.channels_in(c0, layer)))
  return buffer, tuple(moments), tuple(kept)


def _kept(spec: BlockSpec, unit: int, activation, output) -> dict:
  """What the forward pass saves of one unit for the backward pass."""
  kept = {}
  if spec.keep == 'activations':
    kept['activation'] = activation
  if spec.keep in ('activations', 'bottleneck') and spec.bottleneck and unit == 0:
    kept['output'] = output
  return kept


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _train_block(spec, x0, params, keys):
  buffer, moments, _ = forward(spec, x0, params, keys)
  return buffer, moments


def _train_block_fwd(spec, x0, params, keys):
  buffer, moments, kept = forward(spec, x0, params, keys)
  return (buffer, moments), (buffer, moments, kept, params, keys)


def _train_block_bwd(spec, residuals, cotangents):
  """Layers in reverse; the gradient buffer's first c_l channels accumulate in place.

  The moments' cotangents are dropped: they only feed the running averages, not the loss.
  """
  buffer, moments, kept, params, keys = residuals
  c0 = spec.channels_in(buffer.shape[-1], -spec.num_layers)
  grad_buffer = cotangents[0]
  grad_params = [None] * spec.num_layers
  for layer in reversed(range(spec.num_layers)):
    c = spec.channels_in(c0, layer)
    # The barrier makes this layer's recomputation wait for the later layers' gradients, so
    # that XLA cannot hoist every layer's recomputation to the start of the backward pass
    # (where all of them would be live at once).
    x, grad_buffer = lax.optimization_barrier((buffer[..., :c], grad_buffer))
    grad_x, grad_params[layer] = _layer_backward(
        spec, x, params[layer], moments[layer], kept[layer], keys[layer],
        grad_buffer[..., c:c + spec.growth_rate])
    grad_buffer = lax.dynamic_update_slice(grad_buffer, grad_buffer[..., :c] + grad_x,
                                           (0, 0, 0, 0))
  grad_keys = jax.tree.map(lambda k: np.zeros(k.shape, jax.dtypes.float0), keys)
  return grad_buffer[..., :c0], tuple(grad_params), grad_keys


def _layer_backward(spec, x, params, moments, kept, keys, grad_out):
  """(gradient of the layer's input x, gradients of its units' (scale, bias, kernel))."""
  inputs = [x]  # each unit's input: x, then the bottleneck's output
  for unit in range(len(params) - 1):
    output = kept[unit].get('output')
    if output is None:
      mean, var = moments[unit][0], variance(moments[unit])
      scale, bias, kernel = params[unit]
      output = conv_dropout(spec, normalize_relu(spec, inputs[-1], mean, var, scale, bias),
                            kernel, keys[unit])
    inputs.append(output)
  grads = [None] * len(params)
  grad = grad_out
  for unit in reversed(range(len(params))):
    grad, grads[unit] = _unit_backward(spec, inputs[unit], params[unit], moments[unit],
                                       kept[unit].get('activation'), keys[unit], grad)
  return grad, tuple(grads)


def _unit_backward(spec, x, params, moments, activation, key, grad_out):
  scale, bias, kernel = params
  if activation is None:
    activation = normalize_relu(spec, x, moments[0], variance(moments), scale, bias)
  _, conv_vjp = jax.vjp(lambda a, w: conv_dropout(spec, a, w, key), activation, kernel)
  grad_activation, grad_kernel = conv_vjp(grad_out)

  def normalize(x, moments, scale, bias):
    return normalize_relu(spec, x, moments[0], variance(moments), scale, bias)

  _, norm_vjp = jax.vjp(normalize, x, moments, scale, bias)
  grad_x, grad_moments, grad_scale, grad_bias = norm_vjp(grad_activation)
  # The moments depend on x too (and, with axis_name, on every device's x): transpose the
  # all-reduce (no forward all-reduce is repeated), then this device's means.
  if spec.axis_name is not None:
    local = tuple(jax.ShapeDtypeStruct(m.shape, m.dtype) for m in moments)
    grad_moments, = jax.linear_transpose(lambda m: global_moments(spec, m), local)(grad_moments)
  _, moments_vjp = jax.vjp(lambda x: local_moments(spec, x), x)
  grad_x = grad_x + moments_vjp(grad_moments)[0].astype(grad_x.dtype)
  return grad_x, (grad_scale, grad_bias, grad_kernel)


_train_block.defvjp(_train_block_fwd, _train_block_bwd)


def train_block(spec: BlockSpec, x0, params, keys):
  """(buffer, batch moments per unit) with the shared-storage backward pass (see module doc)."""
  return _train_block(spec, x0, params, keys)
