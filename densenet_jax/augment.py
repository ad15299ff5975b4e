"""The float work on a batch of uint8 images, done on the device inside the compiled step.

The host pipeline sends uint8 images (4x fewer bytes than float32) with each training example's
epoch and index; `apply` scales and normalizes them and, for training, draws each example's
random shift, flip, color jitter and PCA lighting from the key (seed, epoch, index) alone: not
from its position in the batch, its device or the number of processes, so a resumed run draws
what an uninterrupted one draws. Pure JAX (no TensorFlow): the benchmark and a GPU machine
without TensorFlow use it as the training loop does. Constants and their sources:
docs/reference.md.
"""

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

# fb.resnet.torch's ImageNet color augmentation, on images in [0, 1].
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))
LIGHTING_STD = 0.1
JITTER = 0.4  # brightness, contrast and saturation alike
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


@dataclasses.dataclass(frozen=True)
class DeviceTransform:
  """What the device does to a uint8 batch: x = pixels / scale; training only: a random shift
  by up to `translate` pixels (padding with `fill`, on the scale of x), a random mirror, the color
  jitter and lighting; then (x - mean) / std per channel and a bilinear resize to `resize`.

  Hashable: it is a static argument of the compiled step.
  """
  scale: float
  mean: tuple
  std: tuple
  seed: int = 0
  translate: int = 0
  fill: tuple = (0.0,)
  flip: bool = False
  photometric: bool = False
  resize: Optional[int] = None

  @property
  def is_random(self) -> bool:
    return bool(self.translate or self.flip or self.photometric)

  def without_augmentation(self) -> 'DeviceTransform':
    return dataclasses.replace(self, translate=0, flip=False, photometric=False)


def example_keys(seed: int, epoch: jax.Array, index: jax.Array) -> jax.Array:
  """One key per example: a function of (seed, epoch, index) only."""
  base = jax.random.key(seed)
  return jax.vmap(lambda e, i: jax.random.fold_in(jax.random.fold_in(base, e), i))(
      epoch.astype(jnp.uint32), index.astype(jnp.uint32))


def translate(image: jax.Array, pad: int, fill, key: jax.Array) -> jax.Array:
  """Pads `pad` pixels of `fill` on each side and crops the original size back at an offset
  (y, x) uniform in [0, 2 * pad]: the paper's random shift."""
  height, width, channels = image.shape
  padded = jnp.broadcast_to(jnp.asarray(fill, image.dtype),
                            (height + 2 * pad, width + 2 * pad, channels))
  padded = padded.at[pad:pad + height, pad:pad + width].set(image)
  y, x = jax.random.randint(key, [2], 0, 2 * pad + 1)
  return jax.lax.dynamic_slice(padded, (y, x, jnp.zeros_like(y)), (height, width, channels))


def random_flip(image: jax.Array, key: jax.Array) -> jax.Array:
  """Mirrors the image left-right with probability 0.5."""
  return jnp.where(jax.random.uniform(key) < 0.5, image[:, ::-1], image)


def jitter_params(key: jax.Array):
  """Blend factors 1 + U(-JITTER, JITTER) for (brightness, contrast, saturation) and a uniformly
  random order of the three transforms."""
  alpha_key, order_key = jax.random.split(key)
  alphas = 1.0 + jax.random.uniform(alpha_key, [3], minval=-JITTER, maxval=JITTER)
  return alphas, jnp.argsort(jax.random.uniform(order_key, [3]))


def grayscale(image: jax.Array) -> jax.Array:
  """[H, W, 1] luma 0.299 R + 0.587 G + 0.114 B."""
  return (image @ jnp.asarray(GRAY_WEIGHTS, image.dtype))[..., None]


def color_jitter(image: jax.Array, alphas: jax.Array, order: jax.Array) -> jax.Array:
  """fb.resnet.torch's ColorJitter for given factors and order: each transform is
  `alpha * image + (1 - alpha) * other` without clipping, other being zeros (brightness), the
  mean grayscale value (contrast) or the per-pixel grayscale (saturation)."""
  for i in range(3):
    gray = grayscale(image)
    other = jnp.where(order[i] == 1, jnp.mean(gray), jnp.where(order[i] == 2, gray, 0.0))
    alpha = alphas[order[i]]
    image = alpha * image + (1 - alpha) * other
  return image


def lighting_alpha(key: jax.Array) -> jax.Array:
  return LIGHTING_STD * jax.random.normal(key, [3])


def lighting(image: jax.Array, alpha: jax.Array) -> jax.Array:
  """AlexNet-style PCA noise: adds eigvec @ (alpha * eigval) to every pixel."""
  return image + jnp.asarray(PCA_EIGVEC) @ (alpha * jnp.asarray(PCA_EIGVAL))


def _augment_one(transform: DeviceTransform, image: jax.Array, key: jax.Array) -> jax.Array:
  shift_key, flip_key, jitter_key, lighting_key = jax.random.split(key, 4)
  if transform.translate:
    image = translate(image, transform.translate, transform.fill, shift_key)
  if transform.flip:
    image = random_flip(image, flip_key)
  if transform.photometric:
    image = lighting(color_jitter(image, *jitter_params(jitter_key)),
                     lighting_alpha(lighting_key))
  return image


def apply(transform: DeviceTransform, images: jax.Array, epoch: Optional[jax.Array] = None,
          index: Optional[jax.Array] = None) -> jax.Array:
  """The model's float32 input from a uint8 batch [B, H, W, C] (or [B, crops, H, W, C] for
  10-crop evaluation); a random transform needs each example's epoch and index."""
  images = images.astype(jnp.float32) / transform.scale
  if transform.is_random:
    if epoch is None or index is None:
      raise ValueError('a random DeviceTransform needs the batch\'s epoch and index')
    keys = example_keys(transform.seed, epoch, index)
    images = jax.vmap(lambda image, key: _augment_one(transform, image, key))(images, keys)
  images = (images - jnp.asarray(transform.mean, jnp.float32)) / jnp.asarray(transform.std,
                                                                             jnp.float32)
  if transform.resize is not None:
    size = (transform.resize, transform.resize)
    images = jax.image.resize(images, (*images.shape[:-3], *size, images.shape[-1]), 'bilinear')
  return images
