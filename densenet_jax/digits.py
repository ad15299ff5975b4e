"""`digits`: scikit-learn's bundled handwritten digits as a tensorflow-datasets dataset.

1,797 real 8x8 grayscale images (pixel values 0..16), 10 classes, shipped inside scikit-learn,
so preparing it needs no network. The train/test split is stratified and fixed
(`train_test_split(test_size=360, stratify=labels, random_state=0)`): 1,437 train, 360 test.
"""

import numpy as np
import tensorflow_datasets as tfds

NUM_TEST = 360
SPLIT_SEED = 0


class Digits(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's 8x8 handwritten digits (a copy of the UCI ML digits test set)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Stratified 1,437 / 360 train/test split, random_state 0.'}

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='8x8 handwritten digits bundled with scikit-learn, pixel values 0..16.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://scikit-learn.org/stable/datasets/toy_dataset.html',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    from sklearn import datasets, model_selection  # imported only to prepare the data
    images, labels = datasets.load_digits(return_X_y=True)
    images = images.reshape(-1, 8, 8, 1).astype(np.uint8)
    train, test = model_selection.train_test_split(
        np.arange(len(labels)), test_size=NUM_TEST, stratify=labels, random_state=SPLIT_SEED)
    return {
        'train': self._generate_examples(images[train], labels[train], train),
        'test': self._generate_examples(images[test], labels[test], test),
    }

  def _generate_examples(self, images, labels, indices):
    for image, label, index in zip(images, labels, indices):
      yield int(index), {'image': image, 'label': int(label)}
