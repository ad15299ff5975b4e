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
  model.memory_efficient = False  # keep less for the backward pass, recompute BN-ReLU there
  model.implementation = 'shared'  # dense blocks on one buffer; 'concat': the module version
  return model


def named_model_config(name, dropout_rate=0.0):
  """config.model of a network of the paper (architectures.NAMED)."""
  return model_config(**architectures.NAMED[name].config_fields(), dropout_rate=dropout_rate)


def folder_config():
  """config.folder: how a 'folder:PATH' dataset is prepared and fed (docs in the README)."""
  folder = ml_collections.ConfigDict()
  folder.augmentation = 'translate'  # 'none', 'translate' (by translate_pixels) or 'imagenet'
  folder.translate_pixels = 4
  folder.flip = False  # random horizontal mirror: off unless the images are mirror-symmetric
  folder.eval_transform = 'resize_center_crop'  # or 'resize' (the whole image, squashed)
  folder.center_crop_ratio = 0.875  # crop / resized shorter side (224 / 256)
  folder.normalization = 'imagenet'  # 'imagenet', 'folder' (its own statistics) or 'unit'
  folder.holdout_fraction = 0.1  # without val/: this stratified fraction of train/ validates
  folder.holdout_seed = 0
  folder.max_side = 0  # > 0: images whose longest side exceeds it are stored scaled down
  folder.shuffle_buffer = 16_384  # examples; bounds host memory for large folders
  # True: each training example's loss weighted by N / (classes * examples of its class), so
  # every class weighs the same in an imbalanced folder (scikit-learn's 'balanced')
  folder.class_weights = False
  return folder


def base_config():
  config = ml_collections.ConfigDict()
  config.model = named_model_config('densenet40_k12')
  config.dataset = 'cifar10'
  config.data_dir = placeholder(str)  # None: tfds's default
  config.augment = True
  # digits: upscale the 8x8 images to this size; folder datasets: the input size (default 224)
  config.image_size = placeholder(int)
  config.holdout_validation = False  # hold out a validation split (SVHN always does)
  config.folder = folder_config()  # used by dataset='folder:PATH' only

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
  # ImageNet eval resize, 'bicubic' or 'bilinear'; None: published weights' own (torchvision and
  # Keras: bilinear), else bicubic (the paper's)
  config.eval_resize = placeholder(str)
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
