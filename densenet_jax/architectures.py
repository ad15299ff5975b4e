"""The paper's networks and the errors it reports, as plain data: no JAX, no TensorFlow.

This is the one place where the eleven named DenseNets (block sizes, growth rate k, bottleneck
-B, compression -C) and the paper's Table 2 and Table 3 errors are written down; models,
configs, results.json and sweeps derive from it, and so do the rules of what a DenseNet's
hyperparameters may be. Sources: docs/reference.md.

  python -m densenet_jax.architectures     # prints the paper's tables as this module holds them
"""

import dataclasses
from typing import Optional

STEMS = ('cifar', 'imagenet')
NATIVE_IMAGE_SIZE = {'cifar': 32, 'imagenet': 224}  # the input size each stem was defined for
COMPUTE_DTYPES = ('float32', 'bfloat16', 'float64')  # float64: a numerical reference, see models
# How models.DenseNet computes its dense blocks (same numbers): one shared buffer, or modules that
# concatenate their inputs.
IMPLEMENTATIONS = ('shared', 'concat')
# A network is given by these config.model fields (depth: three equal CIFAR/SVHN blocks).
FIELDS = ('stem', 'depth', 'block_sizes', 'growth_rate', 'bottleneck', 'compression')


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def cifar_block_sizes(depth: int, bottleneck: bool) -> tuple:
  """Three equal dense blocks for a CIFAR/SVHN network of total depth L."""
  divisor = 6 if bottleneck else 3
  variant = 'with bottleneck (-B/-BC)' if bottleneck else 'without bottleneck'
  if not _is_int(depth) or depth < 4 + divisor or (depth - 4) % divisor:
    raise ValueError(
        f'depth={depth!r} is not a CIFAR/SVHN DenseNet {variant}: '
        f'allowed depths are L >= {4 + divisor} with (L - 4) divisible by {divisor}')
  return ((depth - 4) // divisor,) * 3


@dataclasses.dataclass(frozen=True)
class Architecture:
  """What a DenseNet is, as far as its name and the paper's tables are concerned."""
  block_sizes: tuple
  growth_rate: int
  bottleneck: bool = False
  compression: float = 1.0
  stem: str = 'cifar'

  @property
  def depth(self) -> int:
    """L: the stem conv, one conv per dense layer (two with bottleneck), one per transition and
    the classifier (DenseNet-121: 1 + 2 * 58 + 3 + 1)."""
    per_layer = 2 if self.bottleneck else 1
    return per_layer * sum(self.block_sizes) + len(self.block_sizes) + 1

  @property
  def variant(self) -> str:
    """DenseNet, DenseNet-B, DenseNet-C or DenseNet-BC."""
    suffix = ('B' if self.bottleneck else '') + ('C' if self.compression < 1 else '')
    return 'DenseNet' + (f'-{suffix}' if suffix else '')

  @property
  def name(self) -> str:
    """The paper's name (densenet_bc100_k12, densenet121) where it is one of its networks, else
    a name that says what was built: densenet_bc22_k12, densenet_c40_k12_theta0.7,
    densenet_bc121_k24_imagenet_6-12-24-16."""
    for name, architecture in NAMED.items():
      if architecture == self:
        return name
    letters = ('b' if self.bottleneck else '') + ('c' if self.compression < 1 else '')
    name = f'densenet{"_" + letters if letters else ""}{self.depth}_k{self.growth_rate}'
    if self.compression not in (0.5, 1):
      name += f'_theta{self.compression:g}'
    if not self.given_by_depth:
      name += f'_{self.stem}_{"-".join(map(str, self.block_sizes))}'
    return name

  @property
  def given_by_depth(self) -> bool:
    """Whether the depth alone gives the blocks: three equal ones after a CIFAR/SVHN stem."""
    try:
      return self.stem == 'cifar' and self.block_sizes == cifar_block_sizes(self.depth,
                                                                           self.bottleneck)
    except ValueError:
      return False

  def config_fields(self) -> dict:
    """config.model's architecture fields: depth for three equal CIFAR blocks, else blocks."""
    fields = {'stem': self.stem, 'growth_rate': self.growth_rate, 'bottleneck': self.bottleneck,
              'compression': self.compression}
    if self.given_by_depth:
      return {**fields, 'depth': self.depth}
    return {**fields, 'block_sizes': self.block_sizes}

  def describe(self) -> dict:
    """What results.json and the sweep CSV record of the built network."""
    return {'name': self.name, 'variant': self.variant, 'depth': self.depth,
            'growth_rate': self.growth_rate, 'block_sizes': list(self.block_sizes),
            'bottleneck': self.bottleneck, 'compression': self.compression, 'stem': self.stem}


def build(*, growth_rate, stem='cifar', depth=None, block_sizes=None, bottleneck=False,
          compression=1.0) -> Architecture:
  """The network given by its depth (three equal blocks, CIFAR/SVHN) or by its block sizes."""
  if block_sizes is None:
    if depth is None:
      raise ValueError('a DenseNet needs depth (three equal blocks) or block_sizes')
    block_sizes = cifar_block_sizes(depth, bottleneck)
  elif depth is not None:
    raise ValueError(f'depth={depth!r} and block_sizes={block_sizes!r}: give one of them')
  return Architecture(tuple(block_sizes), growth_rate, bottleneck, compression, stem)


def from_fields(fields) -> Architecture:
  """The network of a mapping that holds FIELDS among others (config.model, say)."""
  return build(**{k: fields[k] for k in FIELDS if k in fields})


def _cifar(depth, growth_rate, bc=False):
  return build(depth=depth, growth_rate=growth_rate, bottleneck=bc, compression=0.5 if bc else 1.0)


def _imagenet(block_sizes, growth_rate=32):
  return Architecture(block_sizes, growth_rate, bottleneck=True, compression=0.5, stem='imagenet')


NAMED = {
    'densenet40_k12': _cifar(40, 12),
    'densenet100_k12': _cifar(100, 12),
    'densenet100_k24': _cifar(100, 24),
    'densenet_bc100_k12': _cifar(100, 12, bc=True),
    'densenet_bc250_k24': _cifar(250, 24, bc=True),
    'densenet_bc190_k40': _cifar(190, 40, bc=True),
    'densenet121': _imagenet((6, 12, 24, 16)),
    'densenet169': _imagenet((6, 12, 32, 32)),
    'densenet201': _imagenet((6, 12, 48, 32)),
    'densenet264': _imagenet((6, 12, 64, 48)),
    'densenet161': _imagenet((6, 12, 36, 24), growth_rate=48),
}

# Table 2, test error (%). A column is a dataset and whether it was augmented ("+").
TABLE2_COLUMNS = {'c10': ('cifar10', False), 'c10+': ('cifar10', True),
                  'c100': ('cifar100', False), 'c100+': ('cifar100', True),
                  'svhn': ('svhn_cropped', False)}
TABLE2 = {  # None: the paper has no number
    'densenet40_k12': (7.00, 5.24, 27.55, 24.42, 1.79),
    'densenet100_k12': (5.77, 4.10, 23.79, 20.20, 1.67),
    'densenet100_k24': (5.83, 3.74, 23.42, 19.25, 1.59),
    'densenet_bc100_k12': (5.92, 4.51, 24.15, 22.27, 1.76),
    'densenet_bc250_k24': (5.19, 3.62, 19.64, 17.60, 1.74),
    'densenet_bc190_k40': (None, 3.46, None, 17.18, None),
}
# Table 3, ImageNet validation error (%): top-1, top-5 single-crop, then top-1, top-5 10-crop.
TABLE3_COLUMNS = ('top1_error', 'top5_error', 'ten_crop_top1_error', 'ten_crop_top5_error')
TABLE3 = {
    'densenet121': (25.02, 7.71, 23.61, 6.66),
    'densenet169': (23.80, 6.85, 22.08, 5.92),
    'densenet201': (22.58, 6.34, 21.46, 5.54),
    'densenet264': (22.15, 6.12, 20.80, 5.29),
}
# Not in the paper: DenseNet-161's single-crop top-1 error in the authors' README.
AUTHORS_README_TOP1 = {'densenet161': 22.2}


def paper_result(architecture: Architecture, dataset: str, augment: bool) -> Optional[dict]:
  """The paper's error (%) for this network on this dataset, or None where it reports none.

  Only a network equal to a row of the tables (blocks, k, B/C, stem) gets its row's number.
  """
  name = architecture.name
  if name in TABLE2:
    for column, error in zip(TABLE2_COLUMNS, TABLE2[name]):
      if TABLE2_COLUMNS[column] == (dataset, augment) and error is not None:
        return {'source': f'Table 2, {column.upper()}', 'top1_error_pct': error}
    return None
  if dataset != 'imagenet2012':
    return None
  if name in TABLE3:
    return {'source': 'Table 3', **{f'{column}_pct': value
                                    for column, value in zip(TABLE3_COLUMNS, TABLE3[name])}}
  if name in AUTHORS_README_TOP1:
    return {'source': "authors' README", 'top1_error_pct': AUTHORS_README_TOP1[name]}
  return None


def validate_hyperparameters(*, block_sizes, growth_rate, compression, stem, stem_features,
                             dropout_rate, num_classes, dtype):
  """Raises ValueError naming the first hyperparameter that no DenseNet can have."""
  def positive_int(value):
    return _is_int(value) and value >= 1

  if not block_sizes or not all(positive_int(n) for n in block_sizes):
    raise ValueError(f'block_sizes={block_sizes!r}: need one or more positive integers')
  if not positive_int(growth_rate):
    raise ValueError(f'growth_rate={growth_rate!r}: the growth rate k must be an integer >= 1')
  if not _is_number(compression) or not 0 < compression <= 1:
    raise ValueError(f'compression={compression!r}: theta must be in (0, 1]')
  if stem not in STEMS:
    raise ValueError(f'stem={stem!r}: allowed stems are {", ".join(STEMS)}')
  if stem_features is not None and not positive_int(stem_features):
    raise ValueError(f'stem_features={stem_features!r}: must be None or an integer >= 1')
  if not _is_number(dropout_rate) or not 0 <= dropout_rate < 1:
    raise ValueError(f'dropout_rate={dropout_rate!r}: must be in [0, 1)')
  if not (_is_int(num_classes) and num_classes >= 0):
    raise ValueError(f'num_classes={num_classes!r}: must be an integer >= 1, or 0 for a '
                     'headless model (pooled features, no classifier)')
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f'dtype={dtype!r}: allowed compute dtypes are {", ".join(COMPUTE_DTYPES)}')


def paper_tables() -> str:
  """Table 2 and Table 3 as markdown, from the data above (docs/reference.md holds a copy)."""
  rows = ['| model | ' + ' | '.join(key.upper() for key in TABLE2_COLUMNS) + ' |',
          '|---|' + '---|' * len(TABLE2_COLUMNS)]
  for name, errors in TABLE2.items():
    cells = ['-' if e is None else f'{e:.2f}' for e in errors]
    rows.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  rows += ['', '| model | top-1 | top-5 | 10-crop top-1 | 10-crop top-5 |', '|---|---|---|---|---|']
  for name, errors in TABLE3.items():
    rows.append(f'| {name} | ' + ' | '.join(f'{e:.2f}' for e in errors) + ' |')
  for name, top1 in AUTHORS_README_TOP1.items():
    rows.append(f"| {name} (authors' README) | {top1:.2f} | - | - | - |")
  return '\n'.join(rows)


if __name__ == '__main__':
  print(paper_tables())
