"""Table 2 of the paper: every model on C10, C10+, C100, C100+ and SVHN.

  python main.py --config=configs/cifar.py:MODEL,DATASET

MODEL is one of densenet40_k12, densenet100_k12, densenet100_k24, densenet_bc100_k12,
densenet_bc250_k24, densenet_bc190_k40; DATASET is c10, c10+, c100, c100+ or svhn ("+": flip and
translation augmentation; without it, dropout 0.2 after every conv as in the paper). SGD with
Nesterov momentum 0.9, weight decay 1e-4, batch 64, lr 0.1 divided by 10 after 50% and 75% of
the epochs (300 for CIFAR, 40 for SVHN; the Lua code drops one epoch earlier, 149 and 224).

The paper's test errors are `architectures.TABLE2` (`python -m densenet_jax.architectures`
prints them); results.json carries the number of the run's row, or none where the network that
was built (after any override) is not that row's.
Append ",quick" (e.g. densenet40_k12,c10+,quick) for a smoke test: depth 10, 1 epoch.
"""

from configs import common
from densenet_jax import architectures

EPOCHS = {'cifar10': 300, 'cifar100': 300, 'svhn_cropped': 40}


def get_config(arg='densenet40_k12,c10+'):
  model_name, dataset, *extra = arg.split(',')
  if model_name not in architectures.TABLE2:
    raise ValueError(f'model {model_name!r} is not in Table 2; choose from '
                     f'{", ".join(architectures.TABLE2)}')
  if dataset not in architectures.TABLE2_COLUMNS or extra not in ([], ['quick']):
    raise ValueError(f'{arg!r}: expected MODEL,DATASET[,quick] with DATASET one of '
                     f'{", ".join(architectures.TABLE2_COLUMNS)}')
  tfds_name, augment = architectures.TABLE2_COLUMNS[dataset]
  epochs = EPOCHS[tfds_name]
  config = common.base_config()
  config.model = common.named_model_config(model_name, dropout_rate=0.0 if augment else 0.2)
  config.dataset = tfds_name
  config.augment = augment
  config.num_epochs = epochs
  config.lr_decay_epochs = (epochs // 2, epochs * 3 // 4)
  config.holdout_validation = tfds_name == 'svhn_cropped'
  if extra == ['quick']:
    config.model.depth = 10 if config.model.bottleneck else 7
    config.num_epochs = 1
    config.lr_decay_epochs = (0.5, 0.75)
  return config
