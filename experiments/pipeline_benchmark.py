"""Images per second per CPU core of the per-example preprocessing (decode + augment + batch).

CIFAR: 32x32 PNG crops of scikit-learn's two sample photos (CIFAR is stored as PNG in tfds).
ImageNet: the two 427x640 photos as JPEGs (ImageNet's average is about 400x350), through
fb.resnet.torch's training transform and through the evaluation resize + center crop.
Each runs on one thread and on all cores. Besides wall-clock rates it prints images per
CPU-second of this process, which other load on the machine barely changes.

  python experiments/pipeline_benchmark.py
"""

import io
import os
import sys
import time

import numpy as np
from PIL import Image
from sklearn import datasets
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from densenet_jax import input_pipeline  # pylint: disable=wrong-import-position

BATCH = 128


def encode(image, image_format):
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format=image_format, quality=90)
  return buffer.getvalue()


def examples(encoded, count):
  """count examples cycling over the encoded images, as the training pipeline passes them."""
  encoded = [encoded[i % len(encoded)] for i in range(count)]
  return tf.data.Dataset.from_tensor_slices({
      'image': encoded, 'label': np.zeros(count, np.int32),
      'index': np.arange(count, dtype=np.int64), 'epoch': np.zeros(count, np.int64)})


def images_per_second(name, encoded, count, train, threads):
  preprocess = input_pipeline.example_preprocessor(name, train=train, seed=0)
  options = tf.data.Options()
  if threads == 1:
    options.threading.private_threadpool_size = 1
    options.threading.max_intra_op_parallelism = 1
  ds = (examples(encoded, count).map(preprocess, num_parallel_calls=threads)
        .batch(BATCH).prefetch(2).with_options(options))
  for _ in ds.take(2):  # warm-up
    pass
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in ds:
    pass
  return count / (time.perf_counter() - wall), count / (time.process_time() - cpu)


def main():
  cores = len(os.sched_getaffinity(0))
  photos = datasets.load_sample_images().images
  rng = np.random.default_rng(0)
  cifar = [encode(photo[y:y + 32, x:x + 32], 'PNG') for photo in photos
           for y, x in rng.integers(0, 427 - 32, (256, 2))]
  jpegs = [encode(photo, 'JPEG') for photo in photos]
  cases = [('CIFAR train (PNG decode, normalize, pad-crop, flip)', 'cifar10', cifar, 10_000, True),
           ('ImageNet train (JPEG 427x640, fb.resnet.torch)', 'imagenet2012', jpegs, 400, True),
           ('ImageNet eval (JPEG 427x640, resize 256, crop 224)', 'imagenet2012', jpegs, 400,
            False)]
  print(f'{cores} CPU cores, load average {os.getloadavg()[0]:.1f}')
  for label, name, encoded, count, train in cases:
    wall, cpu = images_per_second(name, encoded, count, train, threads=1)
    print(f'{label}\n  1 thread: {wall:,.0f} images/s, {cpu:,.0f} images per CPU-second')
    wall, cpu = images_per_second(name, encoded, count * cores, train, threads=cores)
    print(f'  {cores} threads: {wall:,.0f} images/s = {wall / cores:,.0f} per core, '
          f'{cpu:,.0f} images per CPU-second')


if __name__ == '__main__':
  main()
