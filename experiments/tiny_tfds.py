"""Tiny real tfds datasets, built offline in a given data_dir: the tests' data, and the data of
the experiments that check the pipeline and the multi-host loop (multihost_drift, loop_cpu_ab).

CIFAR and SVHN are stored with the real builders' own features and versions
(`tfds.dataset_builders.store_as_tfds_dataset`), so `tfds.builder(name, data_dir)` loads them as
it would the real ones. Their images are random, except that pixel (0, 0) encodes a unique id
(R = id % 256, G = id // 256), which lets tests follow examples through the pipeline.
imagenet2012 goes through tfds's own manual preparation from ILSVRC2012-style tar files of JPEG
variations of scikit-learn's two sample photos.
"""

import io
import os
import tarfile

import numpy as np
from PIL import Image
from sklearn import datasets
import tensorflow_datasets as tfds

from densenet_jax import input_pipeline

IMAGENET_CLASSES = ('n01440764', 'n01443537', 'n01484850')  # the first three of tfds's labels


def id_images(ids, rng) -> np.ndarray:
  """Random uint8 [len(ids), 32, 32, 3] images whose pixel (0, 0) encodes the id."""
  ids = np.asarray(ids)
  images = rng.integers(0, 256, (len(ids), 32, 32, 3), dtype=np.uint8)
  images[:, 0, 0, 0], images[:, 0, 0, 1] = ids % 256, ids // 256
  return images


def decode_ids(images_0_255) -> np.ndarray:
  """Ids from images on the 0..255 scale (any leading axes)."""
  pixel = np.rint(images_0_255[..., 0, 0, :2]).astype(np.int64)
  return pixel[..., 0] + 256 * pixel[..., 1]


def store(name: str, data_dir, splits: dict):
  """Stores {split: (ids, labels)} as tfds dataset `name` with id-encoded random images (other
  features: text ids, or 0 such as CIFAR-100's coarse labels)."""
  real = tfds.builder(name, data_dir=data_dir)
  others = [k for k in real.info.features if k not in ('image', 'label')]  # id, coarse_label
  rng = np.random.default_rng(len(name))

  def examples(ids, labels):
    for i, image, label in zip(ids, id_images(ids, rng), labels):
      example = {'image': image, 'label': int(label)}
      for key in others:
        text = isinstance(real.info.features[key], tfds.features.Text)
        example[key] = f'example_{i}' if text else 0
      yield int(i), example

  tfds.dataset_builders.store_as_tfds_dataset(
      name=name, version=real.version, features=real.info.features, data_dir=data_dir,
      split_datasets={split: examples(*v) for split, v in splits.items()})


def sample_photos() -> list:
  """Twelve uint8 RGB (or grayscale) variations of scikit-learn's 427x640 photos: crops of
  several shapes (portrait, landscape, shorter side under 224, a 60-pixel strip), one gray."""
  china, flower = datasets.load_sample_images().images
  gray = np.rint(flower @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
  return [china, flower, china[:300, 100:500], flower[50:, :250], china[100:400, 200:350],
          flower[:200], china[200:, 300:], flower[100:300, 100:400], china[:60], gray,
          china[::2, ::2], flower[::3, 50:600:2]]


def jpeg(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(image)).save(buffer, format='JPEG', quality=90)
  return buffer.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def _tar(members: dict) -> bytes:
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode='w') as tar:
    for name, data in members.items():
      _add(tar, name, data)
  return buffer.getvalue()


def build_imagenet(data_dir, manual_dir, num_val: int = 6, mirrored: bool = False):
  """ILSVRC2012_img_train.tar (one tar per class, 4 photos each; 8 with `mirrored`, the photos
  and their mirror images) and ILSVRC2012_img_val.tar (`num_val` photos, labelled by tfds's
  validation_labels.txt) prepared by tfds."""
  photos = [jpeg(p) for p in sample_photos()]
  if mirrored:
    photos += [jpeg(p[:, ::-1]) for p in sample_photos()]
  per_class = len(photos) // len(IMAGENET_CLASSES)
  train = {f'{wnid}.tar': _tar({f'{wnid}_{i}.JPEG': photos[c * per_class + i]
                                for i in range(per_class)})
           for c, wnid in enumerate(IMAGENET_CLASSES)}
  manual_dir.mkdir(parents=True, exist_ok=True)
  (manual_dir / 'ILSVRC2012_img_train.tar').write_bytes(_tar(train))
  val = {f'ILSVRC2012_val_{i + 1:08d}.JPEG': photos[i] for i in range(num_val)}
  (manual_dir / 'ILSVRC2012_img_val.tar').write_bytes(_tar(val))
  input_pipeline.prepare('imagenet2012', str(data_dir), str(manual_dir))


def digits_folder(root) -> dict:
  """scikit-learn's 1,797 digits as PNG class folders root/{train,test}/<digit>/, split as the
  built-in digits dataset is (pixels 0..16 scaled to 0..255), plus three bad files in train/
  (text named .png, a truncated PNG, an empty .jpg). Returns {'train': n, 'test': n} images."""
  from sklearn import model_selection  # pylint: disable=import-outside-toplevel
  from densenet_jax import digits  # pylint: disable=import-outside-toplevel
  images, labels = datasets.load_digits(return_X_y=True)
  train, test = model_selection.train_test_split(
      np.arange(len(labels)), test_size=digits.NUM_TEST, stratify=labels,
      random_state=digits.SPLIT_SEED)
  for split, indices in (('train', train), ('test', test)):
    for i in indices:
      path = root / split / str(labels[i]) / f'{i:04d}.png'
      path.parent.mkdir(parents=True, exist_ok=True)
      Image.fromarray(np.rint(images[i].reshape(8, 8) * 255 / 16).astype(np.uint8)).save(path)
  (root / 'train/3/notes.png').write_bytes(b'not an image')
  (root / 'train/5/cut.png').write_bytes((root / 'test/5' / os.listdir(root / 'test/5')[0])
                                         .read_bytes()[:40])
  (root / 'train/7/empty.jpg').write_bytes(b'')
  return {'train': len(train), 'test': len(test)}
