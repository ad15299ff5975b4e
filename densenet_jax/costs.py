"""Size and cost of a DenseNet, computed from shapes alone (nothing is compiled).

  python -m densenet_jax.costs     # parameters and multiply-adds of every named network
"""

import functools
import math

import jax
import jax.extend
import jax.numpy as jnp

from densenet_jax import architectures, models


def init_shapes(model: models.DenseNet, image_size: int, batch_size: int = 1):
  """The shapes of `model.init`'s variables, via jax.eval_shape (no compile).

  Traced once per model, size and float64 setting in a process (DenseNet-121's init takes ~1 s
  to trace; this module's table asks for each network's parameters, then for its multiply-adds,
  and the tests ask for the same networks again); each call gets its own copy of the tree.
  """
  shapes = _traced_init_shapes(model, image_size, batch_size,
                               jax.dtypes.canonicalize_dtype(jnp.float64))
  return jax.tree.map(lambda leaf: leaf, shapes)


@functools.lru_cache(maxsize=64)
def _traced_init_shapes(model: models.DenseNet, image_size: int, batch_size: int, float64):
  """init_shapes's trace; `float64` (float32 without jax_enable_x64) is part of the key only."""
  del float64
  x = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)


def count_params(variables) -> int:
  """Trainable parameters (BN running statistics excluded) of a variables tree or its shapes."""
  return sum(math.prod(p.shape) for p in jax.tree.leaves(variables['params']))


def count_multiply_adds(model: models.DenseNet, image_size: int) -> int:
  """Convolution and dense multiply-adds of one image's forward pass, read off the jaxpr."""
  variables = init_shapes(model, image_size)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, x).jaxpr
  return _multiply_adds(jaxpr)


def saved_activation_bytes(model: models.DenseNet, image_size: int, batch_size: int) -> int:
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
  for eqn in equations(jaxpr):
    if eqn.primitive.name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params['dimension_numbers'].rhs_spec  # (out, in, spatial...)
      per_output = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
      total += math.prod(eqn.outvars[0].aval.shape) * per_output
    elif eqn.primitive.name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
  return total


def count_primitives(jaxpr, names) -> dict:
  """How often each primitive of `names` occurs in a jaxpr, nested jaxprs included."""
  counts = {}
  for eqn in equations(jaxpr):
    if eqn.primitive.name in names:
      counts[eqn.primitive.name] = counts.get(eqn.primitive.name, 0) + 1
  return counts


def equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs nested in it (remat, custom_vjp, pjit ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in _sub_jaxprs(eqn.params):
      yield from equations(sub)


def _sub_jaxprs(params: dict):
  """Jaxprs nested in an equation's params (pjit, remat, custom_vjp ...)."""
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def summary_table() -> str:
  """Markdown table of every named network: parameters and G multiply-adds at native size."""
  rows = ['| model | image | params | GMACs |', '|---|---|---|---|']
  for name, architecture in architectures.NAMED.items():
    num_classes = 1000 if architecture.stem == 'imagenet' else 10
    model = models.create_model(name, num_classes=num_classes)
    size = architectures.NATIVE_IMAGE_SIZE[architecture.stem]
    params = count_params(init_shapes(model, size))
    gmacs = count_multiply_adds(model, size) / 1e9
    rows.append(f'| {name} | {size}x{size} | {params:,} | {gmacs:.3f} |')
  return '\n'.join(rows)


if __name__ == '__main__':
  print(summary_table())
