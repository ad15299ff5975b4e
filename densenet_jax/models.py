"""DenseNet (Huang et al., CVPR 2017) as Flax Linen modules.

The network is built from one unit, the paper's composite function BN-ReLU-Conv applied to the
channel concatenation of its inputs (`BNReLUConv`):

  H_l, basic      = BNReLUConv(3x3, k)
  H_l, bottleneck = BNReLUConv(1x1, 4k) -> BNReLUConv(3x3, k)              (DenseNet-B)
  transition      = BNReLUConv(1x1, floor(theta * m)) -> AvgPool 2x2/2     (theta < 1: -C)

Layer order, init, BN constants and paddings follow ../shared/reference/densenet-facts.md.
With `memory_efficient=True` each unit runs under `nn.remat`: its concatenation, BN and ReLU are
recomputed in the backward pass, so the backward pass keeps only the conv outputs (k channels per
layer, plus the 4k-channel bottleneck output in -B models) and activation memory grows linearly,
not quadratically, with depth. Parameters, outputs, gradients and BN statistics are unchanged.
"""

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp

ModuleDef = Any

# Torch BN(eps=1e-5, momentum=0.1) == Flax BatchNorm(epsilon=1e-5, momentum=0.9).
BN_EPSILON = 1e-5
BN_MOMENTUM = 0.9
# Original code: conv weights ~ N(0, sqrt(2 / (kh * kw * out_channels))), untruncated.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
# Torch's nn.Linear default U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the bias is zeroed.
dense_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def save_only_reductions(prim, *_, **__) -> bool:
  """Remat policy of the memory-efficient mode: save the per-channel sums of BN, nothing else.

  No full-size intermediate is kept (recomputing concat-BN-ReLU is cheap elementwise work), but
  BN's batch sums cost only O(channels) to keep, while recomputing them would read the whole
  concatenation once more per unit and, with `axis_name`, repeat BN's cross-device all-reduce in
  the backward pass, as `nothing_saveable` does.
  """
  return prim.name in ('reduce_sum', 'psum', 'psum_invariant')


COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
STEMS = ('cifar', 'imagenet')


class Conv(nn.Conv):
  """nn.Conv that computes a 1x1, stride-1, unpadded, bias-free convolution as a matmul.

  Same parameter ('kernel', HWIO) and same numbers, but XLA:CPU differentiates a matmul much
  faster than the equivalent conv_general_dilated: a DenseNet-BC-100 train step (batch 64, 2
  cores) takes 4.5 s instead of 6.7 s (docs/performance.md). Not yet compared on a GPU.
  """

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    if (tuple(self.kernel_size) != (1, 1) or self.strides not in (None, 1, (1, 1))
        or self.padding != ((0, 0), (0, 0)) or self.use_bias or self.feature_group_count != 1
        or self.input_dilation not in (None, 1, (1, 1)) or self.mask is not None):
      return super().__call__(inputs)
    kernel = self.param('kernel', self.kernel_init, (1, 1, inputs.shape[-1], self.features),
                        self.param_dtype)
    inputs, kernel = nn.dtypes.promote_dtype(inputs, kernel, dtype=self.dtype)
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
    x = nn.relu(self.norm(name='norm')(x))
    pad = (self.kernel_size - 1) // 2
    x = self.conv(self.features, (self.kernel_size, self.kernel_size),
                  padding=((pad, pad), (pad, pad)), name='conv')(x)
    if self.dropout_rate > 0:
      x = nn.Dropout(self.dropout_rate, deterministic=self.deterministic)(x)
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


def cifar_block_sizes(depth: int, bottleneck: bool) -> tuple:
  """Three equal dense blocks for a CIFAR/SVHN network of total depth L."""
  divisor = 6 if bottleneck else 3
  variant = 'with bottleneck (-B/-BC)' if bottleneck else 'without bottleneck'
  if not isinstance(depth, int) or depth < 4 + divisor or (depth - 4) % divisor:
    raise ValueError(
        f'depth={depth!r} is not a CIFAR/SVHN DenseNet {variant}: '
        f'allowed depths are L >= {4 + divisor} with (L - 4) divisible by {divisor}')
  return ((depth - 4) // divisor,) * 3


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
    num_classes: outputs of the classifier.
    dtype: compute dtype, 'float32' or 'bfloat16'; parameters and BN statistics stay float32.
    memory_efficient: recompute concat-BN-ReLU-conv in the backward pass (same outputs).
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
  axis_name: Optional[str] = None

  def __post_init__(self):
    validate_hyperparameters(block_sizes=self.block_sizes, growth_rate=self.growth_rate,
                             compression=self.compression, stem=self.stem,
                             stem_features=self.stem_features, dropout_rate=self.dropout_rate,
                             num_classes=self.num_classes, dtype=self.dtype)
    super().__post_init__()

  @property
  def num_stem_features(self) -> int:
    if self.stem_features is not None:
      return self.stem_features
    if self.stem == 'imagenet' or (self.bottleneck and self.compression < 1):
      return 2 * self.growth_rate
    return 16

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dtype = COMPUTE_DTYPES[self.dtype]
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
                             epsilon=BN_EPSILON, dtype=dtype, axis_name=self.axis_name)
    conv = functools.partial(Conv, use_bias=False, kernel_init=conv_init, dtype=dtype)
    unit_cls = (nn.remat(BNReLUConv, policy=save_only_reductions)
                if self.memory_efficient else BNReLUConv)
    unit = functools.partial(unit_cls, norm=norm, conv=conv, dropout_rate=self.dropout_rate,
                             deterministic=not train)

    x = x.astype(dtype)
    stem_width = self.num_stem_features
    if self.stem == 'cifar':
      x = conv(stem_width, (3, 3), padding=((1, 1), (1, 1)), name='stem_conv')(x)
    else:
      x = conv(stem_width, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_norm')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

    channels = stem_width
    for i, num_layers in enumerate(self.block_sizes):
      block = DenseBlock(num_layers, self.growth_rate, self.bottleneck, unit, name=f'block{i + 1}')
      features = block(x)
      channels += num_layers * self.growth_rate
      if i + 1 < len(self.block_sizes):
        channels = int(math.floor(self.compression * channels))
        x = Transition(channels, unit, name=f'transition{i + 1}')(features)

    x = jnp.concatenate(features, axis=-1)
    x = nn.relu(norm(name='head_norm')(x))
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, kernel_init=dense_init, dtype=dtype, name='classifier')(x)
    return x.astype(jnp.float32)


def validate_hyperparameters(*, block_sizes, growth_rate, compression, stem, stem_features,
                             dropout_rate, num_classes, dtype):
  """Raises ValueError naming the first hyperparameter that no DenseNet can have."""
  def positive_int(value):
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1

  if not block_sizes or not all(positive_int(n) for n in block_sizes):
    raise ValueError(f'block_sizes={block_sizes!r}: need one or more positive integers')
  if not positive_int(growth_rate):
    raise ValueError(f'growth_rate={growth_rate!r}: the growth rate k must be an integer >= 1')
  if isinstance(compression, bool) or not isinstance(compression, (int, float)) or not (
      0 < compression <= 1):
    raise ValueError(f'compression={compression!r}: theta must be in (0, 1]')
  if stem not in STEMS:
    raise ValueError(f'stem={stem!r}: allowed stems are {", ".join(STEMS)}')
  if stem_features is not None and not positive_int(stem_features):
    raise ValueError(f'stem_features={stem_features!r}: must be None or an integer >= 1')
  if isinstance(dropout_rate, bool) or not isinstance(dropout_rate, (int, float)) or not (
      0 <= dropout_rate < 1):
    raise ValueError(f'dropout_rate={dropout_rate!r}: must be in [0, 1)')
  if not positive_int(num_classes):
    raise ValueError(f'num_classes={num_classes!r}: must be an integer >= 1')
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f'dtype={dtype!r}: allowed compute dtypes are {", ".join(COMPUTE_DTYPES)}')


# ---------------------------------------------------------------------------------------------
# Named models of the paper. CIFAR/SVHN models are given by depth, ImageNet ones by block sizes.

_CIFAR = dict(stem='cifar', image_size=32)
_IMAGENET = dict(stem='imagenet', image_size=224, bottleneck=True, compression=0.5)
MODELS = {
    'densenet40_k12': dict(_CIFAR, depth=40, growth_rate=12),
    'densenet100_k12': dict(_CIFAR, depth=100, growth_rate=12),
    'densenet100_k24': dict(_CIFAR, depth=100, growth_rate=24),
    'densenet_bc100_k12': dict(_CIFAR, depth=100, growth_rate=12, bottleneck=True,
                               compression=0.5),
    'densenet_bc250_k24': dict(_CIFAR, depth=250, growth_rate=24, bottleneck=True,
                               compression=0.5),
    'densenet_bc190_k40': dict(_CIFAR, depth=190, growth_rate=40, bottleneck=True,
                               compression=0.5),
    'densenet121': dict(_IMAGENET, block_sizes=(6, 12, 24, 16), growth_rate=32),
    'densenet169': dict(_IMAGENET, block_sizes=(6, 12, 32, 32), growth_rate=32),
    'densenet201': dict(_IMAGENET, block_sizes=(6, 12, 48, 32), growth_rate=32),
    'densenet264': dict(_IMAGENET, block_sizes=(6, 12, 64, 48), growth_rate=32),
    'densenet161': dict(_IMAGENET, block_sizes=(6, 12, 36, 24), growth_rate=48),
}


def list_models() -> list:
  return list(MODELS)


def native_image_size(name: str) -> int:
  """The input resolution a named model was defined for (32 or 224)."""
  return _model_spec(name)['image_size']


def _model_spec(name: str) -> dict:
  if name not in MODELS:
    raise ValueError(f'model {name!r} is unknown; available models: {", ".join(MODELS)}')
  return MODELS[name]


def create_model(name: str, num_classes: int = None, **overrides) -> DenseNet:
  """A named DenseNet; any DenseNet attribute may be overridden.

  CIFAR/SVHN models also take `depth` (L), from which the three block sizes follow, e.g.
  create_model('densenet40_k12', depth=100, growth_rate=24). Values that are None are ignored,
  so a config can carry optional fields.
  """
  spec = dict(_model_spec(name))
  spec.pop('image_size')
  overrides = {k: v for k, v in overrides.items() if v is not None}
  allowed = {f.name for f in DenseNet.__dataclass_fields__.values()
             if f.name not in ('parent', 'name')}
  if spec['stem'] == 'cifar':
    allowed.add('depth')
  unknown = sorted(set(overrides) - allowed)
  if unknown:
    raise ValueError(f'unknown option(s) {", ".join(unknown)} for model {name!r}; '
                     f'allowed: {", ".join(sorted(allowed))}')
  spec.update(overrides)
  if num_classes is not None:
    spec['num_classes'] = num_classes
  if 'depth' in spec:
    depth = spec.pop('depth')
    if 'block_sizes' not in overrides:
      spec['block_sizes'] = cifar_block_sizes(depth, spec.get('bottleneck', False))
  return DenseNet(**spec)


# ---------------------------------------------------------------------------------------------
# Size and cost, computed from shapes alone (nothing is compiled).

def init_shapes(model: DenseNet, image_size: int, batch_size: int = 1):
  """The shapes of `model.init`'s variables, via jax.eval_shape (no compile)."""
  x = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def count_params(variables) -> int:
  """Trainable parameters (BN running statistics excluded) of a variables tree or its shapes."""
  return sum(math.prod(p.shape) for p in jax.tree_util.tree_leaves(variables['params']))


def count_multiply_adds(model: DenseNet, image_size: int) -> int:
  """Convolution and dense multiply-adds of one image's forward pass, read off the jaxpr."""
  variables = init_shapes(model, image_size)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x).jaxpr
  return _multiply_adds(jaxpr)


def saved_activation_bytes(model: DenseNet, image_size: int, batch_size: int) -> int:
  """Bytes that a training forward pass saves for its backward pass, read off the jaxpr.

  The distinct residuals of `jax.vjp` with respect to the parameters, less the variables and
  the images themselves: the activation memory a memory-efficient mode is meant to cut, on any
  backend (nothing is compiled; on XLA:CPU the saving needs steps.compiler_options).
  """
  variables = init_shapes(model, image_size)
  x = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)

  def residuals(params, batch_stats, x, rng):
    def forward(params):
      return model.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                         mutable=['batch_stats'], rngs={'dropout': rng})
    return jax.vjp(forward, params)[1]

  jaxpr = jax.make_jaxpr(residuals)(variables['params'], variables['batch_stats'], x,
                                    jax.random.key(0)).jaxpr
  saved = {v for v in jaxpr.outvars if isinstance(v, jax.extend.core.Var)} - set(jaxpr.invars)
  return sum(v.aval.size * v.aval.dtype.itemsize for v in saved)


def _multiply_adds(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params['dimension_numbers'].rhs_spec  # (out, in, spatial...)
      per_output = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
      total += math.prod(eqn.outvars[0].aval.shape) * per_output
    elif eqn.primitive.name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
    for sub in _sub_jaxprs(eqn.params):
      total += _multiply_adds(sub)
  return total


def _sub_jaxprs(params: dict):
  """Jaxprs nested in an equation's params (pjit, remat, custom_vjp ...)."""
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def summary_table() -> str:
  """Markdown table of every named model: parameters and G multiply-adds at native size."""
  rows = ['| model | image | params | GMACs |', '|---|---|---|---|']
  for name in MODELS:
    num_classes = 1000 if MODELS[name]['stem'] == 'imagenet' else 10
    model = create_model(name, num_classes=num_classes)
    size = native_image_size(name)
    params = count_params(init_shapes(model, size))
    gmacs = count_multiply_adds(model, size) / 1e9
    rows.append(f'| {name} | {size}x{size} | {params:,} | {gmacs:.3f} |')
  return '\n'.join(rows)


if __name__ == '__main__':
  print(summary_table())
