"""Per-image preprocessing against hand computations of the facts sheet's formulas."""

import itertools

import numpy as np
import pytest
import tensorflow as tf

from densenet_jax import preprocessing as pp
from tfds_fixtures import jpeg, sample_photos

EIGVAL, EIGVEC = np.array(pp.PCA_EIGVAL), np.array(pp.PCA_EIGVEC)


def keys(n, salt=0):
  return [tf.constant([salt, i], tf.int64) for i in range(n)]


@pytest.fixture(scope='module')
def photo():
  return sample_photos()[0]  # china.jpg, 427 x 640


@pytest.mark.parametrize('mean, std', [(pp.CIFAR10_MEAN, pp.CIFAR10_STD),
                                       (pp.CIFAR100_MEAN, pp.CIFAR100_STD),
                                       (pp.IMAGENET_MEAN, pp.IMAGENET_STD)])
def test_standardize_maps_mean_to_zero_and_mean_plus_std_to_one(mean, std):
  image = np.broadcast_to(np.array(mean, np.float32), (4, 5, 3))
  np.testing.assert_allclose(pp.standardize(image, mean, std), 0, atol=1e-6)
  np.testing.assert_allclose(pp.standardize(image + np.array(std, np.float32), mean, std), 1,
                             rtol=1e-5)


def test_random_flip_is_an_exact_mirror_or_the_image():
  image = np.random.default_rng(0).normal(size=(6, 7, 3)).astype(np.float32)
  flipped = [bool(np.array_equal(pp.random_flip(image, k), image[:, ::-1])) for k in keys(40)]
  for k, was_flipped in zip(keys(40), flipped):
    expected = image[:, ::-1] if was_flipped else image
    np.testing.assert_array_equal(pp.random_flip(image, k), expected)
  assert 5 < sum(flipped) < 35


def find_window(out, padded, size, mirror):
  """Offsets (y, x, flipped) of `out` among the windows of `padded` (or their mirrors)."""
  found = []
  for y, x in itertools.product(range(padded.shape[0] - size + 1), repeat=2):
    window = padded[y:y + size, x:x + size]
    for flipped in ((False, True) if mirror else (False,)):
      if np.array_equal(out, window[:, ::-1] if flipped else window):
        found.append((y, x, flipped))
  return found


def test_cifar_augment_crops_the_zero_padded_image_and_flips():
  # Strictly positive normalized values, so the zero padding is recognizable.
  image = np.random.default_rng(1).uniform(0.5, 2, size=(32, 32, 3)).astype(np.float32)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  offsets = []
  for k in keys(120):
    out = pp.cifar_augment(image, k).numpy()
    found = find_window(out, padded, 32, mirror=True)
    assert len(found) == 1, found
    offsets.append(found[0])
  ys, xs, flips = zip(*offsets)
  assert set(ys) == set(xs) == set(range(9))  # offsets cover [0, 8] and nothing else
  assert 20 < sum(flips) < 100
  out = pp.cifar_augment(image, keys(1)[0]).numpy()
  y, x, _ = find_window(out, padded, 32, mirror=True)[0]
  assert (out == 0).all(axis=-1).sum() == 32 * 32 - (32 - abs(y - 4)) * (32 - abs(x - 4))


def test_digits_augment_shifts_by_at_most_one_pixel_without_flips():
  image = np.random.default_rng(2).uniform(0.1, 1, size=(8, 8, 1)).astype(np.float32)
  padded = np.pad(image, ((1, 1), (1, 1), (0, 0)))
  offsets = set()
  for k in keys(60):
    found = find_window(pp.digits_augment(image, k).numpy(), padded, 8, mirror=False)
    assert len(found) == 1
    offsets.add(found[0][:2])
  assert offsets == set(itertools.product(range(3), repeat=2))


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


def hand_color_jitter(image, alphas, order):
  """The facts sheet's blends, in numpy."""
  for transform in order:
    gray = image @ np.array([0.299, 0.587, 0.114])
    other = [np.zeros_like(image), np.full_like(image, gray.mean()), gray[..., None]][transform]
    image = alphas[transform] * image + (1 - alphas[transform]) * other
  return image


@pytest.mark.parametrize('order', [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
def test_color_jitter_matches_hand_computation(photo, order):
  image = photo[100:148, 200:264].astype(np.float32) / 255
  alphas = np.array([0.7, 1.3, 1.15], np.float32)
  out = pp.color_jitter(image, alphas, tf.constant(order)).numpy()
  np.testing.assert_allclose(out, hand_color_jitter(image.astype(np.float64), alphas, order),
                             atol=1e-5)
  assert out.min() < 0  # no clipping


def test_jitter_params_draw_factors_and_orders():
  params = [pp.jitter_params(k) for k in keys(300)]
  alphas = np.array([a.numpy() for a, _ in params])
  orders = {tuple(o.numpy()) for _, o in params}
  assert alphas.min() >= 0.6 and alphas.max() <= 1.4
  assert alphas.min() < 0.62 and alphas.max() > 1.38
  assert orders == set(itertools.permutations(range(3)))


def test_lighting_matches_hand_computation(photo):
  image = photo[:16, :16].astype(np.float32) / 255
  alpha = np.array([0.05, -0.1, 0.2], np.float32)
  rgb = np.array([sum(EIGVEC[i, j] * alpha[j] * EIGVAL[j] for j in range(3)) for i in range(3)])
  np.testing.assert_allclose(pp.lighting(image, alpha), image + rgb, atol=1e-6)
  alphas = np.array([pp.lighting_alpha(k).numpy() for k in keys(2000)])
  assert abs(alphas.std() - 0.1) < 0.005 and abs(alphas.mean()) < 0.005


def test_imagenet_train_is_a_deterministic_function_of_the_key():
  photos = sample_photos()
  for image in (photos[0], photos[8], photos[9], np.zeros((20, 2000, 3), np.uint8) + 128):
    data = jpeg(image)
    first = pp.imagenet_train(data, keys(1)[0]).numpy()
    assert first.shape == (224, 224, 3) and first.dtype == np.float32
    assert np.isfinite(first).all() and np.abs(first).max() < 10
    np.testing.assert_array_equal(pp.imagenet_train(data, keys(1)[0]), first)
    assert not np.array_equal(pp.imagenet_train(data, keys(2)[1]), first)


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


@pytest.mark.parametrize('index', [0, 3, 9])
def test_imagenet_eval_is_deterministic_and_its_center_view_is_the_single_crop(index):
  data = jpeg(sample_photos()[index])
  single = pp.imagenet_eval(data).numpy()
  np.testing.assert_array_equal(pp.imagenet_eval(data), single)
  assert single.shape == (224, 224, 3)
  low = (0 - np.array(pp.IMAGENET_MEAN)) / pp.IMAGENET_STD
  high = (1 - np.array(pp.IMAGENET_MEAN)) / pp.IMAGENET_STD
  assert (single >= low - 0.5).all() and (single <= high + 0.5).all()  # bicubic overshoot only
  crops = pp.imagenet_eval(data, ten_crops=True).numpy()
  assert crops.shape == (10, 224, 224, 3)
  np.testing.assert_array_equal(crops[0], single)
  np.testing.assert_array_equal(crops[5:], crops[:5, :, ::-1])
  bilinear = pp.imagenet_eval(data, 'bilinear').numpy()
  assert 0 < np.abs(bilinear - single).mean() < 0.25  # antialiasing blurs a little
