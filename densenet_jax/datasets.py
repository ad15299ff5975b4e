"""Every dataset the input pipeline serves, as one table of plain data: `SPECS`.

A dataset is one `DatasetSpec`: its stored image shape, its hold-out rule, its normalization,
the host's work on an example (`host_train`, `host_eval`: names of functions of
densenet_jax/preprocessing.py, looked up by the input pipeline) and the device's augmentation.
An image folder ('folder:PATH') is one more spec, built from its `FolderOptions`
(config.folder) by `folder_spec`. Adding a dataset is adding an entry here (and, for data that
tfds does not have, its builder class, named by the spec's `builder`).

TensorFlow-free (as are the configs and config_validation), so a config is checked in seconds.
Sources of the constants: docs/reference.md.
"""

import dataclasses
from typing import Optional

from densenet_jax import errors, folder_listing

# ImageNet resizes: bicubic (Torch's image.scale, the paper's) or antialiased bilinear (PIL's,
# which torchvision's published accuracies used): the eval_resize values.
RESIZE_METHODS = ('bicubic', 'bilinear')
DEFAULT_EVAL_RESIZE = 'bicubic'

# Image folders ('folder:PATH', config.folder): the values of their transform fields.
FOLDER_AUGMENTATIONS = ('none', 'translate', 'imagenet')
FOLDER_EVAL_TRANSFORMS = ('resize_center_crop', 'resize')
# imagenet: ImageNet's mean/std (what pretrained weights expect); folder: computed once from
# the training split; unit: pixels / 255 only.
FOLDER_NORMALIZATIONS = ('imagenet', 'folder', 'unit')
FOLDER_IMAGE_SIZE = 224  # the input size when config.image_size is not set

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_CROP_SIZE = 224
DIGITS_PAD = 1  # the digits' random shift, in pixels (on the host)
CIFAR_PAD = 4  # CIFAR's random shift, in pixels (on the device)


@dataclasses.dataclass(frozen=True)
class HoldOut:
  """A validation split held out of the training set.

  last: the last `last` examples of tfds's `train` (stored in random order).
  per_class: ((tfds split, count), ...): `count` examples of each class drawn from each split
  (numpy's default_rng(seed)); the training set is those splits' concatenation minus them.
  """
  last: int = 0
  per_class: tuple = ()
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class FolderOptions:
  """config.folder (configs/common.folder_config) for a 'folder:PATH' dataset."""
  augmentation: str
  translate_pixels: int
  flip: bool
  eval_transform: str
  center_crop_ratio: float
  normalization: str
  holdout_fraction: float
  holdout_seed: int
  max_side: int
  shuffle_buffer: int
  class_weights: bool


@dataclasses.dataclass(frozen=True)
class DataOptions:
  """What a run asks of its data: read once from the config (densenet_jax/settings.py)."""
  dataset: str
  data_dir: Optional[str] = None
  holdout_validation: bool = False
  image_size: Optional[int] = None
  augment: bool = True
  ten_crop: bool = False
  eval_resize: str = DEFAULT_EVAL_RESIZE
  seed: int = 0  # the augmentation's and the shuffle's
  folder: Optional[FolderOptions] = None  # a 'folder:PATH' dataset's options


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a prepared dataset holds, as the model and the loop see it."""
  name: str
  num_classes: int
  image_shape: tuple  # (H, W, C) as fed to the model
  num_train: int  # examples of the training set (after any hold-out)
  num_eval: dict  # eval split name -> number of examples
  eval_splits: tuple
  class_names: tuple  # label -> name (tfds's ClassLabel names; a folder's class folders)
  normalization: tuple  # (scale, mean, std): the model sees (pixels / scale - mean) / std

  @property
  def reports_top5(self) -> bool:
    """Top-5 error is reported for more than 10 classes."""
    return self.num_classes > 10


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How one dataset is read, held out, transformed on the host and on the device.

  normalization (scale, mean, std) per channel: the model sees (pixels / scale - mean) / std;
  None: computed from the training split (a folder with normalization='folder').
  """
  name: str
  image_shape: Optional[tuple]  # (H, W, C) as stored and decoded; None: any size (cropped)
  normalization: Optional[tuple]
  host_train: str  # preprocessing.HOST_OPS key: an example's training image on the host
  host_eval: str  # the same, for evaluation
  eval_splits: Optional[tuple] = ('test',)  # None: those of 'validation', 'test' it has
  holdout: Optional[HoldOut] = None  # None: no hold-out
  always_holds_out: bool = False  # the hold-out is always used (else holdout_validation=True)
  augmentable: bool = True  # False: trained without augmentation (augment=True is refused)
  translate: int = 0  # the device's random shift, in pixels
  pad_with_mean: bool = False  # the shift fills with the mean pixel (else 0 before normalizing)
  flip: bool = False  # the device's random mirror
  photometric: bool = False  # the device's color jitter and lighting (ImageNet's)
  input_size: Optional[int] = None  # the side fed when the stored size varies
  resizable: bool = False  # config.image_size may set the input size
  ten_crop: bool = False  # 10-crop evaluation exists
  shuffle_buffer: Optional[int] = None  # None: the whole shard
  parallel_read: bool = False  # read its files in parallel (a fixed, interleaved order)
  prepared_on_first_use: bool = False  # offline: no download, prepared when first read
  builder: Optional[str] = None  # 'module.Class' of its tfds builder, where tfds has none
  # What to download by hand before preparing (None: tfds downloads it).
  manual_download: Optional[str] = None
  # Its class names ship with the package (densenet_jax/data/): a model of it predicts without it.
  class_names_file: Optional[str] = None
  folder: Optional[FolderOptions] = None  # a folder's options

  @property
  def is_folder(self) -> bool:
    return folder_listing.is_folder(self.name)

  @property
  def holdout_splits(self) -> tuple:
    """The tfds splits the training set (and its hold-out) is read from."""
    return tuple(s for s, _ in self.holdout.per_class) or ('train',)


_CIFAR = dict(image_shape=(32, 32, 3), host_train='decode', host_eval='decode',
              holdout=HoldOut(last=5000), translate=CIFAR_PAD, pad_with_mean=True, flip=True)

SPECS = {spec.name: spec for spec in (
    DatasetSpec('digits', image_shape=(8, 8, 1), normalization=(16.0, (0.0,), (1.0,)),
                host_train='digits_shift', host_eval='decode', resizable=True,
                prepared_on_first_use=True, builder='densenet_jax.digits.Digits'),
    # CIFAR's statistics are on the 0..255 scale.
    DatasetSpec('cifar10', normalization=(1.0, (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)),
                **_CIFAR),
    DatasetSpec('cifar100', normalization=(1.0, (129.3, 124.1, 112.4), (68.2, 65.4, 70.4)),
                **_CIFAR),
    # The paper trains SVHN without augmentation and always holds out 6,000 images.
    DatasetSpec('svhn_cropped', image_shape=(32, 32, 3),
                normalization=(255.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
                host_train='decode', host_eval='decode', eval_splits=('test',),
                holdout=HoldOut(per_class=(('train', 400), ('extra', 200))),
                always_holds_out=True, augmentable=False),
    # fb.resnet.torch's statistics, on the 0..1 scale.
    DatasetSpec('imagenet2012', image_shape=None,
                normalization=(255.0, IMAGENET_MEAN, IMAGENET_STD),
                host_train='imagenet_crop', host_eval='imagenet_eval', eval_splits=('validation',),
                flip=True, photometric=True, input_size=IMAGENET_CROP_SIZE, ten_crop=True,
                shuffle_buffer=16_384, parallel_read=True,
                manual_download='ILSVRC2012_img_train.tar (the 1,000 per-class tars such as '
                'n01440764.tar) and ILSVRC2012_img_val.tar (50,000 JPEGs) from '
                'https://image-net.org/download-images',
                class_names_file='imagenet_classes.tsv'),
)}
DATASETS = tuple(SPECS)

_FOLDER_NORMALIZATION = {'imagenet': (255.0, IMAGENET_MEAN, IMAGENET_STD), 'folder': None,
                         'unit': (255.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}


def folder_spec(dataset: str, options: Optional[FolderOptions]) -> DatasetSpec:
  """The spec of an image folder: its classes' subfolders of any images, fed square. Without
  options (config validation before config.folder is read): what every folder allows."""
  common = dict(image_shape=None, host_train='folder_train', host_eval='folder_eval',
                eval_splits=None, input_size=FOLDER_IMAGE_SIZE, resizable=True,
                prepared_on_first_use=True, folder=options)
  if options is None:
    return DatasetSpec(dataset, normalization=None, **common)
  return DatasetSpec(
      dataset, normalization=_FOLDER_NORMALIZATION[options.normalization], flip=options.flip,
      photometric=options.augmentation == 'imagenet',
      translate=options.translate_pixels * (options.augmentation == 'translate'),
      shuffle_buffer=options.shuffle_buffer, **common)


def spec(dataset: str, folder: Optional[FolderOptions] = None) -> DatasetSpec:
  """The spec of a dataset name of SPECS, or of 'folder:PATH' with its options."""
  if folder_listing.is_folder(dataset):
    if folder is None:
      raise errors.UserError(f'{dataset}: a folder dataset needs its options (config.folder)')
    return folder_spec(dataset, folder)
  if dataset not in SPECS:
    raise errors.UserError(f'config.dataset={dataset!r}: allowed datasets are '
                           f'{", ".join(DATASETS)}, or {folder_listing.PREFIX}PATH '
                           '(PATH/train/<class>/*)')
  return SPECS[dataset]


def image_shape(dataset_spec: DatasetSpec, image_size: Optional[int] = None) -> tuple:
  """(H, W, C) the model is fed: the stored shape, or `image_size` square where it may be set."""
  if dataset_spec.image_shape is None:
    size = image_size or dataset_spec.input_size
    return (size, size, 3)
  if image_size is not None:
    return (image_size, image_size, dataset_spec.image_shape[2])
  return dataset_spec.image_shape
