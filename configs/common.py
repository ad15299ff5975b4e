"""Fields every config has, with the paper's CIFAR/SVHN recipe as defaults.

Every experiment config starts from `base_config()` and sets what differs, so overrides and
sweeps look the same everywhere (e.g. --config.model.growth_rate=24, --config.batch_size=128).
"""

import ml_collections
from ml_collections.config_dict import placeholder


def model_config(name, *, growth_rate, depth=None, bottleneck=False, compression=1.0,
                 dropout_rate=0.0):
  """config.model: the named model and the hyperparameters that may be overridden."""
  model = ml_collections.ConfigDict()
  model.name = name
  if depth is not None:  # CIFAR/SVHN models; ImageNet models are given by block sizes
    model.depth = depth
  model.growth_rate = growth_rate
  model.bottleneck = bottleneck
  model.compression = compression
  model.dropout_rate = dropout_rate
  model.dtype = 'float32'  # compute dtype; 'bfloat16' for mixed precision
  model.memory_efficient = False  # recompute concat/BN/ReLU/conv in the backward pass
  return model


def base_config():
  config = ml_collections.ConfigDict()
  config.model = model_config('densenet40_k12', depth=40, growth_rate=12)
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
  config.init_from = ''  # a torchvision .pth, a Keras .keras/.h5 file or a checkpoint dir
  config.ten_crop = False  # --mode=evaluate on ImageNet: 10-crop instead of center crop
  config.eval_resize = 'bicubic'  # ImageNet eval resize; 'bilinear' for torchvision weights
  return config


IMAGENET_BLOCKS = {'densenet121': (6, 12, 24, 16), 'densenet169': (6, 12, 32, 32),
                   'densenet201': (6, 12, 48, 32), 'densenet264': (6, 12, 64, 48),
                   'densenet161': (6, 12, 36, 24)}


def imagenet_config(model_name, *, growth_rate=32, batch_size=256, num_epochs=90,
                    lr_decay_epochs=(30, 60), paper_top1=None, paper_top5=None):
  """Table 3: fb.resnet.torch recipe on ImageNet (DenseNet-BC, theta = 0.5, k = 32)."""
  config = base_config()
  config.model = model_config(model_name, growth_rate=growth_rate, bottleneck=True,
                              compression=0.5)
  config.model.block_sizes = IMAGENET_BLOCKS[model_name]
  config.dataset = 'imagenet2012'
  config.batch_size = batch_size
  config.eval_batch_size = 256
  config.num_epochs = num_epochs
  config.lr_decay_epochs = lr_decay_epochs
  config.log_every_steps = 500
  config.paper_top1_error = paper_top1 if paper_top1 is not None else placeholder(float)
  config.paper_top5_error = paper_top5 if paper_top5 is not None else placeholder(float)
  return config
