"""datasets.py: the table of dataset specs, as data: each spec names existing host ops, the
paper's constants, and a folder's spec follows its options. TensorFlow-free."""

import subprocess
import sys

import pytest

from configs import common
from densenet_jax import datasets, errors

ROOT = __file__.rsplit('/tests/', 1)[0]


def test_every_spec_names_host_ops_that_exist_and_is_consistent():
  from densenet_jax import preprocessing  # pylint: disable=import-outside-toplevel (TF)
  specs = list(datasets.SPECS.values()) + [
      datasets.folder_spec('folder:/x', datasets.FolderOptions(**common.folder_config()))]
  for spec in specs:
    assert spec.host_train in preprocessing.HOST_OPS and spec.host_eval in preprocessing.HOST_OPS
    assert (spec.image_shape is None) == (spec.input_size is not None), spec.name
    if spec.always_holds_out:
      assert spec.holdout is not None, spec.name
    if spec.normalization is not None:
      scale, mean, std = spec.normalization
      assert scale in (1.0, 16.0, 255.0) and len(mean) == len(std)


def test_the_papers_constants():
  cifar10, svhn, imagenet = (datasets.SPECS[n] for n in ('cifar10', 'svhn_cropped',
                                                         'imagenet2012'))
  assert (cifar10.translate, cifar10.flip, cifar10.pad_with_mean) == (4, True, True)
  assert cifar10.holdout == datasets.HoldOut(last=5000)
  assert svhn.holdout.per_class == (('train', 400), ('extra', 200)) and not svhn.augmentable
  assert svhn.holdout_splits == ('train', 'extra') and cifar10.holdout_splits == ('train',)
  assert imagenet.normalization == (255.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
  assert (imagenet.flip, imagenet.photometric, imagenet.ten_crop) == (True, True, True)
  assert datasets.image_shape(imagenet) == (224, 224, 3)
  assert datasets.image_shape(datasets.SPECS['digits'], 32) == (32, 32, 1)
  assert datasets.image_shape(cifar10) == (32, 32, 3)


def test_a_folder_spec_follows_its_options():
  options = datasets.FolderOptions(**{**common.folder_config().to_dict(),
                                      'augmentation': 'translate', 'translate_pixels': 3,
                                      'normalization': 'unit', 'flip': False})
  spec = datasets.spec('folder:/photos', options)
  assert spec.is_folder and spec.folder == options
  assert (spec.translate, spec.flip, spec.photometric) == (3, False, False)
  assert spec.normalization == (255.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
  assert datasets.spec('folder:/photos', datasets.FolderOptions(**{
      **common.folder_config().to_dict(), 'augmentation': 'imagenet'})).photometric
  with pytest.raises(errors.UserError, match='needs its options'):
    datasets.spec('folder:/photos')
  with pytest.raises(errors.UserError, match="'mnist': allowed datasets are digits, "):
    datasets.spec('mnist')


def test_the_table_imports_neither_tensorflow_nor_jax():
  code = ('import sys; from densenet_jax import datasets, settings; '
          'print(sorted(m for m in ("tensorflow", "jax") if m in sys.modules))')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       check=True).stdout
  assert out.strip() == '[]'
