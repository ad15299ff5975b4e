"""tf.data input pipelines over tensorflow-datasets for the paper's datasets.

Batches are numpy dicts laid out for `jax.pmap` over the local devices:
  image  uint8   [local_devices, per_device_batch, H, W, C], pixels as stored (digits 0..16)
         (ImageNet 10-crop evaluation: [local_devices, per_device_batch, 10, H, W, C], the crops
         in the order of `preprocessing.ten_crop`; average the logits over axis 2)
  label  int32   [local_devices, per_device_batch]
  epoch, index  int32 [local_devices, per_device_batch]  (training only: what the device draws
         each example's augmentation from)
  mask   float32 [local_devices, per_device_batch]  (evaluation only; 0 marks padding)
  weight float32 [local_devices, per_device_batch]  (training on a folder with
         config.folder.class_weights only: the loss weight of the example's class)

The device turns the uint8 images into the model's input with `device_transform(info, ...)`
(densenet_jax/augment.py): normalization with the dataset's statistics (DatasetInfo), and for
training the random shift and flip (CIFAR, folders) or the color jitter, lighting and flip
(ImageNet). The host decodes, shifts the digits, and for ImageNet crops and resizes
(`preprocessing`).

Data. `digits` and image folders (`folder:PATH`, densenet_jax/folder.py) are prepared on first
use (offline); the others must be prepared in the tfds data_dir beforehand:
`python -m densenet_jax.input_pipeline NAME --data_dir DIR` (ImageNet also needs its two tar
files, see `_not_prepared_message`). TensorFlow never sees the GPUs (see
`preprocessing`).

Which examples. A split used here is a sequence of tfds slices (SVHN's training set is `train`
then `extra`) with, for SVHN, a boolean mask over their concatenation (the validation hold-out).
An example's index is its position in that concatenation, in tfds's file order (ImageNet's 16
files are read in parallel, in an order that is as fixed but interleaved). The selected
examples are divided among processes like `tfds.even_splits` divides a split (contiguous, sizes
differing by at most one), but after the mask, so every process gets an equal share of the SVHN
training set; each process reads only the tfds slice that holds its share.

Determinism. The order of an epoch is a shuffle seeded by (seed, epoch) of the process's share
(the whole share, except ImageNet: a buffer of IMAGENET_SHUFFLE_BUFFER examples), and every
random augmentation is drawn from (seed, epoch, example index): the host's (ImageNet's crop, the
digits' shifts) from a stateless TF key, the device's from a JAX key. Each epoch keeps its first
num_train // global_batch_size batches. A run started at `start_step` skips the examples
of the earlier steps of its epoch before decoding them, so it yields the batches an
uninterrupted run yields (resuming mid-epoch reads, without decoding, the skipped examples).

Hold-outs. CIFAR with `holdout_validation=True`: the last CIFAR_HOLDOUT examples of tfds's
`train` (stored in random order) are the `validation` split. SVHN always holds out (paper):
SVHN_HOLDOUT_PER_CLASS examples of each class from `train` and from `extra`, drawn with numpy's
`default_rng(HOLDOUT_SEED)`; finding them reads every label once per process (cached in memory).

Batch sizes and steps come from the run's `devices.Topology`; which option each dataset takes is
checked by `config_validation.check_dataset_options`. Constants: docs/reference.md.
"""

import argparse
import dataclasses
import functools
from typing import Iterable, Iterator, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from densenet_jax import config_validation, digits, folder, folder_listing
from densenet_jax.augment import DeviceTransform
from densenet_jax import preprocessing as pp
from densenet_jax.datasets import (CIFAR_PAD, DATASETS, FOLDER_IMAGE_SIZE,
                                   IMAGENET_MEAN, IMAGENET_STD, NORMALIZATION, NOT_AUGMENTED)
from densenet_jax.devices import Topology

CIFAR_HOLDOUT = 5000
SVHN_HOLDOUT_PER_CLASS = {'train': 400, 'extra': 200}
HOLDOUT_SEED = 0
IMAGENET_SHUFFLE_BUFFER = 16_384
# Stored image shapes (ImageNet's vary; it is fed at CROP_SIZE).
IMAGE_SHAPES = {'digits': (8, 8, 1), 'cifar10': (32, 32, 3), 'cifar100': (32, 32, 3),
                'svhn_cropped': (32, 32, 3)}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  image_shape: tuple  # (H, W, C) as fed to the model
  num_train: int  # examples of the training set (after any hold-out)
  num_eval: dict  # eval split name -> number of examples
  eval_splits: tuple
  class_names: tuple  # label -> name (tfds's ClassLabel names; a folder's class folders)
  normalization: tuple  # (scale, mean, std): the model sees (pixels / scale - mean) / std


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
class _Subset:
  slices: tuple  # ((tfds split, start, stop), ...) in reading order
  size: int  # selected examples
  svhn_held_out: Optional[bool] = None  # None: all of the slices; else the SVHN hold-out or not


@dataclasses.dataclass(frozen=True)
class _Shard:
  split: str  # tfds split string, e.g. 'train[0:36629]+extra[0:10]'
  start: int  # index of its first example
  size: int  # selected examples
  mask: Optional[np.ndarray] = None  # selection over the slice; None: all


def _new_builder(name: str, data_dir: Optional[str], folder_options: Optional[FolderOptions]):
  config_validation.check_dataset_options(name)
  if folder_listing.is_folder(name):
    if folder_options is None:
      raise ValueError(f'{name}: a folder dataset needs its FolderOptions (config.folder)')
    return folder.UserImageFolder(
        folder_listing.scan(folder_listing.folder_path(name)), data_dir=data_dir,
        max_side=folder_options.max_side, holdout_fraction=folder_options.holdout_fraction,
        holdout_seed=folder_options.holdout_seed)
  if name == 'digits':
    return digits.Digits(data_dir=data_dir)
  return tfds.builder(name, data_dir=data_dir)


@functools.lru_cache(maxsize=None)
def _builder(name: str, data_dir: Optional[str], folder_options: Optional[FolderOptions] = None):
  """The prepared tfds builder; digits and folders are prepared on first use, the others must
  be prepared beforehand."""
  builder = _new_builder(name, data_dir, folder_options)
  if not builder.is_prepared():
    if name != 'digits' and not folder_listing.is_folder(name):
      raise FileNotFoundError(_not_prepared_message(name, builder))
    builder.download_and_prepare()
  return builder


def _not_prepared_message(name, builder) -> str:
  root = builder.data_dir_root
  command = f'python -m densenet_jax.input_pipeline {name} --data_dir {root}'
  if name == 'imagenet2012':
    manual_dir = root / 'downloads' / 'manual'
    return (f'imagenet2012 is not prepared in {root}. Download ILSVRC2012_img_train.tar (the '
            f'1,000 per-class tars such as n01440764.tar) and ILSVRC2012_img_val.tar (50,000 '
            f'JPEGs) from https://image-net.org/download-images, put both in {manual_dir}, then '
            f'run: {command} --manual_dir {manual_dir}')
  return (f'{name} is not prepared in {root}. On a machine with internet access run: {command} '
          f'(it downloads the data), then copy {root / name} to this machine.')


def prepare(name: str, data_dir: Optional[str] = None, manual_dir: Optional[str] = None):
  """Downloads and prepares a dataset (digits: offline; imagenet2012: from manual_dir's tars)."""
  builder = _new_builder(name, data_dir, None)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def _subset(builder, name: str, split: str, holdout_validation: bool) -> _Subset:
  sizes = {s: builder.info.splits[s].num_examples for s in builder.info.splits}
  if name == 'svhn_cropped' and split in ('train', 'validation'):
    slices = tuple((s, 0, sizes[s]) for s in SVHN_HOLDOUT_PER_CLASS)
    held = builder.info.features['label'].num_classes * sum(SVHN_HOLDOUT_PER_CLASS.values())
    total = sum(sizes[s] for s in SVHN_HOLDOUT_PER_CLASS)
    validation = split == 'validation'
    return _Subset(slices, held if validation else total - held, validation)
  if holdout_validation and split in ('train', 'validation'):
    cut = sizes['train'] - CIFAR_HOLDOUT
    start, stop = (0, cut) if split == 'train' else (cut, sizes['train'])
    return _Subset((('train', start, stop),), stop - start)
  return _Subset(((split, 0, sizes[split]),), sizes[split])


def _eval_splits(builder, name: str, holdout_validation: bool) -> tuple:
  if folder_listing.is_folder(name):
    return tuple(s for s in ('validation', 'test') if s in builder.info.splits)
  if name == 'imagenet2012':
    return ('validation',)
  if name == 'svhn_cropped' or holdout_validation:
    return ('validation', 'test')
  return ('test',)


def _image_shape(name: str, image_size: Optional[int]) -> tuple:
  if name == 'imagenet2012':
    return (pp.CROP_SIZE, pp.CROP_SIZE, 3)
  if folder_listing.is_folder(name):
    size = image_size or FOLDER_IMAGE_SIZE
    return (size, size, 3)
  if image_size is not None:
    return (image_size, image_size, IMAGE_SHAPES[name][2])
  return IMAGE_SHAPES[name]


def dataset_info(name: str, data_dir: Optional[str], *, holdout_validation: bool = False,
                 image_size: Optional[int] = None,
                 folder_options: Optional[FolderOptions] = None) -> DatasetInfo:
  """Sizes, classes and shapes of a prepared dataset (digits and folders are prepared here if
  needed)."""
  config_validation.check_dataset_options(name, holdout_validation=holdout_validation,
                                          image_size=image_size)
  builder = _builder(name, data_dir, folder_options)
  eval_splits = _eval_splits(builder, name, holdout_validation)
  return DatasetInfo(
      name=name,
      class_names=tuple(builder.info.features['label'].names),
      num_classes=builder.info.features['label'].num_classes,
      image_shape=_image_shape(name, image_size),
      num_train=_subset(builder, name, 'train', holdout_validation).size,
      num_eval={s: _subset(builder, name, s, holdout_validation).size for s in eval_splits},
      eval_splits=eval_splits,
      normalization=_normalization(name, data_dir, folder_options),
  )


def _read(builder, name: str, shard: _Shard) -> tf.data.Dataset:
  """The shard's examples in a fixed order: dict(image=encoded bytes, label=int32, index=int64).

  Files are read one at a time (examples in tfds's order) except for ImageNet, whose 16 files
  read in parallel give a different but equally fixed order.
  """
  read_config = (tfds.ReadConfig() if name == 'imagenet2012'
                 else tfds.ReadConfig(interleave_cycle_length=1))
  ds = builder.as_dataset(split=shard.split, shuffle_files=False, read_config=read_config,
                          decoders={'image': tfds.decode.SkipDecoding()})
  ds = ds.enumerate(shard.start)
  if shard.mask is not None:
    keep = tf.constant(shard.mask)
    ds = ds.filter(lambda index, example: keep[index - shard.start])
  return ds.map(lambda index, example: {
      'image': example['image'], 'label': tf.cast(example['label'], tf.int32), 'index': index})


@functools.lru_cache(maxsize=None)
def _svhn_held_out(builder, per_class: tuple) -> np.ndarray:
  """Boolean mask over SVHN's train + extra: `count` examples per class of each split."""
  rng = np.random.default_rng(HOLDOUT_SEED)
  masks = []
  for split, count in per_class:
    size = builder.info.splits[split].num_examples
    labels = np.concatenate([
        batch['label'] for batch in tfds.as_numpy(
            _read(builder, 'svhn_cropped', _Shard(f'{split}[0:{size}]', 0, size)).batch(65_536))])
    order = rng.permutation(size)
    held = np.zeros(size, bool)
    for label in range(builder.info.features['label'].num_classes):
      chosen = order[labels[order] == label][:count]
      if len(chosen) < count:
        raise ValueError(f'svhn_cropped {split} has {len(chosen)} examples of class {label}, '
                         f'fewer than the {count} to hold out')
      held[chosen] = True
    masks.append(held)
  return np.concatenate(masks)


def _shard(builder, subset: _Subset, process_index: int, process_count: int) -> _Shard:
  """This process's contiguous share of the subset's selected examples."""
  if subset.size < process_count:
    raise ValueError(f'{subset.size} examples cannot be shared by {process_count} processes')
  lo = subset.size * process_index // process_count
  hi = subset.size * (process_index + 1) // process_count
  mask = None
  first, last = lo, hi
  if subset.svhn_held_out is not None:
    mask = _svhn_held_out(builder, tuple(SVHN_HOLDOUT_PER_CLASS.items()))
    if not subset.svhn_held_out:
      mask = ~mask
    positions = np.flatnonzero(mask)
    first, last = positions[lo], positions[hi - 1] + 1
    mask = mask[first:last]
  parts, offset = [], 0
  for split, start, stop in subset.slices:
    a, b = max(first - offset, 0), min(last - offset, stop - start)
    if a < b:
      parts.append(f'{split}[{start + a}:{start + b}]')
    offset += stop - start
  return _Shard('+'.join(parts), int(first), hi - lo, mask)


def _epoch_seed(seed, epoch):
  """An int64 that is a pure function of (seed, epoch)."""
  key = tf.stack([tf.cast(seed, tf.int64), tf.cast(epoch, tf.int64)])
  return tf.random.stateless_uniform([], key, minval=None, maxval=None, dtype=tf.int64)


def _normalization(name: str, data_dir: Optional[str],
                   options: Optional[FolderOptions]) -> tuple:
  """DatasetInfo.normalization: the dataset's table entry; a folder's from config.folder."""
  if not folder_listing.is_folder(name):
    return NORMALIZATION[name]
  if options.normalization == 'imagenet':
    return 255.0, IMAGENET_MEAN, IMAGENET_STD
  if options.normalization == 'folder':
    return (255.0, *folder.normalization_statistics(_builder(name, data_dir, options)))
  return 255.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)


def folder_transform(options: FolderOptions, image_size: Optional[int]) -> dict:
  """The keyword arguments of preprocessing.folder_eval (and, with the augmentation, of
  folder_train) for a folder dataset."""
  return dict(size=image_size or FOLDER_IMAGE_SIZE, transform=options.eval_transform,
              crop_ratio=options.center_crop_ratio)


def device_transform(info: DatasetInfo, *, train: bool, seed: int = 0, augment: bool = True,
                     folder_options: Optional[FolderOptions] = None) -> DeviceTransform:
  """What the device does to this dataset's uint8 batches (training: with `augment`, the
  paper's augmentation) before the model sees them."""
  scale, mean, std = info.normalization
  transform = DeviceTransform(scale=scale, mean=tuple(mean), std=tuple(std), seed=seed)
  if info.name == 'digits' and info.image_shape != IMAGE_SHAPES['digits']:
    transform = dataclasses.replace(transform, resize=info.image_shape[0])
  if not (train and augment) or info.name in NOT_AUGMENTED or info.name == 'digits':
    return transform  # the digits are shifted on the host (preprocessing.digits_shift)
  if info.name in ('cifar10', 'cifar100'):
    return dataclasses.replace(transform, translate=CIFAR_PAD, fill=tuple(mean), flip=True)
  if info.name == 'imagenet2012':
    return dataclasses.replace(transform, photometric=True, flip=True)
  return dataclasses.replace(  # a folder
      transform, flip=folder_options.flip, photometric=folder_options.augmentation == 'imagenet',
      translate=folder_options.translate_pixels * (folder_options.augmentation == 'translate'))


def example_preprocessor(name: str, *, train: bool, seed: int = 0, augment: bool = True,
                         ten_crop: bool = False, eval_resize: str = 'bicubic',
                         image_size: Optional[int] = None,
                         folder_options: Optional[FolderOptions] = None):
  """fn(example) -> dict(image, label) for one example of `_read`, image uint8 (training: plus
  the example's `epoch` and `index`, which the device draws its augmentation from).

  cifar, svhn_cropped: the decoded image; digits: the decoded image, shifted by up to a pixel
  when augmented; imagenet2012: fb.resnet.torch's random-sized crop at 224, or the evaluation
  resize + center crop (or 10 crops); folders: config.folder's crop or eval view
  (preprocessing.folder_train / folder_eval). The rest is `device_transform`'s.
  """
  augment = train and augment
  config_validation.check_dataset_options(name, augment=augment, image_size=image_size,
                                          ten_crop=ten_crop, eval_resize=eval_resize)
  if folder_listing.is_folder(name):
    transform = folder_transform(folder_options, image_size)

  def image(example):
    encoded = example['image']
    key = None
    if augment:
      key = tf.stack([_epoch_seed(seed, example['epoch']), example['index']])
    if folder_listing.is_folder(name):
      if augment:
        return pp.folder_train(encoded, key, **transform,
                               augmentation=folder_options.augmentation)
      return pp.folder_eval(encoded, **transform)
    if name == 'imagenet2012':
      if augment:
        return pp.imagenet_train(encoded, key)
      return pp.imagenet_eval(encoded, eval_resize, ten_crop)
    shape = IMAGE_SHAPES[name]
    decoded = tf.ensure_shape(
        tf.io.decode_image(encoded, channels=shape[2], expand_animations=False), shape)
    return pp.digits_shift(decoded, key) if name == 'digits' and augment else decoded

  def preprocess(example):
    out = {'image': image(example), 'label': example['label']}
    if train:
      out.update(epoch=tf.cast(example['epoch'], tf.int32),
                 index=tf.cast(example['index'], tf.int32))
    return out

  return preprocess


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def _per_device(local_device_count: int):
  def split(batch):
    return {k: tf.reshape(v, tf.concat([[local_device_count, -1], tf.shape(v)[1:]], 0))
            for k, v in batch.items()}
  return split


def create_train_iterator(name: str, *, data_dir: Optional[str], topology: Topology, seed: int,
                          start_step: int = 0, augment: bool = True,
                          holdout_validation: bool = False,
                          image_size: Optional[int] = None,
                          folder_options: Optional[FolderOptions] = None) -> Iterator[dict]:
  """Infinite iterator of this process's training batches, starting at `start_step`.

  An epoch is `topology.steps_per_epoch(num_train)` steps (the remainder is dropped, a new order
  each epoch). The batches from `start_step` on equal those of an uninterrupted run.
  """
  info = dataset_info(name, data_dir, holdout_validation=holdout_validation,
                      image_size=image_size, folder_options=folder_options)
  preprocess = example_preprocessor(name, train=True, seed=seed, augment=augment,
                                    image_size=image_size, folder_options=folder_options)
  steps_per_epoch = topology.steps_per_epoch(info.num_train)
  local_batch = topology.local_batch_size
  if start_step < 0:
    raise ValueError(f'start_step {start_step} is negative')
  builder = _builder(name, data_dir, folder_options)
  shard = _shard(builder, _subset(builder, name, 'train', holdout_validation),
                 topology.process_index, topology.process_count)
  examples = _read(builder, name, shard)
  buffer_size = shard.size
  if name == 'imagenet2012':
    buffer_size = min(buffer_size, IMAGENET_SHUFFLE_BUFFER)
  if folder_options is not None:
    buffer_size = min(buffer_size, folder_options.shuffle_buffer)

  def epoch_examples(epoch):
    # A global TF seed (tf.random.set_seed, keras.utils.set_random_seed) would otherwise enter
    # the shuffle's seeds (and a global seed of 0 breaks a tensor seed): ignore it here.
    tf.compat.v1.get_default_graph().seed = None
    shuffled = examples.shuffle(buffer_size, seed=_epoch_seed(seed, epoch),
                                reshuffle_each_iteration=False)
    return shuffled.take(steps_per_epoch * local_batch).map(
        lambda example: dict(example, epoch=epoch))

  if folder_options is not None and folder_options.class_weights:
    weights = tf.constant(folder.balanced_class_weights(builder), tf.float32)
    unweighted = preprocess
    preprocess = lambda example: dict(unweighted(example),
                                      weight=tf.gather(weights, example['label']))

  start_epoch, step_in_epoch = divmod(start_step, steps_per_epoch)
  ds = (tf.data.Dataset.counter(start_epoch).flat_map(epoch_examples)
        .skip(step_in_epoch * local_batch)
        .map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(local_batch, drop_remainder=True)
        .map(_per_device(topology.local_device_count))
        .prefetch(tf.data.AUTOTUNE))
  return iter(tfds.as_numpy(ds.with_options(_options())))


def create_eval_iterator(name: str, split: str, *, data_dir: Optional[str], topology: Topology,
                         holdout_validation: bool = False, ten_crop: bool = False,
                         eval_resize: str = 'bicubic',
                         image_size: Optional[int] = None,
                         folder_options: Optional[FolderOptions] = None
                         ) -> tuple[Iterable[dict], int]:
  """(re-iterable batches, num_steps) covering this process's share of `split` once.

  The last batches are padded with mask-0 examples so that every process runs num_steps steps.
  """
  info = dataset_info(name, data_dir, holdout_validation=holdout_validation,
                      image_size=image_size, folder_options=folder_options)
  if split not in info.eval_splits:
    raise ValueError(f'split {split!r} is not an eval split of {name}: {info.eval_splits}')
  preprocess = example_preprocessor(name, train=False, ten_crop=ten_crop,
                                    eval_resize=eval_resize, image_size=image_size,
                                    folder_options=folder_options)
  local_batch = topology.local_batch_size
  builder = _builder(name, data_dir, folder_options)
  shard = _shard(builder, _subset(builder, name, split, holdout_validation),
                 topology.process_index, topology.process_count)
  num_steps = topology.eval_steps(info.num_eval[split])
  examples = _read(builder, name, shard)
  if shard.mask is not None:
    examples = examples.cache()  # the SVHN hold-out: read the large splits only once
  ds = examples.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE).map(
      lambda example: dict(example, mask=tf.constant(1.0)))
  padding = tf.data.Dataset.from_tensors(
      {k: tf.zeros(spec.shape, spec.dtype) for k, spec in ds.element_spec.items()})
  ds = (ds.concatenate(padding.repeat(num_steps * local_batch - shard.size))
        .batch(local_batch)
        .map(_per_device(topology.local_device_count))
        .prefetch(tf.data.AUTOTUNE))
  return tfds.as_numpy(ds.with_options(_options())), num_steps


def main():
  parser = argparse.ArgumentParser(description=prepare.__doc__)
  parser.add_argument('name', choices=DATASETS)
  parser.add_argument('--data_dir', default=None, help='tfds data_dir (default: tfds default)')
  parser.add_argument('--manual_dir', default=None, help='imagenet2012: folder of its two tars '
                      '(default: DATA_DIR/downloads/manual)')
  args = parser.parse_args()
  prepare(args.name, args.data_dir, args.manual_dir)


if __name__ == '__main__':
  main()
