"""The device's transform of uint8 batches (densenet_jax/augment.py).

The color jitter and lighting are checked, for given parameters, against the TensorFlow
functions the host pipeline applied before they moved to the device (kept below as the
oracle, as they were), and their parameter draws statistically against the facts sheet's laws.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from densenet_jax import augment
from densenet_jax.datasets import IMAGENET_MEAN, IMAGENET_STD, SPECS
from experiments.tiny_tfds import sample_photos

EIGVAL, EIGVEC = np.array(augment.PCA_EIGVAL), np.array(augment.PCA_EIGVEC)
# float32 rounding of the blends on [0, 1] images: the same computation in float64 differs by
# < 2e-6 (measured on these photos); 1e-5 is the bound.
ATOL = 1e-5


def tf_grayscale(image):
  return tf.tensordot(image, tf.constant(augment.GRAY_WEIGHTS, image.dtype), 1)[..., None]


def tf_color_jitter(image, alphas, order):
  """preprocessing.color_jitter before this change (the host's TF version)."""
  image = tf.convert_to_tensor(image, tf.float32)
  for i in range(3):
    gray = tf_grayscale(image)
    is_contrast = tf.cast(order[i] == 1, tf.float32)
    is_saturation = tf.cast(order[i] == 2, tf.float32)
    other = is_contrast * tf.reduce_mean(gray) + is_saturation * gray
    alpha = tf.gather(alphas, order[i])
    image = alpha * image + (1 - alpha) * other
  return image


def tf_lighting(image, alpha):
  """preprocessing.lighting before this change."""
  rgb = tf.linalg.matvec(tf.constant(augment.PCA_EIGVEC), tf.cast(alpha, tf.float32) *
                         augment.PCA_EIGVAL)
  return image + rgb


def hand_color_jitter(image, alphas, order):
  """The facts sheet's blends, in numpy float64."""
  for transform in order:
    gray = image @ np.array([0.299, 0.587, 0.114])
    other = [np.zeros_like(image), np.full_like(image, gray.mean()), gray[..., None]][transform]
    image = alphas[transform] * image + (1 - alphas[transform]) * other
  return image


@pytest.fixture(scope='module')
def patch():
  return sample_photos()[0][100:148, 200:264].astype(np.float32) / 255


def keys(n, salt=0):
  return [jax.random.fold_in(jax.random.key(salt), i) for i in range(n)]


@pytest.mark.parametrize('order', list(itertools.permutations(range(3))))
def test_color_jitter_equals_the_tf_version_and_the_hand_computation(patch, order):
  alphas = np.array([0.7, 1.3, 1.15], np.float32)
  out = np.asarray(augment.color_jitter(jnp.asarray(patch), jnp.asarray(alphas),
                                        jnp.asarray(order)))
  np.testing.assert_allclose(out, tf_color_jitter(patch, alphas, tf.constant(order)), atol=ATOL)
  np.testing.assert_allclose(out, hand_color_jitter(patch.astype(np.float64), alphas, order),
                             atol=ATOL)
  assert out.min() < 0  # no clipping


def test_lighting_equals_the_tf_version_and_the_hand_computation(patch):
  alpha = np.array([0.05, -0.1, 0.2], np.float32)
  rgb = np.array([sum(EIGVEC[i, j] * alpha[j] * EIGVAL[j] for j in range(3)) for i in range(3)])
  out = np.asarray(augment.lighting(jnp.asarray(patch), jnp.asarray(alpha)))
  np.testing.assert_allclose(out, tf_lighting(patch, alpha), atol=ATOL)
  np.testing.assert_allclose(out, patch + rgb, atol=ATOL)


def test_parameter_draws_follow_the_laws():
  n = 3000
  jitter = jax.vmap(augment.jitter_params)(jax.random.split(jax.random.key(0), n))
  alphas, orders = np.asarray(jitter[0]), np.asarray(jitter[1])
  # U(0.6, 1.4): mean 1, std 0.8 / sqrt(12) = 0.231; bounds are 4 standard errors.
  assert 0.6 <= alphas.min() and alphas.max() <= 1.4
  assert abs(alphas.mean() - 1) < 4 * 0.231 / np.sqrt(alphas.size)
  assert abs(alphas.std() - 0.231) < 0.01
  counts = {p: 0 for p in itertools.permutations(range(3))}
  for o in orders:
    counts[tuple(o)] += 1
  assert min(counts.values()) > n / 6 - 4 * np.sqrt(n / 6)  # each order ~1/6
  lighting = np.asarray(jax.vmap(augment.lighting_alpha)(jax.random.split(jax.random.key(1),
                                                                          n)))
  assert abs(lighting.std() - 0.1) < 0.004 and abs(lighting.mean()) < 4 * 0.1 / np.sqrt(3 * n)
  # Normal tails: P(|z| > 2 sigma) = 0.0455 (binomial bounds of 4 standard errors).
  tail = np.mean(np.abs(lighting) > 0.2)
  assert abs(tail - 0.0455) < 4 * np.sqrt(0.0455 * 0.9545 / lighting.size)


def find_window(out, padded, size, mirror):
  """Offsets (y, x, flipped) of `out` among the windows of `padded` (or their mirrors)."""
  found = []
  for y, x in itertools.product(range(padded.shape[0] - size + 1), repeat=2):
    window = padded[y:y + size, x:x + size]
    for flipped in ((False, True) if mirror else (False,)):
      if np.array_equal(out, window[:, ::-1] if flipped else window):
        found.append((y, x, flipped))
  return found


def test_translate_crops_the_padded_image_at_uniform_offsets_and_flip_mirrors():
  image = np.random.default_rng(1).uniform(0.5, 2, size=(12, 12, 3)).astype(np.float32)
  fill = (-1.0, -2.0, -3.0)
  padded = np.broadcast_to(np.array(fill, np.float32), (20, 20, 3)).copy()
  padded[4:16, 4:16] = image
  offsets = []
  for key in keys(300):
    shift_key, flip_key = jax.random.split(key)
    out = np.asarray(augment.random_flip(augment.translate(jnp.asarray(image), 4, fill,
                                                           shift_key), flip_key))
    found = find_window(out, padded, 12, mirror=True)
    assert len(found) == 1, found
    offsets.append(found[0])
  ys, xs, flips = zip(*offsets)
  assert set(ys) == set(xs) == set(range(9))  # offsets cover [0, 8] and nothing else
  assert 150 - 4 * 8.7 < sum(flips) < 150 + 4 * 8.7  # Binomial(300, 1/2)


def transform(**fields):
  return augment.DeviceTransform(scale=255.0, mean=IMAGENET_MEAN, std=IMAGENET_STD, **fields)


def test_apply_normalizes_uint8_and_keeps_10_crop_layout():
  images = np.random.default_rng(2).integers(0, 256, (2, 10, 5, 6, 3), np.uint8)
  out = np.asarray(augment.apply(transform(), jnp.asarray(images)))
  expected = (images / 255.0 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
  np.testing.assert_allclose(out, expected, atol=2e-6)  # float32 of values within +-2.2
  scale, mean, std = SPECS['cifar10'].normalization
  cifar = augment.DeviceTransform(scale=scale, mean=mean, std=std)
  np.testing.assert_allclose(augment.apply(cifar, jnp.asarray(images[:, 0])),
                             (images[:, 0] - np.array(mean)) / np.array(std), atol=2e-6)
  with pytest.raises(ValueError, match='epoch and index'):
    augment.apply(transform(flip=True), jnp.asarray(images[:, 0]))


def test_upscale_equals_tf_bilinear():
  digits = np.random.default_rng(3).integers(0, 17, (4, 8, 8, 1), np.uint8)
  out = augment.apply(augment.DeviceTransform(16.0, (0.0,), (1.0,), resize=16),
                      jnp.asarray(digits))
  expected = tf.image.resize(digits.astype(np.float32) / 16, [16, 16], 'bilinear')
  np.testing.assert_allclose(out, expected, atol=1e-6)  # float32 blends of values in [0, 1]


def test_draws_depend_on_seed_epoch_and_index_only():
  """The same example gets the same augmentation wherever it sits in the batch, whatever the
  batch is and on whichever device; another seed, epoch or index changes it."""
  rng = np.random.default_rng(4)
  images = rng.integers(0, 256, (6, 16, 16, 3), np.uint8)
  epoch = np.full(6, 3, np.int32)
  index = np.array([5, 17, 1_281_166, 0, 9, 42], np.int32)
  full = transform(seed=7, translate=2, flip=True, photometric=True)
  apply = jax.jit(augment.apply, static_argnums=0)
  out = np.asarray(apply(full, images, epoch, index))
  order = rng.permutation(6)
  np.testing.assert_array_equal(np.asarray(apply(full, images[order], epoch, index[order])),
                                out[order])
  np.testing.assert_array_equal(np.asarray(apply(full, images[:2], epoch[:2], index[:2])),
                                out[:2])
  on_devices = jax.pmap(augment.apply, static_broadcasted_argnums=0)(
      full, images.reshape(3, 2, 16, 16, 3), epoch.reshape(3, 2), index.reshape(3, 2))
  np.testing.assert_array_equal(np.asarray(on_devices).reshape(out.shape), out)
  for changed, args in [('seed', (transform(seed=8, translate=2, flip=True, photometric=True),
                                  images, epoch, index)),
                        ('epoch', (full, images, epoch + 1, index)),
                        ('index', (full, images, epoch, index + 1))]:
    other = np.asarray(apply(*args))
    assert all(not np.array_equal(other[i], out[i]) for i in range(6)), changed
