"""The host's per-image work as pure TensorFlow ops: decode, crop, resize, uint8 out.

Images leave here as uint8; the float work (normalization and, for training, CIFAR's and the
folders' shifts, the flips, color jitter and lighting) is the device's, in
densenet_jax/augment.py. The random ops here, ImageNet's random-sized crop and the digits'
shifts, are stateless: they take a `key`, an int64 tensor of shape [2] (the seed of the
`tf.random.stateless_*` ops), so their result is a pure function of (image, key).
Constants and formulas, with their sources, are in docs/reference.md; the ImageNet ones are
those of fb.resnet.torch.

`HOST_OPS` names the host's work on one example for the dataset table (datasets.DatasetSpec's
host_train and host_eval).
"""

import dataclasses
import re
from typing import Optional

import tensorflow as tf

from densenet_jax.datasets import (DIGITS_PAD, IMAGENET_CROP_SIZE, RESIZE_METHODS, DatasetSpec,
                                   FolderOptions)

CROP_SIZE = IMAGENET_CROP_SIZE
RESIZE_SIZE = 256
MIN_CROP_AREA = 0.08
CROP_TRIES = 10


def digits_shift(image, key):
  """A random shift of a uint8 digit by up to DIGITS_PAD pixels (zero padding, then the original
  size cropped at offsets (y, x) uniform in [0, 2 * DIGITS_PAD]); no flip: digits are not
  mirror-symmetric. On the host: here it costs nothing, while on the device its random draws
  add seconds of XLA compile to the 1.5-minute CPU run of the digits (docs/performance.md)."""
  padded = tf.pad(image, [[DIGITS_PAD, DIGITS_PAD], [DIGITS_PAD, DIGITS_PAD], [0, 0]])
  offset = tf.random.stateless_uniform([2], key, 0, 2 * DIGITS_PAD + 1, dtype=tf.int32)
  return tf.slice(padded, [offset[0], offset[1], 0], image.shape)


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
  """Resizes an image (uint8 or float) to `size` (h, w), as float32 on the same scale.

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


def to_uint8(image):
  """A float image on the 0..255 scale rounded to uint8; what a bicubic resize overshoots is
  clipped."""
  return tf.saturate_cast(tf.round(image), tf.uint8)


def image_size(encoded):
  """(height, width) of an encoded image: a JPEG's read from its header, without decoding."""
  return tf.cond(tf.io.is_jpeg(encoded), lambda: tf.io.extract_jpeg_shape(encoded)[:2],
                 lambda: tf.shape(decode_any(encoded))[:2])


def decode_window(encoded, window):
  """The window (y, x, h, w) of an encoded image as uint8 RGB. A JPEG decodes only the window
  (`decode_and_crop_jpeg`: its chroma upsampling can change the window's right-edge pixels by a
  few levels from a full decode); other formats decode whole."""
  y, x, h, w = tf.unstack(window)
  return tf.cond(tf.io.is_jpeg(encoded),
                 lambda: tf.io.decode_and_crop_jpeg(encoded, window, channels=3),
                 lambda: decode_any(encoded)[y:y + h, x:x + w])


def center_square(height, width):
  """The window (y, x, s, s) of the central s x s square, s the shorter side: what scaling the
  shorter side and taking the center crop keeps (odd margins: the extra pixel first)."""
  side = tf.minimum(height, width)
  return tf.stack([(height - side + 1) // 2, (width - side + 1) // 2, side, side])


def random_sized_crop(encoded, key, size):
  """fb.resnet.torch's random-sized crop of an encoded image, resized bicubic to size x size,
  as uint8. When no try fits (the original then scales the shorter side to `size` and takes the
  center crop) the window is the central square of the shorter side."""
  height, width = tf.unstack(image_size(encoded))
  window, found = crop_window(height, width, key)
  window = tf.where(found, window, center_square(height, width))
  return tf.ensure_shape(to_uint8(resize(decode_window(encoded, window), [size, size])),
                         [size, size, 3])


def imagenet_train(encoded, key):
  """The host part of fb.resnet.torch's training transform: the random-sized crop of one JPEG
  (or PNG etc.) at 224 x 224, uint8. The color jitter, lighting, normalization and flip are the
  device's (densenet_jax/augment.py)."""
  return random_sized_crop(encoded, tf.random.experimental.stateless_split(key, 4)[0],
                           CROP_SIZE)


def imagenet_eval(encoded, method='bicubic', ten_crops=False):
  """Shorter side to 256, then the center 224 crop ([224, 224, 3]) or the 10 crops
  ([10, 224, 224, 3], layout of `ten_crop`), as uint8: the float resize rounded."""
  image = resize_shorter_side(decode_any(encoded), RESIZE_SIZE, method)
  if ten_crops:
    return tf.ensure_shape(to_uint8(ten_crop(image, CROP_SIZE)), [10, CROP_SIZE, CROP_SIZE, 3])
  return tf.ensure_shape(to_uint8(center_crop(image, CROP_SIZE)), [CROP_SIZE, CROP_SIZE, 3])

# ---------------------------------------------------------------------------------------------
# Image folders (datasets.FOLDER_*): any size and format, to a square input of `size`.

def decode_any(encoded):
  """JPEG, PNG, BMP or GIF (its first frame) as uint8 RGB: grayscale and RGBA become RGB."""
  return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def decode_error(error: tf.errors.OpError) -> str:
  """The reason of a failed decode, in one line without TensorFlow's op decorations."""
  message = re.sub(r'\{\{function_node [^}]*\}\}\s*|\s*\[Op:\w+\].*$', '', error.message or '')
  return message.strip().splitlines()[0] if message.strip() else type(error).__name__


def folder_eval(encoded, size, transform, crop_ratio):
  """An image file as uint8 [size, size, 3] (antialiased bilinear, as PIL and torchvision):
  'resize_center_crop' scales the shorter side to round(size / crop_ratio) and takes the center
  crop; 'resize' scales the whole image to size x size."""
  image = decode_any(encoded)
  if transform == 'resize':
    image = resize(image, [size, size], 'bilinear')
  else:
    image = center_crop(resize_shorter_side(image, round(size / crop_ratio), 'bilinear'), size)
  return tf.ensure_shape(to_uint8(image), [size, size, 3])


def folder_train(encoded, key, size, transform, crop_ratio, augmentation):
  """augmentation 'imagenet': the random-sized crop of fb.resnet.torch; 'none' and 'translate':
  the eval view. The shift, flip, color jitter and lighting are drawn on the device."""
  if augmentation == 'imagenet':
    return random_sized_crop(encoded, tf.random.experimental.stateless_split(key, 4)[0], size)
  return folder_eval(encoded, size, transform, crop_ratio)



# ---------------------------------------------------------------------------------------------
# The host's work on one example, by the names the dataset table uses.

@dataclasses.dataclass(frozen=True)
class HostView:
  """What the host makes of an image: the side it is fed at (`size`, for datasets whose stored
  size varies), the evaluation's resize and crops, and a folder's options."""
  size: int
  eval_resize: str = 'bicubic'
  ten_crop: bool = False
  folder: Optional[FolderOptions] = None

  @property
  def folder_transform(self) -> dict:
    """folder_eval's keyword arguments (recorded in a run's classes.json)."""
    return dict(size=self.size, transform=self.folder.eval_transform,
                crop_ratio=self.folder.center_crop_ratio)


def _decode(encoded, key, spec: DatasetSpec, view: HostView):
  del key, view
  return tf.ensure_shape(tf.io.decode_image(encoded, channels=spec.image_shape[2],
                                            expand_animations=False), spec.image_shape)


HOST_OPS = {  # name -> fn(encoded bytes, key or None, DatasetSpec, HostView) -> uint8 image
    'decode': _decode,
    'digits_shift': lambda encoded, key, spec, view: digits_shift(
        _decode(encoded, None, spec, view), key),
    'imagenet_crop': lambda encoded, key, spec, view: imagenet_train(encoded, key),
    'imagenet_eval': lambda encoded, key, spec, view: imagenet_eval(
        encoded, view.eval_resize, view.ten_crop),
    'folder_train': lambda encoded, key, spec, view: folder_train(
        encoded, key, **view.folder_transform, augmentation=view.folder.augmentation),
    'folder_eval': lambda encoded, key, spec, view: folder_eval(encoded, **view.folder_transform),
}
