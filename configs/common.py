"""Fields every config has, with the paper's CIFAR/SVHN recipe as defaults.

Every experiment config starts from `base_config()` and sets what differs, so overrides and
sweeps look the same everywhere (e.g. --config.model.growth_rate=24, --config.batch_size=128).
"""

import ml_collections
from ml_collections.config_dict import placeholder

from densenet_jax import architectures


def model_config(*, growth_rate, stem='cifar', depth=None, block_sizes=None, bottleneck=False,
                 compression=1.0, dropout_rate=0.0):
  """config.model: the network (depth for three equal CIFAR/SVHN blocks, else block_sizes) and
  the options that may be overridden. The run's name for it is derived from these fields
  (`architectures.Architecture.name`), so an override renames what is built."""
  model = ml_collections.ConfigDict()
  model.stem = stem
  if depth is not None:
    model.depth = depth
  if block_sizes is not None:
    model.block_sizes = block_sizes
  model.growth_rate = growth_rate
  model.bottleneck = bottleneck
  model.compression = compression
  model.dropout_rate = dropout_rate
  model.dtype = 'float32'  # compute dtype; 'bfloat16' for mixed precision
  model.memory_efficient = False  # recompute concat/BN/ReLU/conv in the backward pass
  return model


def named_model_config(name, dropout_rate=0.0):
  """config.model of a network of the paper (architectures.NAMED)."""
  return model_config(**architectures.NAMED[name].config_fields(), dropout_rate=dropout_rate)


def base_config():
  config = ml_collections.ConfigDict()
  config.model = named_model_config('densenet40_k12')
  config.dataset = 'cifar10'
  config.data_dir = placeholder(str)  # None: tfds's default
  config.augment = True
  config.image_size = placeholder(int)  # digits only: upscale the 8x8 images to this size
  config.holdout_validation = False  # hold out a validation split (SVHN always does)

  config.batch_size = 64  # global, over all devices of all processes
  config.eval_batch_size = 512  # multiples of 8 devices; the last batch is padded
  config.num_epochs = 300
  config.learning_rate = 0.1
  config.lr_decay_epochs = (150, 225)  # lr x0.1 after this many completed epochs
  config.lr_decay_factor = 0.1
  config.momentum = 0.9
  config.weight_decay = 1e-4
  config.seed = 0
  # True: BN statistics over the whole global batch (all devices); False: per device, as the
  # paper's multi-GPU Torch runs (running averages are then averaged before eval/checkpoint).
  config.cross_replica_bn = True

  config.eval_every_epochs = 1.0
  config.log_every_steps = 100
  config.keep_checkpoints = 3
  config.eval_checkpoint = 'best'  # --mode=evaluate: 'best' or 'latest'
  # a torchvision .pth, a Keras .keras/.h5 file, a checkpoint dir, or published weights by name
  # ('torchvision:densenet121', 'keras:densenet121', ...: downloaded once, see weights.py)
  config.init_from = ''
  config.ten_crop = False  # --mode=evaluate on ImageNet: 10-crop instead of center crop
  config.eval_resize = 'bicubic'  # ImageNet eval resize; 'bilinear' for torchvision weights
  return config


def imagenet_config(model_name, *, batch_size=256, num_epochs=90, lr_decay_epochs=(30, 60)):
  """Table 3: fb.resnet.torch recipe on ImageNet (DenseNet-BC, theta = 0.5)."""
  config = base_config()
  config.model = named_model_config(model_name)
  config.dataset = 'imagenet2012'
  config.batch_size = batch_size
  config.eval_batch_size = 256
  config.num_epochs = num_epochs
  config.lr_decay_epochs = lr_decay_epochs
  config.log_every_steps = 500
  return config
