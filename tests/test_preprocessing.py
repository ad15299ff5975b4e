"""The host's per-image preprocessing: against hand computations of the facts sheet's formulas
and against the float path it replaced (kept below as the oracle, as it was before images left
the host as uint8)."""

import io
import itertools

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from densenet_jax import preprocessing as pp
from experiments.tiny_tfds import jpeg, sample_photos

def keys(n, salt=0):
  return [tf.constant([salt, i], tf.int64) for i in range(n)]


@pytest.fixture(scope='module')
def photo():
  return sample_photos()[0]  # china.jpg, 427 x 640


def find_window(out, padded, size):
  """Offsets (y, x) of `out` among the size x size windows of `padded`."""
  return [(y, x) for y, x in itertools.product(range(padded.shape[0] - size + 1), repeat=2)
          if np.array_equal(out, padded[y:y + size, x:x + size])]


def test_digits_shift_moves_by_at_most_one_pixel_without_flips():
  image = np.random.default_rng(2).integers(1, 17, size=(8, 8, 1), dtype=np.uint8)
  padded = np.pad(image, ((1, 1), (1, 1), (0, 0)))
  offsets = []
  for k in keys(90):
    out = pp.digits_shift(image, k).numpy()
    assert out.dtype == np.uint8
    found = find_window(out, padded, 8)
    assert len(found) == 1
    offsets.append(found[0])
  assert set(offsets) == set(itertools.product(range(3), repeat=2))  # and no mirror


def test_crop_window_follows_the_random_sized_crop_rules():
  height, width = 427, 640
  windows = []
  for k in keys(200):
    window, found = pp.crop_window(height, width, k)
    assert bool(found)
    windows.append(window.numpy())
  y, x, h, w = np.array(windows).T
  assert (y >= 0).all() and (x >= 0).all() and (y + h <= height).all() and (x + w <= width).all()
  area = h * w / (height * width)
  assert area.min() >= 0.08 - 0.005 and area.max() <= 1
  aspect = w / h  # uniform in [3/4, 4/3] before rounding, swapped or not
  assert aspect.min() >= 3 / 4 - 0.02 and aspect.max() <= 4 / 3 + 0.02
  assert (aspect < 0.9).any() and (aspect > 1.1).any() and (y > 0).any() and (x > 0).any()
  # The first fitting try wins, so large areas, which fail more often, are rarer than uniform.
  assert abs(area.mean() - simulated_mean_area(height, width)) < 0.04


def simulated_mean_area(height, width, n=3_000):
  """Mean area fraction of fb.resnet.torch's RandomSizedCrop, simulated in numpy."""
  rng = np.random.default_rng(0)
  areas = []
  for _ in range(n):
    for _ in range(10):
      area = rng.uniform(0.08, 1) * height * width
      aspect = rng.uniform(3 / 4, 4 / 3)
      w, h = np.floor(np.sqrt(area * aspect) + 0.5), np.floor(np.sqrt(area / aspect) + 0.5)
      if rng.uniform() < 0.5:
        w, h = h, w
      if h <= height and w <= width:
        areas.append(h * w / (height * width))
        break
  return np.mean(areas)


def test_crop_window_falls_back_to_the_whole_image():
  # A 20 x 2000 strip: every window of >= 8% area with aspect in [3/4, 4/3] is taller than 20.
  for k in keys(10):
    window, found = pp.crop_window(20, 2000, k)
    assert not bool(found)
    np.testing.assert_array_equal(window, [0, 0, 20, 2000])


def test_imagenet_train_is_a_uint8_deterministic_function_of_the_key():
  photos = sample_photos()
  # The 60x640 photo and the 20x2000 strip take the fallback, whatever the key.
  for image, random in ((photos[0], True), (photos[8], False), (photos[9], True),
                        (np.zeros((20, 2000, 3), np.uint8) + 128, False)):
    data = jpeg(image)
    first = pp.imagenet_train(data, keys(1)[0]).numpy()
    assert first.shape == (224, 224, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(pp.imagenet_train(data, keys(1)[0]), first)
    assert np.array_equal(pp.imagenet_train(data, keys(2)[1]), first) != random


@pytest.mark.parametrize('shape, expected', [((427, 640), (256, 383)), ((640, 427), (383, 256)),
                                             ((200, 640), (256, 819)), ((256, 256), (256, 256))])
def test_resize_shorter_side_truncates_the_longer_side(shape, expected):
  out = pp.resize_shorter_side(np.zeros(shape + (3,), np.float32), 256)
  assert out.shape == expected + (3,)


def test_resize_to_the_same_size_keeps_the_image(photo):
  image = photo[:256, :300].astype(np.float32) / 255
  np.testing.assert_allclose(pp.resize_shorter_side(image, 256), image, atol=1e-5)
  with pytest.raises(ValueError, match='nearest'):
    pp.resize(image, [10, 10], 'nearest')


def test_center_crop_and_ten_crop_geometry():
  image = np.arange(7 * 10 * 2, dtype=np.float32).reshape(7, 10, 2)
  np.testing.assert_array_equal(pp.center_crop(image, 4), image[2:6, 3:7])  # ceil of 1.5, 3
  crops = pp.ten_crop(image, 4).numpy()
  assert crops.shape == (10, 4, 4, 2)
  views = [image[2:6, 3:7], image[:4, :4], image[:4, 6:], image[3:, :4], image[3:, 6:]]
  for i, view in enumerate(views):
    np.testing.assert_array_equal(crops[i], view)
    np.testing.assert_array_equal(crops[i + 5], view[:, ::-1])


def png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='PNG')
  return buffer.getvalue()


def float_crop(image, key, size):
  """The random-sized crop before this change: the full decode, in float [0, 1]."""
  shape = tf.shape(image)
  window, found = pp.crop_window(shape[0], shape[1], key)
  y, x, h, w = tf.unstack(window)
  image = tf.cast(image[y:y + h, x:x + w], tf.float32) / 255
  return tf.cond(found, lambda: pp.resize(image, [size, size]),
                 lambda: pp.center_crop(pp.resize_shorter_side(image, size), size))


def float_eval(encoded, method, ten_crops):
  """The evaluation view before this change, in float [0, 1] (bicubic overshoot unclipped)."""
  image = pp.resize_shorter_side(tf.cast(pp.decode_any(encoded), tf.float32) / 255, 256, method)
  return pp.ten_crop(image, 224) if ten_crops else pp.center_crop(image, 224)


def crop_levels(encoded, key):
  """(new uint8 crop, the float path's crop on 0..255 clipped) as float64, for one key."""
  new = pp.imagenet_train(encoded, key).numpy().astype(np.float64)
  old = float_crop(pp.decode_any(encoded), tf.random.experimental.stateless_split(key, 4)[0], 224)
  return new, np.clip(old.numpy().astype(np.float64) * 255, 0, 255)


@pytest.mark.parametrize('index', [0, 3, 9])  # 427x640, 377x250 (portrait), 427x640 grayscale
@pytest.mark.parametrize('method', ['bicubic', 'bilinear'])
def test_eval_is_the_float_path_rounded_to_uint8(index, method):
  data = jpeg(sample_photos()[index])
  # Resizing 0..255 rather than 0..1 values moves float32 results by < 4e-5 levels (measured).
  bound = (0.5 + 1e-4) / 255
  for ten_crops in (False, True):
    new = pp.imagenet_eval(data, method, ten_crops).numpy()
    assert new.dtype == np.uint8 and new.shape == ((10,) if ten_crops else ()) + (224, 224, 3)
    old = float_eval(data, method, ten_crops).numpy()
    assert np.abs(new / 255 - np.clip(old, 0, 1)).max() <= bound
  crops = pp.imagenet_eval(data, method, True).numpy()
  np.testing.assert_array_equal(crops[0], pp.imagenet_eval(data, method).numpy())
  np.testing.assert_array_equal(crops[5:], crops[:5, :, ::-1])


def test_train_crop_follows_the_full_decode_laws():
  """Decoding only the window changes a JPEG's pixels a little (chroma upsampling at the
  window's edges) and uint8 clips bicubic overshoot; the crop's law is unchanged: for the same
  keys, the pixels and their statistics stay those of the full decode."""
  photo = sample_photos()[0]
  data = jpeg(photo)
  differences, new_means, old_means = [], [], []
  for key in keys(40):
    new, old = crop_levels(data, key)
    differences.append(np.abs(new - old).mean())
    new_means.append(new.mean((0, 1)))
    old_means.append(old.mean((0, 1)))
  # Measured: 0.21-0.25 levels per crop, channel means within 3e-4 levels.
  assert max(differences) < 0.5
  assert np.abs(np.mean(new_means, 0) - np.mean(old_means, 0)).max() < 0.01
  for key in keys(5, salt=1):  # a PNG decodes whole: the float path rounded
    new, old = crop_levels(png(photo), key)
    assert np.abs(new - old).max() <= 0.5 + 1e-3


def test_train_crop_fallback_is_the_center_square():
  """A 30x640 strip: no try fits; the central 30x30 square resized to 224 is what scaling the
  shorter side to 224 and taking the center crop kept, but for the longer side's rounding."""
  strip = sample_photos()[0][200:230]
  assert not bool(pp.crop_window(30, 640, keys(1)[0])[1])
  for encoded in (jpeg(strip), png(strip)):
    new, old = crop_levels(encoded, keys(1)[0])
    assert np.abs(new - old).mean() < 1.0  # measured 0.45 levels
