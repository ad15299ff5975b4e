"""DenseNet (Huang et al., CVPR 2017) as Flax Linen modules.

The network is built from one unit, the paper's composite function BN-ReLU-Conv applied to the
channel concatenation of its inputs (`BNReLUConv`):

  H_l, basic      = BNReLUConv(3x3, k)
  H_l, bottleneck = BNReLUConv(1x1, 4k) -> BNReLUConv(3x3, k)              (DenseNet-B)
  transition      = BNReLUConv(1x1, floor(theta * m)) -> AvgPool 2x2/2     (theta < 1: -C)

Layer order, init, BN constants and paddings follow the authors' code (docs/reference.md); the
named networks are `architectures.NAMED`, and their sizes and costs are in `costs`.
Dense blocks have two implementations with the same variables and, up to rounding, the same
numbers. 'shared' (the default, `SharedDenseBlock` over `shared_block`) writes every layer's k new
channels into one preallocated buffer per block and has its own backward pass, so no
concatenation is ever copied, forward or backward. 'concat' (`DenseBlock`, the reference that
reads as the paper) concatenates each unit's inputs. Either saves for the backward pass only
what PyTorch's autograd would save or less: in plain mode BN's sums and each unit's ReLU output;
with `memory_efficient=True` only each layer's conv output (k channels; with 'concat' also the
4k-channel bottleneck output) and BN's sums, recomputing BN-ReLU (and with 'shared' the
bottleneck's 1x1 conv) in the backward pass, so that activation memory grows linearly, not
quadratically, with depth.
"""

import dataclasses
import functools
import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from densenet_jax import architectures, shared_block

ModuleDef = Any

# Torch BN(eps=1e-5, momentum=0.1) == Flax BatchNorm(epsilon=1e-5, momentum=0.9).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9
# Original code: conv weights ~ N(0, sqrt(2 / (kh * kw * out_channels))), untruncated.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# Torch's nn.Linear default U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the bias is zeroed.
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


ACTIVATION = 'activation'  # checkpoint_name of a unit's ReLU output


def _is_reduction(prim) -> bool:
  return prim.name in ('reduce_sum', 'psum', 'psum_invariant')


def save_only_reductions(prim, *_, **__) -> bool:
  """Remat policy of the memory-efficient mode: save the per-channel sums of BN, nothing else.

  No full-size intermediate is kept (recomputing concat-BN-ReLU is cheap elementwise work), but
  BN's batch sums cost only O(channels) to keep, while recomputing them would read the whole
  concatenation once more per unit and, with `axis_name`, repeat BN's cross-device all-reduce in
  the backward pass, as `nothing_saveable` does.
  """
  return _is_reduction(prim)


def save_activations(prim, *_, **params) -> bool:
  """Remat policy of the plain mode: BN's sums and each unit's ReLU output (its conv's input).

  What PyTorch's autograd keeps of BN-ReLU-Conv less its copy of BN's input: BN's backward
  recomputes the normalized input elementwise (as PyTorch's BN backward does) from the unit's
  input, which the graph keeps anyway. Nothing costly is recomputed; without a policy JAX
  keeps x^2, x - mean, the ReLU output and its mask per unit, about twice PyTorch's bytes.
  """
  return _is_reduction(prim) or (prim.name == 'name' and params.get('name') == ACTIVATION)


# What the shared block keeps for its backward pass, by memory_efficient (shared_block.KEEP).
SHARED_KEEP = {False: 'activations', True: 'nothing'}
COMPUTE_DTYPES = {name: jnp.dtype(name) for name in architectures.COMPUTE_DTYPES}


class Conv1x1AsMatmul(nn.Conv):
  """nn.Conv that computes a 1x1, stride-1, unpadded, bias-free convolution as a matmul.

  Any other convolution is nn.Conv's. Same parameter ('kernel', HWIO) and same numbers, but
  XLA:CPU differentiates a matmul much faster than the equivalent conv_general_dilated: a
  DenseNet-BC-100 train step (batch 64, 2 cores) takes 4.5 s instead of 6.7 s
  (docs/performance.md). Not yet compared on a GPU.
  """
  # nn.Conv's fields that the matmul path reads or checks; tests fail if nn.Conv gains another.
  MATMUL_FIELDS = ('features', 'kernel_size', 'strides', 'padding', 'input_dilation',
                   'kernel_dilation', 'feature_group_count', 'use_bias', 'mask', 'dtype',
                   'param_dtype', 'precision', 'kernel_init', 'bias_init', 'conv_general_dilated',
                   'conv_general_dilated_cls', 'promote_dtype', 'parent', 'name')

  def _is_plain_1x1(self) -> bool:
    """Whether this convolution is a matmul of the channels. kernel_dilation does not matter
    for a 1x1 kernel; bias_init only for a bias, which the matmul path does not have."""
    unit = (None, 1, (1, 1))
    return (tuple(self.kernel_size) == (1, 1) and self.strides in unit
            and self.padding in ('VALID', ((0, 0), (0, 0))) and self.input_dilation in unit
            and not self.use_bias and self.feature_group_count == 1 and self.mask is None
            and self.conv_general_dilated is None and self.conv_general_dilated_cls is None)

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    if not self._is_plain_1x1():
      return super().__call__(inputs)
    kernel = self.param('kernel', self.kernel_init, (1, 1, inputs.shape[-1], self.features),
                        self.param_dtype)
    inputs, kernel = self.promote_dtype(inputs, kernel, dtype=self.dtype)
    return jnp.dot(inputs, kernel[0, 0], precision=self.precision)


class BNReLUConv(nn.Module):
  """concat(inputs) -> BN -> ReLU -> Conv (no bias, Torch-style explicit padding) -> dropout."""
  features: int
  kernel_size: int
  norm: ModuleDef
  conv: ModuleDef
  dropout_rate: float = 0.0
  deterministic: bool = True

  @nn.compact
  def __call__(self, inputs: Sequence[jax.Array]) -> jax.Array:
    x = inputs[0] if len(inputs) == 1 else jnp.concatenate(inputs, axis=-1)
    x = checkpoint_name(nn.relu(self.norm(name='norm')(x)), ACTIVATION)
    pad = (self.kernel_size - 1) // 2
    x = self.conv(self.features, (self.kernel_size, self.kernel_size),
                  padding=((pad, pad), (pad, pad)), name='conv')(x)
    if self.dropout_rate > 0 and not self.deterministic:
      # The unit's own key (not Dropout's), so that SharedDenseBlock draws the same masks.
      x = nn.Dropout(self.dropout_rate, deterministic=False)(x, rng=self.make_rng('dropout'))
    return x


class DenseLayer(nn.Module):
  """H_l: maps the list of all earlier feature maps [x_0, ..., x_{l-1}] to x_l (k channels)."""
  growth_rate: int
  bottleneck: bool
  unit: ModuleDef  # BNReLUConv, possibly rematerialized, with norm/conv/dropout bound

  @nn.compact
  def __call__(self, inputs: Sequence[jax.Array]) -> jax.Array:
    if self.bottleneck:
      inputs = [self.unit(4 * self.growth_rate, 1, name='bottleneck')(inputs)]
    return self.unit(self.growth_rate, 3, name='composite')(inputs)


class Transition(nn.Module):
  """BN-ReLU-Conv1x1(floor(theta * m)) - AvgPool 2x2/2 between two dense blocks."""
  features: int
  unit: ModuleDef

  @nn.compact
  def __call__(self, inputs: Sequence[jax.Array]) -> jax.Array:
    x = self.unit(self.features, 1, name='composite')(inputs)
    return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseBlock(nn.Module):
  """num_layers dense layers; returns the list [x_0, ..., x_L] whose concatenation is the output."""
  num_layers: int
  growth_rate: int
  bottleneck: bool
  unit: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> list:
    features = [x]
    for i in range(self.num_layers):
      layer = DenseLayer(self.growth_rate, self.bottleneck, self.unit, name=f'layer{i + 1}')
      features.append(layer(features))
    return features


class BNVariables(nn.Module):
  """nn.BatchNorm's variables (scale, bias; running mean, var) without its computation."""
  features: int
  param_dtype: Any

  def setup(self):
    shape = (self.features,)
    self.mean = self.variable('batch_stats', 'mean', jnp.zeros, shape, self.param_dtype)
    self.var = self.variable('batch_stats', 'var', jnp.ones, shape, self.param_dtype)
    self.scale = self.param('scale', nn.initializers.ones, shape, self.param_dtype)
    self.bias = self.param('bias', nn.initializers.zeros, shape, self.param_dtype)

  def update(self, moments):
    """nn.BatchNorm's running averages, from the batch moments (mean of x, mean of x^2)."""
    self.mean.value = BN_MOMENTUM * self.mean.value + (1 - BN_MOMENTUM) * moments[0]
    self.var.value = (BN_MOMENTUM * self.var.value
                      + (1 - BN_MOMENTUM) * shared_block.variance(moments))


class KernelVariable(nn.Module):
  """A bias-free convolution's kernel (HWIO), initialized as the module implementation's."""
  shape: Tuple[int, ...]
  param_dtype: Any

  def setup(self):
    self.kernel = self.param('kernel', conv_init, self.shape, self.param_dtype)


class UnitVariables(nn.Module):
  """The variables (and dropout key) of one BNReLUConv, at the same path, for SharedDenseBlock."""
  in_features: int
  features: int
  kernel_size: int
  param_dtype: Any

  def setup(self):
    self.norm = BNVariables(self.in_features, self.param_dtype)
    shape = (self.kernel_size, self.kernel_size, self.in_features, self.features)
    self.conv = KernelVariable(shape, self.param_dtype)

  def __call__(self, dropout: bool):
    """((scale, bias, kernel), (running mean, var), dropout key data or None)."""
    key = jax.random.key_data(self.make_rng('dropout')) if dropout else None
    return ((self.norm.scale, self.norm.bias, self.conv.kernel),
            (self.norm.mean.value, self.norm.var.value), key)


class LayerVariables(nn.Module):
  """H_l's variables: [bottleneck,] composite, named as DenseLayer's units."""
  in_features: int
  growth_rate: int
  with_bottleneck: bool
  param_dtype: Any

  def setup(self):
    k, dtype = self.growth_rate, self.param_dtype
    if self.with_bottleneck:
      self.bottleneck = UnitVariables(self.in_features, 4 * k, 1, dtype)
    width = 4 * k if self.with_bottleneck else self.in_features
    self.composite = UnitVariables(width, k, 3, dtype)

  def units(self) -> tuple:
    return ((self.bottleneck,) if self.with_bottleneck else ()) + (self.composite,)

  def __call__(self, dropout: bool):
    """Per unit: (scale, bias, kernel), (running mean, var), dropout key data or None."""
    return tuple(zip(*(unit(dropout) for unit in self.units())))

  def update(self, moments):
    for unit, unit_moments in zip(self.units(), moments):
      unit.norm.update(unit_moments)


class SharedDenseBlock(nn.Module):
  """DenseBlock on one shared feature buffer (`shared_block`): the same variables, outputs,
  gradients and statistics, without concatenations. Returns [buffer], the block's output."""
  num_layers: int
  growth_rate: int
  bottleneck: bool
  dtype: str
  param_dtype: Any
  keep: str
  dropout_rate: float = 0.0
  axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> list:
    layers = [LayerVariables(x.shape[-1] + i * self.growth_rate, self.growth_rate,
                             self.bottleneck, self.param_dtype, name=f'layer{i + 1}')
              for i in range(self.num_layers)]
    params, statistics, keys = zip(*(layer(train and self.dropout_rate > 0) for layer in layers))
    spec = shared_block.BlockSpec(
        self.num_layers, self.growth_rate, self.bottleneck, BN_EPSILON, self.dtype,
        'float64' if self.param_dtype == jnp.float64 else 'float32',
        axis_name=None if self.is_initializing() else self.axis_name,
        dropout_rate=self.dropout_rate if train else 0.0, keep=self.keep)
    if not train:
      return [shared_block.forward(spec, x, params, keys, statistics)[0]]
    buffer, moments = shared_block.train_block(spec, x, params, keys)
    if not self.is_initializing():
      for layer, layer_moments in zip(layers, moments):
        layer.update(layer_moments)
    return [buffer]


@dataclasses.dataclass(frozen=True)
class FeatureInfo:
  """One stage of `DenseNet.features`: the module it is the output of, its channels, its
  stride (input size / its size), and the torchvision module whose output it equals (ImageNet
  stem; None for CIFAR/SVHN networks, which torchvision does not have)."""
  name: str
  channels: int
  stride: int
  torchvision_module: Optional[str]


class DenseNet(nn.Module):
  """A DenseNet of any variant: basic, -B (bottleneck), -C (compression < 1) and -BC.

  Attributes:
    block_sizes: number of dense layers in each dense block.
    growth_rate: k, the channels each dense layer adds.
    bottleneck: use the 1x1 (4k) bottleneck in H_l (DenseNet-B).
    compression: theta in (0, 1]; transitions output floor(theta * m) channels.
    stem: 'cifar' (one 3x3 conv) or 'imagenet' (7x7/2 conv, BN, ReLU, 3x3/2 max pool).
    stem_features: channels of the stem conv; None: 2k for ImageNet and for CIFAR DenseNet-BC,
      16 for the other CIFAR variants (the paper's choice, which gives its parameter counts).
    dropout_rate: dropout after every conv except the stem's (0.2 in the paper without
      augmentation).
    num_classes: outputs of the classifier; 0: headless, no classifier, the model outputs its
      pooled features (`num_features` wide), for linear probes, retrieval and backbones.
    dtype: compute dtype, 'float32' or 'bfloat16'; parameters and BN statistics stay float32.
      'float64' (parameters in float64 too; needs jax_enable_x64) is a numerical reference for
      tests and experiments: the same computation with rounding ~1e9 times smaller.
    memory_efficient: keep less for the backward pass and recompute BN-ReLU (and the
      bottleneck's 1x1 conv) there instead (same outputs, gradients and statistics).
    implementation: 'shared', dense blocks on one shared feature buffer with their own
      backward pass (`shared_block`: no concatenation is ever copied), or 'concat', the module
      implementation (DenseBlock: each unit concatenates its inputs; under nn.remat). Same
      variables and, up to rounding, the same numbers.
    axis_name: if set, BatchNorm averages batch statistics over this pmap axis in training.
  """
  block_sizes: Sequence[int]
  growth_rate: int
  bottleneck: bool = False
  compression: float = 1.0
  stem: str = 'cifar'
  stem_features: Optional[int] = None
  dropout_rate: float = 0.0
  num_classes: int = 10
  dtype: str = 'float32'
  memory_efficient: bool = False
  implementation: str = 'shared'
  axis_name: Optional[str] = None

  def __post_init__(self):
    if self.implementation not in architectures.IMPLEMENTATIONS:
      raise ValueError(f'implementation={self.implementation!r}: allowed values are '
                       f'{", ".join(architectures.IMPLEMENTATIONS)}')
    architectures.validate_hyperparameters(
        block_sizes=self.block_sizes, growth_rate=self.growth_rate, compression=self.compression,
        stem=self.stem, stem_features=self.stem_features, dropout_rate=self.dropout_rate,
        num_classes=self.num_classes, dtype=self.dtype)
    if self.dtype == 'float64' and not jax.config.jax_enable_x64:
      raise ValueError("dtype='float64' needs jax_enable_x64 (JAX_ENABLE_X64=1 or "
                       "jax.enable_x64(True)); without it JAX computes in float32")
    super().__post_init__()

  @property
  def num_stem_features(self) -> int:
    if self.stem_features is not None:
      return self.stem_features
    if self.stem == 'imagenet' or (self.bottleneck and self.compression < 1):
      return 2 * self.growth_rate
    return 16

  def stage_channels(self) -> tuple:
    """Channels of each dense block's output, and the widths of the transitions after them:
    ((block output, transition output or None), ...)."""
    channels, stages = self.num_stem_features, []
    for i, num_layers in enumerate(self.block_sizes):
      channels += num_layers * self.growth_rate
      last = i + 1 == len(self.block_sizes)
      transition = None if last else int(math.floor(self.compression * channels))
      stages.append((channels, transition))
      channels = transition
    return tuple(stages)

  @property
  def feature_info(self) -> Tuple[FeatureInfo, ...]:
    """What `features` returns, stage by stage (its channels, its stride)."""
    first_stride = 4 if self.stem == 'imagenet' else 1
    names = [f'block{i + 1}' for i in range(len(self.block_sizes) - 1)] + ['head_norm']
    torchvision = [f'features.denseblock{i + 1}' for i in range(len(self.block_sizes) - 1)]
    torchvision.append('features.norm5')
    if self.stem != 'imagenet':
      torchvision = [None] * len(names)
    return tuple(FeatureInfo(name, channels, first_stride * 2 ** i, module)
                 for i, (name, (channels, _), module)
                 in enumerate(zip(names, self.stage_channels(), torchvision)))

  @property
  def num_features(self) -> int:
    """Width of the pooled features (the classifier's input; the output when headless)."""
    return self.stage_channels()[-1][0]

  def features(self, x: jax.Array, train: bool = False) -> list:
    """Each stage's output, [B, H / stride, W / stride, channels] as `feature_info` says:
    every dense block's output (the concatenation of its input and its layers' outputs, before
    the transition), the last one after the final BN (head_norm), before its ReLU: torchvision's
    `features.denseblockN` and `features.norm5`, where torchvision's `features` ends.

      model.apply(variables, images, method='features')
    """
    return self(x, train, stages=True)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, stages: bool = False):
    """Logits [B, num_classes]; with num_classes=0 (headless) the pooled features
    [B, num_features]; with `stages`, `features`."""
    dtype = COMPUTE_DTYPES[self.dtype]
    param_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
                             epsilon=BN_EPSILON, dtype=dtype, param_dtype=param_dtype,
                             force_float32_reductions=param_dtype == jnp.float32,  # else float64
                             axis_name=self.axis_name)
    conv = functools.partial(Conv1x1AsMatmul, use_bias=False, kernel_init=conv_init, dtype=dtype,
                             param_dtype=param_dtype)
    policy = save_only_reductions if self.memory_efficient else save_activations
    unit = functools.partial(nn.remat(BNReLUConv, policy=policy), norm=norm, conv=conv,
                             dropout_rate=self.dropout_rate, deterministic=not train)

    x = x.astype(dtype)
    stem_width = self.num_stem_features
    if self.stem == 'cifar':
      x = conv(stem_width, (3, 3), padding=((1, 1), (1, 1)), name='stem_conv')(x)
    else:
      x = conv(stem_width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_norm')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    outputs = []
    for i, (num_layers, (_, transition)) in enumerate(zip(self.block_sizes,
                                                          self.stage_channels())):
      if self.implementation == 'shared':
        features = SharedDenseBlock(
            num_layers, self.growth_rate, self.bottleneck, self.dtype, param_dtype,
            keep=SHARED_KEEP[self.memory_efficient], dropout_rate=self.dropout_rate,
            axis_name=self.axis_name, name=f'block{i + 1}')(x, train)
      else:
        features = DenseBlock(num_layers, self.growth_rate, self.bottleneck, unit,
                              name=f'block{i + 1}')(x)
      if transition is not None:
        if stages:
          outputs.append(jnp.concatenate(features, axis=-1))
        x = Transition(transition, unit, name=f'transition{i + 1}')(features)

    if stages:
      return outputs + [norm(name='head_norm')(jnp.concatenate(features, axis=-1))]

    def head(module, features):
      """BN-ReLU-global average pool of the last block's output; under remat, so that its
      backward pass recomputes BN-ReLU from the block's output (kept anyway) instead of
      keeping four copies of it."""
      x = jnp.concatenate(features, axis=-1)
      return jnp.mean(nn.relu(norm(name='head_norm')(x)), axis=(1, 2))

    x = nn.remat(head, policy=save_only_reductions)(self, features)
    if self.num_classes:
      x = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=dtype,
                   param_dtype=param_dtype, name='classifier')(x)
    return x.astype(param_dtype)  # float32 logits (float64 for the float64 reference)


def build_model(**fields) -> DenseNet:
  """A DenseNet from config.model-like fields: its architecture (architectures.FIELDS: depth for
  three equal CIFAR/SVHN blocks, or block_sizes) and DenseNet's other attributes."""
  architecture = architectures.from_fields(fields)
  options = {k: v for k, v in fields.items() if k not in architectures.FIELDS}
  allowed = {f.name for f in dataclasses.fields(DenseNet)} - {'parent', 'name'}
  unknown = sorted(set(options) - allowed)
  if unknown:
    raise ValueError(f'unknown option(s) {", ".join(unknown)}; allowed: '
                     f'{", ".join(sorted(allowed | set(architectures.FIELDS)))}')
  return DenseNet(**dataclasses.asdict(architecture), **options)


def create_model(name: str, num_classes: Optional[int] = None, **overrides) -> DenseNet:
  """A network of `architectures.NAMED`; any DenseNet attribute may be overridden.

  CIFAR/SVHN networks also take `depth` (L), from which the three block sizes follow, e.g.
  create_model('densenet40_k12', depth=100, growth_rate=24). Values that are None are ignored,
  so a config can carry optional fields.
  """
  if name not in architectures.NAMED:
    raise ValueError(f'model {name!r} is unknown; available models: '
                     f'{", ".join(architectures.NAMED)}')
  fields = architectures.NAMED[name].config_fields()
  overrides = {k: v for k, v in overrides.items() if v is not None}
  if 'depth' in overrides and 'depth' not in fields:
    raise ValueError(f'model {name!r} is given by block sizes, not by depth')
  if 'block_sizes' in overrides:
    fields.pop('depth', None)
  if num_classes is not None:
    overrides['num_classes'] = num_classes
  return build_model(**{**fields, **overrides})
