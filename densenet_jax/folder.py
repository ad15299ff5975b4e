"""A user's image folder prepared once into a tfds dataset on disk (`folder:PATH` datasets).

Each kept file's original encoded bytes are stored (re-encoded only when `max_side` caps its
longest side), with its label and relative path, in sharded records; class names are the
ClassLabel's names. Every candidate file is decoded once here with the decoder training uses
(`preprocessing.decode_any`): a file that does not decode is named in one log line and skipped,
and the count is logged at the end, so no file can fail mid-training.

The dataset lives in DATA_DIR/folders/<key>/, where the key (`folder_listing.Listing.key`) hashes
the files' paths, sizes and times and the preparation options: a changed folder is prepared
again, an unchanged one is reused. Without val/, a stratified `holdout_fraction` of each class of
train/ (numpy default_rng(holdout_seed)) is the validation split.
"""

import json
import os
from typing import Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from densenet_jax import folder_listing
from densenet_jax import preprocessing as pp


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
  """Boolean mask of the held-out examples: round(fraction * n) of each class's n (at least one
  where fraction > 0 and n >= 2; never a whole class)."""
  rng = np.random.default_rng(seed)
  held = np.zeros(len(labels), bool)
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    count = min(len(members) - 1, max(int(round(fraction * len(members))), 1 if fraction else 0))
    held[rng.permutation(members)[:count]] = True
  return held


class UserImageFolder(tfds.core.GeneratorBasedBuilder):
  """The images of one folder listing (see the module docstring)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Original bytes, labels from class folder names, relative paths.'}

  def __init__(self, listing: folder_listing.Listing, *, data_dir: Optional[str],
               max_side: int = 0, holdout_fraction: float = 0.1, holdout_seed: int = 0):
    self._listing = listing
    self._preparation = dict(max_side=max_side, holdout_fraction=holdout_fraction,
                             holdout_seed=holdout_seed, version=str(self.VERSION))
    root = data_dir or os.path.expanduser('~/tensorflow_datasets')
    super().__init__(data_dir=os.path.join(root, 'folders', listing.key(self._preparation)))

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'Images of {self._listing.root}',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(names=self._listing.class_names),
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
    )

  def _splits(self) -> dict:
    files = dict(self._listing.files)
    fraction = self._preparation['holdout_fraction']
    if 'validation' not in files and fraction > 0:
      train = files['train']
      held = stratified_holdout(np.array([f.label for f in train]), fraction,
                                self._preparation['holdout_seed'])
      files['train'] = tuple(f for f, h in zip(train, held) if not h)
      files['validation'] = tuple(f for f, h in zip(train, held) if h)
    return files

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {split: self._generate_examples(split, files) for split, files in self._splits().items()}

  def _generate_examples(self, split, files):
    skipped = 0
    for f in files:
      encoded = _checked_bytes(os.path.join(self._listing.root, f.path),
                               self._preparation['max_side'])
      if encoded is None:
        skipped += 1
        continue
      yield f.path, {'image': encoded, 'label': f.label, 'file_name': f.path}
    logging.info('%s: %d of %d files kept, %d skipped', split, len(files) - skipped, len(files),
                 skipped)
    if skipped:
      print(f'{split}: skipped {skipped} of {len(files)} files that do not decode as images')


def _checked_bytes(path: str, max_side: int) -> Optional[bytes]:
  """The file's bytes (re-encoded if its longest side exceeds max_side > 0), or None with a
  one-line message if it does not decode."""
  with open(path, 'rb') as f:
    encoded = f.read()
  try:
    image = pp.decode_any(encoded)
  except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as e:
    print(f'skipped {path}: does not decode as an image ({pp.decode_error(e)})')
    return None
  height, width = int(image.shape[0]), int(image.shape[1])
  if not max_side or max(height, width) <= max_side:
    return encoded
  scale = max_side / max(height, width)
  size = [max(1, round(height * scale)), max(1, round(width * scale))]
  small = tf.cast(tf.clip_by_value(tf.round(pp.resize(tf.cast(image, tf.float32), size,
                                                      'bilinear')), 0, 255), tf.uint8)
  if encoded[:3] == b'\xff\xd8\xff':  # JPEG stays JPEG; other formats become PNG (lossless)
    return tf.io.encode_jpeg(small, quality=95).numpy()
  return tf.io.encode_png(small).numpy()


def balanced_class_weights(builder: UserImageFolder) -> np.ndarray:
  """N / (classes * n_c) for each class c of the training split (0 for an absent class):
  the mean weight over the training examples is 1."""
  labels = np.concatenate([batch['label'] for batch in tfds.as_numpy(builder.as_dataset(
      split='train', decoders={'image': tfds.decode.SkipDecoding()}).batch(65_536))])
  num_classes = builder.info.features['label'].num_classes
  counts = np.bincount(labels, minlength=num_classes)
  return np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)


def normalization_statistics(builder: UserImageFolder) -> tuple:
  """(mean, std) per channel on the 0..1 scale of the training split's decoded pixels, computed
  once and kept as normalization.json beside the prepared dataset."""
  path = os.path.join(builder.data_dir, 'normalization.json')
  if os.path.exists(path):
    with open(path) as f:
      stats = json.load(f)
    return tuple(stats['mean']), tuple(stats['std'])
  sums, squares, count = np.zeros(3), np.zeros(3), 0
  ds = builder.as_dataset(split='train', decoders={'image': tfds.decode.SkipDecoding()})
  for example in ds.map(lambda e: tf.cast(pp.decode_any(e['image']), tf.float64) / 255):
    pixels = example.numpy().reshape(-1, 3)
    sums += pixels.sum(0)
    squares += (pixels ** 2).sum(0)
    count += len(pixels)
  mean = sums / count
  std = np.sqrt(np.maximum(squares / count - mean ** 2, 0))
  partial = f'{path}.{os.getpid()}.partial'
  with open(partial, 'w') as f:
    json.dump({'mean': mean.tolist(), 'std': std.tolist()}, f)
  os.replace(partial, path)
  return tuple(mean), tuple(std)
