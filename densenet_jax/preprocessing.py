"""Per-image preprocessing of the paper's datasets as pure TensorFlow ops.

Every random op is stateless: it takes a `key`, an int64 tensor of shape [2] (the seed of the
`tf.random.stateless_*` ops), so an augmented image is a pure function of (image, key). Constants
and formulas, with their sources, are in docs/reference.md; the ImageNet ones are those of
fb.resnet.torch, whose images are float RGB in [0, 1].

TensorFlow is kept off the GPUs here, in the first module of the package that imports it, so the
input pipeline never takes accelerator memory from JAX.
"""

import re

import tensorflow as tf

from densenet_jax.datasets import RESIZE_METHODS

tf.config.set_visible_devices([], 'GPU')

# Per-channel statistics on the 0..255 scale.
CIFAR10_MEAN, CIFAR10_STD = (125.3, 123.0, 113.9), (63.0, 62.1, 66.7)
CIFAR100_MEAN, CIFAR100_STD = (129.3, 124.1, 112.4), (68.2, 65.4, 70.4)
CIFAR_PAD = 4
DIGITS_PAD = 1
# ImageNet statistics on the 0..1 scale and the PCA lighting noise of fb.resnet.torch.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))
LIGHTING_STD = 0.1
JITTER = 0.4  # brightness, contrast and saturation alike
GRAY_WEIGHTS = (0.299, 0.587, 0.114)
CROP_SIZE = 224
RESIZE_SIZE = 256
MIN_CROP_AREA = 0.08
CROP_TRIES = 10


def standardize(image, mean, std):
  """(image - mean) / std per channel, as float32."""
  return (tf.cast(image, tf.float32) - mean) / std


def random_flip(image, key):
  """Mirrors the image left-right with probability 0.5."""
  flip = tf.random.stateless_uniform([], key) < 0.5
  return tf.cond(flip, lambda: tf.reverse(image, [1]), lambda: image)


def pad_and_crop(image, pad, key):
  """Zero-pads `pad` pixels on each side and crops the original size back at a random offset.

  Offsets (y, x) are uniform in [0, 2 * pad], so the crop is any window of the padded image.
  """
  height, width = image.shape[0], image.shape[1]
  padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
  offset = tf.random.stateless_uniform([2], key, 0, 2 * pad + 1, dtype=tf.int32)
  return tf.slice(padded, [offset[0], offset[1], 0], [height, width, image.shape[2]])


def cifar_augment(image, key):
  """The paper's '+' augmentation: random crop of the 4-pixel zero-padded image, random flip."""
  crop_key, flip_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  return random_flip(pad_and_crop(image, CIFAR_PAD, crop_key), flip_key)


def digits_augment(image, key):
  """Random shifts of at most one pixel (pad 1, random crop); no flip: digits are not symmetric."""
  return pad_and_crop(image, DIGITS_PAD, key)


def crop_window(height, width, key):
  """fb.resnet.torch's RandomSizedCrop window: (y, x, h, w) and whether a try succeeded.

  Up to CROP_TRIES tries (drawn at once, the first valid one wins): area uniform in
  [MIN_CROP_AREA, 1] of the image, aspect w/h uniform in [3/4, 4/3], w and h rounded and swapped
  with p=0.5, valid when the window fits. Offsets are uniform over the positions that fit. When no
  try fits, the window is the whole image and the caller applies the fallback.
  """
  keys = tf.random.experimental.stateless_split(key, 4)
  height_f, width_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = height_f * width_f * tf.random.stateless_uniform([CROP_TRIES], keys[0], MIN_CROP_AREA, 1.0)
  aspect = tf.random.stateless_uniform([CROP_TRIES], keys[1], 3 / 4, 4 / 3)
  w = tf.cast(tf.floor(tf.sqrt(area * aspect) + 0.5), tf.int32)  # Torch rounds half up
  h = tf.cast(tf.floor(tf.sqrt(area / aspect) + 0.5), tf.int32)
  swap = tf.random.stateless_uniform([CROP_TRIES], keys[2]) < 0.5
  h, w = tf.where(swap, w, h), tf.where(swap, h, w)
  fits = (h <= height) & (w <= width)
  found = tf.reduce_any(fits)
  first = tf.argmax(tf.cast(fits, tf.int32))
  h = tf.where(found, h[first], height)
  w = tf.where(found, w[first], width)
  u = tf.random.stateless_uniform([2], keys[3])
  y = tf.cast(tf.floor(u[0] * tf.cast(height - h + 1, tf.float32)), tf.int32)
  x = tf.cast(tf.floor(u[1] * tf.cast(width - w + 1, tf.float32)), tf.int32)
  return tf.stack([y, x, h, w]), found


def resize(image, size, method='bicubic'):
  """Resizes a float image to `size` (h, w).

  'bicubic' is Torch's image.scale (no antialiasing); 'bilinear' antialiases when shrinking, like
  PIL, which torchvision's published accuracies used.
  """
  if method not in RESIZE_METHODS:
    raise ValueError(f'resize method {method!r} is not one of {RESIZE_METHODS}')
  return tf.image.resize(image, size, method=method, antialias=method == 'bilinear')


def resize_shorter_side(image, size, method='bicubic'):
  """Scales the shorter side to `size`, the longer one to floor(longer * size / shorter)."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  new_height = tf.where(height <= width, size, height * size // width)
  new_width = tf.where(height <= width, width * size // height, size)
  return resize(image, tf.stack([new_height, new_width]), method)


def center_crop(image, size):
  """Central size x size window; odd margins put the extra pixel first (Torch's ceil)."""
  shape = tf.shape(image)
  y, x = (shape[0] - size + 1) // 2, (shape[1] - size + 1) // 2
  return image[y:y + size, x:x + size]


def ten_crop(image, size):
  """[10, size, size, C]: center, top-left, top-right, bottom-left, bottom-right crops, then the
  horizontal mirror of each, in the same order."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  crops = tf.stack([
      center_crop(image, size),
      image[:size, :size],
      image[:size, width - size:],
      image[height - size:, :size],
      image[height - size:, width - size:],
  ])
  return tf.concat([crops, tf.reverse(crops, [2])], axis=0)


def grayscale(image):
  """[H, W, 1] luma 0.299 R + 0.587 G + 0.114 B."""
  return tf.tensordot(image, tf.constant(GRAY_WEIGHTS, image.dtype), 1)[..., None]


def color_jitter(image, alphas, order):
  """fb.resnet.torch's ColorJitter for given blend factors and order.

  alphas: (brightness, contrast, saturation) factors; order: a permutation of (0, 1, 2) naming
  the transforms in the order applied. Each is `alpha * image + (1 - alpha) * other` without
  clipping, other being zeros (brightness), the mean grayscale value (contrast) or the per-pixel
  grayscale (saturation). As the gray weights sum to 1, the three blends commute: the order only
  changes float rounding (~1e-7), but it is kept random as in the original.
  """
  image = tf.convert_to_tensor(image, tf.float32)
  for i in range(3):
    gray = grayscale(image)
    is_contrast = tf.cast(order[i] == 1, tf.float32)
    is_saturation = tf.cast(order[i] == 2, tf.float32)
    other = is_contrast * tf.reduce_mean(gray) + is_saturation * gray  # brightness: zeros
    alpha = tf.gather(alphas, order[i])
    image = alpha * image + (1 - alpha) * other
  return image


def jitter_params(key):
  """Blend factors 1 + U(-JITTER, JITTER) and a uniformly random order of the three transforms."""
  alpha_key, order_key = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  alphas = 1.0 + tf.random.stateless_uniform([3], alpha_key, -JITTER, JITTER)
  order = tf.argsort(tf.random.stateless_uniform([3], order_key))
  return alphas, order


def lighting(image, alpha):
  """AlexNet-style PCA noise: adds eigvec @ (alpha * eigval) to every pixel."""
  rgb = tf.linalg.matvec(tf.constant(PCA_EIGVEC), tf.cast(alpha, tf.float32) * PCA_EIGVAL)
  return image + rgb


def lighting_alpha(key):
  return tf.random.stateless_normal([3], key, stddev=LIGHTING_STD)


def random_sized_crop(image, key, size):
  """fb.resnet.torch's random-sized crop of a uint8 image, resized bicubic to size x size, as
  float in [0, 1]; when no try fits, the shorter side scaled to size and a center crop."""
  shape = tf.shape(image)
  window, found = crop_window(shape[0], shape[1], key)
  y, x, h, w = tf.unstack(window)
  image = tf.cast(image[y:y + h, x:x + w], tf.float32) / 255
  return tf.cond(found, lambda: resize(image, [size, size]),
                 lambda: center_crop(resize_shorter_side(image, size), size))


def imagenet_train(jpeg, key):
  """fb.resnet.torch training transform of one JPEG: [224, 224, 3] float32, normalized.

  Random-sized crop resized to 224 x 224 bicubic, or when no try fits, the shorter side scaled to
  224 and a center crop; color jitter; lighting; normalization; flip. The whole JPEG is decoded:
  decoding only the window (`decode_and_crop_jpeg`) is ~20% faster but its chroma upsampling
  changes pixels on the window's right edge by up to 9 levels.
  """
  keys = tf.random.experimental.stateless_split(key, 4)
  image = random_sized_crop(tf.io.decode_jpeg(jpeg, channels=3), keys[0], CROP_SIZE)
  image = color_jitter(image, *jitter_params(keys[1]))
  image = lighting(image, lighting_alpha(keys[2]))
  image = standardize(image, IMAGENET_MEAN, IMAGENET_STD)
  return tf.ensure_shape(random_flip(image, keys[3]), [CROP_SIZE, CROP_SIZE, 3])


def imagenet_eval(jpeg, method='bicubic', ten_crops=False):
  """Shorter side to 256, then the center 224 crop ([224, 224, 3]) or the 10 crops
  ([10, 224, 224, 3], layout of `ten_crop`), normalized."""
  image = tf.cast(decode_any(jpeg), tf.float32) / 255  # JPEG as decode_jpeg; PNG etc. too
  image = resize_shorter_side(image, RESIZE_SIZE, method)
  if ten_crops:
    crops = tf.ensure_shape(ten_crop(image, CROP_SIZE), [10, CROP_SIZE, CROP_SIZE, 3])
  else:
    crops = tf.ensure_shape(center_crop(image, CROP_SIZE), [CROP_SIZE, CROP_SIZE, 3])
  return standardize(crops, IMAGENET_MEAN, IMAGENET_STD)



# ---------------------------------------------------------------------------------------------
# Image folders (datasets.FOLDER_*): any size and format, to a square input of `size`.

def decode_any(encoded):
  """JPEG, PNG, BMP or GIF (its first frame) as uint8 RGB: grayscale and RGBA become RGB."""
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def decode_error(error: tf.errors.OpError) -> str:
  """The reason of a failed decode, in one line without TensorFlow's op decorations."""
  message = re.sub(r'\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\].*$', '', error.message or '')
  return message.strip().splitlines()[0] if message.strip() else type(error).__name__


def folder_eval_view(image, size, transform, crop_ratio):
  """A uint8 image as float [0, 1] [size, size, 3] (antialiased bilinear, as PIL and
  torchvision): 'resize_center_crop' scales the shorter side to round(size / crop_ratio) and
  takes the center crop; 'resize' scales the whole image to size x size."""
  image = tf.cast(image, tf.float32) / 255
  if transform == 'resize':
    image = resize(image, [size, size], 'bilinear')
  else:
    image = center_crop(resize_shorter_side(image, round(size / crop_ratio), 'bilinear'), size)
  return tf.ensure_shape(image, [size, size, 3])


def folder_eval(encoded, size, transform, crop_ratio, mean, std):
  return standardize(folder_eval_view(decode_any(encoded), size, transform, crop_ratio), mean,
                     std)


def folder_train(encoded, key, size, transform, crop_ratio, mean, std, augmentation,
                 translate_pixels, flip):
  """augmentation 'none': the eval view; 'translate': the eval view shifted by up to
  translate_pixels (zero padding, random crop: the paper's CIFAR law); 'imagenet': the
  random-sized crop, color jitter and lighting of fb.resnet.torch. flip: a random mirror."""
  keys = tf.random.experimental.stateless_split(key, 4)
  image = decode_any(encoded)
  if augmentation == 'imagenet':
    image = random_sized_crop(image, keys[0], size)
    image = lighting(color_jitter(image, *jitter_params(keys[1])), lighting_alpha(keys[2]))
  else:
    image = folder_eval_view(image, size, transform, crop_ratio)
    if augmentation == 'translate':
      image = pad_and_crop(image, translate_pixels, keys[0])
  if flip:
    image = random_flip(image, keys[3])
  return tf.ensure_shape(standardize(image, mean, std), [size, size, 3])
