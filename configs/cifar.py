"""Table 2 of the paper: every model on C10, C10+, C100, C100+ and SVHN.

  python main.py --config=configs/cifar.py:MODEL,DATASET

MODEL is one of densenet40_k12, densenet100_k12, densenet100_k24, densenet_bc100_k12,
densenet_bc250_k24, densenet_bc190_k40; DATASET is c10, c10+, c100, c100+ or svhn ("+": flip and
translation augmentation; without it, dropout 0.2 after every conv as in the paper). SGD with
Nesterov momentum 0.9, weight decay 1e-4, batch 64, lr 0.1 divided by 10 after 50% and 75% of
the epochs (300 for CIFAR, 40 for SVHN; the Lua code drops one epoch earlier, 149 and 224).

Test error the paper reports (%), C10 / C10+ / C100 / C100+ / SVHN:
  densenet40_k12       7.00 / 5.24 / 27.55 / 24.42 / 1.79
  densenet100_k12      5.77 / 4.10 / 23.79 / 20.20 / 1.67
  densenet100_k24      5.83 / 3.74 / 23.42 / 19.25 / 1.59
  densenet_bc100_k12   5.92 / 4.51 / 24.15 / 22.27 / 1.76
  densenet_bc250_k24   5.19 / 3.62 / 19.64 / 17.60 / 1.74
  densenet_bc190_k40     -  / 3.46 /   -   / 17.18 /  -
Append ",quick" (e.g. densenet40_k12,c10+,quick) for a smoke test: depth 10, 1 epoch.
"""

from ml_collections.config_dict import placeholder

from configs import common

MODELS = {
    'densenet40_k12': dict(depth=40, growth_rate=12),
    'densenet100_k12': dict(depth=100, growth_rate=12),
    'densenet100_k24': dict(depth=100, growth_rate=24),
    'densenet_bc100_k12': dict(depth=100, growth_rate=12, bottleneck=True, compression=0.5),
    'densenet_bc250_k24': dict(depth=250, growth_rate=24, bottleneck=True, compression=0.5),
    'densenet_bc190_k40': dict(depth=190, growth_rate=40, bottleneck=True, compression=0.5),
}
DATASETS = {  # name -> (tfds name, augmentation, epochs)
    'c10': ('cifar10', False, 300),
    'c10+': ('cifar10', True, 300),
    'c100': ('cifar100', False, 300),
    'c100+': ('cifar100', True, 300),
    'svhn': ('svhn_cropped', False, 40),
}
# Test error (%) in Table 2; None where the paper has no number.
PAPER_ERROR = {
    'densenet40_k12': (7.00, 5.24, 27.55, 24.42, 1.79),
    'densenet100_k12': (5.77, 4.10, 23.79, 20.20, 1.67),
    'densenet100_k24': (5.83, 3.74, 23.42, 19.25, 1.59),
    'densenet_bc100_k12': (5.92, 4.51, 24.15, 22.27, 1.76),
    'densenet_bc250_k24': (5.19, 3.62, 19.64, 17.60, 1.74),
    'densenet_bc190_k40': (None, 3.46, None, 17.18, None),
}


def get_config(arg='densenet40_k12,c10+'):
  model_name, dataset, *extra = arg.split(',')
  if model_name not in MODELS:
    raise ValueError(f'model {model_name!r} is not in Table 2; choose from {", ".join(MODELS)}')
  if dataset not in DATASETS or extra not in ([], ['quick']):
    raise ValueError(f'{arg!r}: expected MODEL,DATASET[,quick] with DATASET one of '
                     f'{", ".join(DATASETS)}')
  tfds_name, augment, epochs = DATASETS[dataset]
  config = common.base_config()
  config.model = common.model_config(model_name, dropout_rate=0.0 if augment else 0.2,
                                     **MODELS[model_name])
  config.dataset = tfds_name
  config.augment = augment
  config.num_epochs = epochs
  config.lr_decay_epochs = (epochs // 2, epochs * 3 // 4)
  config.holdout_validation = tfds_name == 'svhn_cropped'
  paper = PAPER_ERROR[model_name][list(DATASETS).index(dataset)]
  config.paper_test_error = paper if paper is not None else placeholder(float)
  if extra == ['quick']:
    config.model.depth = 10 if config.model.bottleneck else 7
    config.num_epochs = 1
    config.lr_decay_epochs = (0.5, 0.75)
  return config
