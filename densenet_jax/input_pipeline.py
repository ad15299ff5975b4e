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

A run opens its data once, `Data(DataOptions)`: the dataset's spec (datasets.SPECS, or a
folder's), its prepared tfds builder and its DatasetInfo. The host does the spec's `host_train`
/ `host_eval` (preprocessing.HOST_OPS: decode, the digits' shift, ImageNet's crops and resizes);
the device turns the uint8 images into the model's input with `Data.device_transform`
(densenet_jax/augment.py): normalization with the dataset's statistics, and for training the
spec's random shift, flip, color jitter and lighting.

Data. `digits` and image folders (`folder:PATH`, densenet_jax/folder.py) are prepared on first
use (offline); the others must be prepared in the tfds data_dir beforehand:
`python -m densenet_jax.input_pipeline NAME --data_dir DIR` (ImageNet also needs its two tar
files, see `_not_prepared_message`). Programs keep TensorFlow off the accelerators when they
start (densenet_jax/runtime.py).

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

Hold-outs (the spec's `holdout`, datasets.HoldOut). CIFAR with `holdout_validation=True`: the
last 5,000 examples of tfds's `train` (stored in random order) are the `validation` split. SVHN
always holds out (paper): 400 examples of each class from `train` and 200 from `extra`, drawn
with numpy's `default_rng(0)`; finding them reads every label once per process (cached).

Batch sizes and steps come from the run's `devices.Topology`; which option each dataset takes is
checked by `config_validation.check_dataset_options`. Constants: docs/reference.md.
"""

import argparse
import dataclasses
import functools
import importlib
import os
from typing import Iterable, Iterator, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from densenet_jax import config_validation, datasets, errors, folder, folder_listing
from densenet_jax import preprocessing as pp
from densenet_jax.augment import DeviceTransform
from densenet_jax.datasets import DataOptions, DatasetInfo, DatasetSpec
from densenet_jax.devices import Topology

class NotPrepared(errors.UserError, FileNotFoundError):
  """A dataset that must be prepared (downloaded) first; the message says how."""


@dataclasses.dataclass(frozen=True)
class _Subset:
  slices: tuple  # ((tfds split, start, stop), ...) in reading order
  size: int  # selected examples
  held_out: Optional[bool] = None  # None: all of the slices; else the per-class hold-out or not


@dataclasses.dataclass(frozen=True)
class _Shard:
  split: str  # tfds split string, e.g. 'train[0:36629]+extra[0:10]'
  start: int  # index of its first example
  size: int  # selected examples
  mask: Optional[np.ndarray] = None  # selection over the slice; None: all


def _new_builder(spec: DatasetSpec, data_dir: Optional[str]):
  if spec.is_folder:
    options = spec.folder
    return folder.UserImageFolder(
        folder_listing.scan(folder_listing.folder_path(spec.name)), data_dir=data_dir,
        max_side=options.max_side, holdout_fraction=options.holdout_fraction,
        holdout_seed=options.holdout_seed)
  if spec.builder:  # data tfds does not have (digits)
    module, _, name = spec.builder.rpartition('.')
    return getattr(importlib.import_module(module), name)(data_dir=data_dir)
  return tfds.builder(spec.name, data_dir=data_dir)


@functools.lru_cache(maxsize=None)
def _builder(spec: DatasetSpec, data_dir: Optional[str]):
  """The prepared tfds builder; digits and folders are prepared on first use, the others must
  be prepared beforehand."""
  builder = _new_builder(spec, data_dir)
  if not builder.is_prepared():
    if not spec.prepared_on_first_use:
      raise NotPrepared(_not_prepared_message(spec, builder))
    builder.download_and_prepare()
  return builder


def _not_prepared_message(spec: DatasetSpec, builder) -> str:
  root, name = builder.data_dir_root, spec.name
  command = f'python -m densenet_jax.input_pipeline {name} --data_dir {root}'
  if spec.manual_download:
    manual_dir = root / 'downloads' / 'manual'
    return (f'{name} is not prepared in {root}. Download {spec.manual_download}, put them in '
            f'{manual_dir}, then run: {command} --manual_dir {manual_dir}')
  return (f'{name} is not prepared in {root}. On a machine with internet access run: {command} '
          f'(it downloads the data), then copy {root / name} to this machine.')


def prepare(name: str, data_dir: Optional[str] = None, manual_dir: Optional[str] = None):
  """Downloads and prepares a dataset (digits: offline; imagenet2012: from manual_dir's tars)."""
  builder = _new_builder(datasets.spec(name), data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))


def _holds_out(spec: DatasetSpec, holdout_validation: bool) -> bool:
  return spec.holdout is not None and (spec.always_holds_out or holdout_validation)


def _subset(builder, spec: DatasetSpec, split: str, holdout_validation: bool) -> _Subset:
  sizes = {s: builder.info.splits[s].num_examples for s in builder.info.splits}
  if not (_holds_out(spec, holdout_validation) and split in ('train', 'validation')):
    return _Subset(((split, 0, sizes[split]),), sizes[split])
  holdout, validation = spec.holdout, split == 'validation'
  if holdout.per_class:
    slices = tuple((s, 0, sizes[s]) for s in spec.holdout_splits)
    held = builder.info.features['label'].num_classes * sum(c for _, c in holdout.per_class)
    total = sum(sizes[s] for s in spec.holdout_splits)
    return _Subset(slices, held if validation else total - held, validation)
  cut = sizes['train'] - holdout.last
  start, stop = (cut, sizes['train']) if validation else (0, cut)
  return _Subset((('train', start, stop),), stop - start)


def _eval_splits(builder, spec: DatasetSpec, holdout_validation: bool) -> tuple:
  if spec.eval_splits is None:  # a folder: what it has
    return tuple(s for s in ('validation', 'test') if s in builder.info.splits)
  held_out = ('validation',) if _holds_out(spec, holdout_validation) else ()
  return held_out + spec.eval_splits


def _read(builder, spec: DatasetSpec, shard: _Shard) -> tf.data.Dataset:
  """The shard's examples in a fixed order: dict(image=encoded bytes, label=int32, index=int64).

  Files are read one at a time (examples in tfds's order) except for datasets read in parallel
  (ImageNet's 16 files), which give a different but equally fixed order.
  """
  read_config = (tfds.ReadConfig() if spec.parallel_read
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
def _held_out(builder, spec: DatasetSpec) -> np.ndarray:
  """Boolean mask over the hold-out splits' concatenation: `count` examples per class of each."""
  rng = np.random.default_rng(spec.holdout.seed)
  masks = []
  for split, count in spec.holdout.per_class:
    size = builder.info.splits[split].num_examples
    labels = np.concatenate([
        batch['label'] for batch in tfds.as_numpy(
            _read(builder, spec, _Shard(f'{split}[0:{size}]', 0, size)).batch(65_536))])
    order = rng.permutation(size)
    held = np.zeros(size, bool)
    for label in range(builder.info.features['label'].num_classes):
      chosen = order[labels[order] == label][:count]
      if len(chosen) < count:
        raise ValueError(f'{spec.name} {split} has {len(chosen)} examples of class {label}, '
                         f'fewer than the {count} to hold out')
      held[chosen] = True
    masks.append(held)
  return np.concatenate(masks)


def _shard(builder, spec: DatasetSpec, subset: _Subset, process_index: int,
           process_count: int) -> _Shard:
  """This process's contiguous share of the subset's selected examples."""
  if subset.size < process_count:
    raise ValueError(f'{subset.size} examples cannot be shared by {process_count} processes')
  lo = subset.size * process_index // process_count
  hi = subset.size * (process_index + 1) // process_count
  mask = None
  first, last = lo, hi
  if subset.held_out is not None:
    mask = _held_out(builder, spec)
    if not subset.held_out:
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


def host_view(options: DataOptions, spec: DatasetSpec) -> pp.HostView:
  """What the host makes of this run's images (preprocessing.HostView)."""
  return pp.HostView(size=datasets.image_shape(spec, options.image_size)[0],
                     eval_resize=options.eval_resize, ten_crop=options.ten_crop,
                     folder=spec.folder)


def example_preprocessor(spec: DatasetSpec, view: pp.HostView, *, train: bool, seed: int = 0,
                         augment: bool = True):
  """fn(example) -> dict(image, label) for one example of `_read`, image uint8 (training: plus
  the example's `epoch` and `index`, which the device draws its augmentation from): the spec's
  host_train (when augmented) or host_eval op. The rest is `device_transform`'s."""
  augment = train and augment
  op = pp.HOST_OPS[spec.host_train if augment else spec.host_eval]

  def preprocess(example):
    key = tf.stack([_epoch_seed(seed, example['epoch']), example['index']]) if augment else None
    out = {'image': op(example['image'], key, spec, view), 'label': example['label']}
    if train:
      out.update(epoch=tf.cast(example['epoch'], tf.int32),
                 index=tf.cast(example['index'], tf.int32))
    return out

  return preprocess


def device_transform(spec: DatasetSpec, info: DatasetInfo, *, train: bool, seed: int = 0,
                     augment: bool = True) -> DeviceTransform:
  """What the device does to this dataset's uint8 batches (training: with `augment`, the
  spec's augmentation) before the model sees them."""
  scale, mean, std = info.normalization
  transform = DeviceTransform(scale=scale, mean=tuple(mean), std=tuple(std), seed=seed)
  if spec.image_shape is not None and tuple(info.image_shape) != spec.image_shape:
    transform = dataclasses.replace(transform, resize=info.image_shape[0])
  if not (train and augment):
    return transform
  return dataclasses.replace(transform, translate=spec.translate, flip=spec.flip,
                             photometric=spec.photometric,
                             fill=tuple(mean) if spec.pad_with_mean else transform.fill)


# Host threads of each parallel map: all the cores this process may use, what autotuning would
# allow at most (TF's AUTOTUNE without autotuning stops at 16).
_PARALLEL_CALLS = (len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity')
                   else os.cpu_count() or 1)


def _options() -> tf.data.Options:
  """Deterministic order, and no autotuning: its model thread sleeps between rounds for up to
  60 s (the sleeps double), and deleting an iterator waits for it to wake, so a run's end and
  every eval pass stalled for up to that long (4-16 s after 6-25 s of iterating, measured with
  tensorflow 2.21). The maps run on _PARALLEL_CALLS threads; prefetch(AUTOTUNE) is left as it
  was (with a slow consumer it held as many elements ahead with autotuning off as on)."""
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = False
  return options


def _per_device(local_device_count: int):
  def split(batch):
    return {k: tf.reshape(v, tf.concat([[local_device_count, -1], tf.shape(v)[1:]], 0))
            for k, v in batch.items()}
  return split


class Data:
  """A run's data, opened once: the spec, the prepared builder, the DatasetInfo and the
  options; the training and eval iterators, the device's transforms and the host's
  preprocessing all come from here.

  `info` given (prediction from a run's classes.json, or from published weights' classes):
  nothing is read or prepared, and only the transforms are available.
  """

  def __init__(self, options: DataOptions, info: Optional[DatasetInfo] = None):
    config_validation.check_dataset_options(
        options.dataset, augment=options.augment, holdout_validation=options.holdout_validation,
        image_size=options.image_size, ten_crop=options.ten_crop,
        eval_resize=options.eval_resize)
    self.options = options
    self.spec = datasets.spec(options.dataset, options.folder)
    self.view = host_view(options, self.spec)
    self.builder = None if info is not None else _builder(self.spec, options.data_dir)
    self.info = info or self._info()

  def _info(self) -> DatasetInfo:
    holdout = self.options.holdout_validation
    eval_splits = _eval_splits(self.builder, self.spec, holdout)
    label = self.builder.info.features['label']
    return DatasetInfo(
        name=self.spec.name, class_names=tuple(label.names), num_classes=label.num_classes,
        image_shape=datasets.image_shape(self.spec, self.options.image_size),
        num_train=_subset(self.builder, self.spec, 'train', holdout).size,
        num_eval={s: _subset(self.builder, self.spec, s, holdout).size for s in eval_splits},
        eval_splits=eval_splits, normalization=self._normalization())

  def _normalization(self) -> tuple:
    if self.spec.normalization is not None:
      return self.spec.normalization
    return (255.0, *folder.normalization_statistics(self.builder))  # a folder's own

  def device_transform(self, train: bool) -> DeviceTransform:
    return device_transform(self.spec, self.info, train=train, seed=self.options.seed,
                            augment=self.options.augment)

  def eval_preprocessor(self):
    """fn(encoded image bytes) -> the uint8 eval image (what predict feeds)."""
    preprocess = example_preprocessor(self.spec, self.view, train=False)
    return lambda encoded: preprocess({'image': encoded, 'label': 0})['image']

  def _shard(self, split: str, topology: Topology) -> _Shard:
    if self.builder is None:
      raise ValueError(f'{self.spec.name}: opened for prediction only, no examples to read')
    subset = _subset(self.builder, self.spec, split, self.options.holdout_validation)
    return _shard(self.builder, self.spec, subset, topology.process_index,
                  topology.process_count)

  def train_iterator(self, topology: Topology, start_step: int = 0) -> Iterator[dict]:
    """Infinite iterator of this process's training batches, starting at `start_step`.

    An epoch is `topology.steps_per_epoch(num_train)` steps (the remainder is dropped, a new
    order each epoch). The batches from `start_step` on equal those of an uninterrupted run.
    """
    if start_step < 0:
      raise ValueError(f'start_step {start_step} is negative')
    seed = self.options.seed
    preprocess = example_preprocessor(self.spec, self.view, train=True, seed=seed,
                                      augment=self.options.augment)
    steps_per_epoch = topology.steps_per_epoch(self.info.num_train)
    local_batch = topology.local_batch_size
    shard = self._shard('train', topology)
    examples = _read(self.builder, self.spec, shard)
    buffer_size = min(shard.size, self.spec.shuffle_buffer or shard.size)

    def epoch_examples(epoch):
      # A global TF seed (tf.random.set_seed, keras.utils.set_random_seed) would otherwise enter
      # the shuffle's seeds (and a global seed of 0 breaks a tensor seed): ignore it here.
      tf.compat.v1.get_default_graph().seed = None
      shuffled = examples.shuffle(buffer_size, seed=_epoch_seed(seed, epoch),
                                  reshuffle_each_iteration=False)
      return shuffled.take(steps_per_epoch * local_batch).map(
          lambda example: dict(example, epoch=epoch))

    if self.spec.folder is not None and self.spec.folder.class_weights:
      weights = tf.constant(folder.balanced_class_weights(self.builder), tf.float32)
      unweighted = preprocess
      preprocess = lambda example: dict(unweighted(example),
                                        weight=tf.gather(weights, example['label']))

    start_epoch, step_in_epoch = divmod(start_step, steps_per_epoch)
    ds = (tf.data.Dataset.counter(start_epoch).flat_map(epoch_examples)
          .skip(step_in_epoch * local_batch)
          .map(preprocess, num_parallel_calls=_PARALLEL_CALLS)
          .batch(local_batch, drop_remainder=True)
          .map(_per_device(topology.local_device_count))
          .prefetch(tf.data.AUTOTUNE))
    return iter(tfds.as_numpy(ds.with_options(_options())))

  def eval_iterator(self, split: str, topology: Topology) -> tuple[Iterable[dict], int]:
    """(re-iterable batches, num_steps) covering this process's share of `split` once.

    The last batches are padded with mask-0 examples so that every process runs num_steps
    steps.
    """
    if split not in self.info.eval_splits:
      raise ValueError(f'split {split!r} is not an eval split of {self.spec.name}: '
                       f'{self.info.eval_splits}')
    preprocess = example_preprocessor(self.spec, self.view, train=False)
    local_batch = topology.local_batch_size
    shard = self._shard(split, topology)
    num_steps = topology.eval_steps(self.info.num_eval[split])
    examples = _read(self.builder, self.spec, shard)
    if shard.mask is not None:
      examples = examples.cache()  # a per-class hold-out: read the large splits only once
    ds = examples.map(preprocess, num_parallel_calls=_PARALLEL_CALLS).map(
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
  parser.add_argument('name', choices=datasets.DATASETS)
  parser.add_argument('--data_dir', default=None, help='tfds data_dir (default: tfds default)')
  parser.add_argument('--manual_dir', default=None, help='imagenet2012: folder of its two tars '
                      '(default: DATA_DIR/downloads/manual)')
  args = parser.parse_args()
  prepare(args.name, args.data_dir, args.manual_dir)


if __name__ == '__main__':
  main()
