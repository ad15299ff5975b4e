"""The float work on a batch of uint8 images, done on the device inside the compiled step.

The host pipeline sends uint8 images (4x fewer bytes than float32) with each training example's
epoch and index; `apply` scales and normalizes them and, for training, draws each example's
random shift, flip, color jitter and PCA lighting from the key (seed, epoch, index) alone: not
from its position in the batch, its device or the number of processes, so a resumed run draws
what an uninterrupted one draws. An example's draws are one block of NUM_UNIFORMS uniforms from
its key, turned into each law by hand: one threefry call an example keeps the step's compile
time (on CPU, ~1 s per call site) small. Pure JAX (no TensorFlow): the benchmark and a GPU machine
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
# Where each draw sits in an example's block of uniforms.
SHIFT, FLIP, ALPHAS, ORDER, LIGHTING = slice(0, 2), 2, slice(3, 6), slice(6, 9), slice(9, 12)
NUM_UNIFORMS = 12


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


def example_uniforms(seed: int, epoch: jax.Array, index: jax.Array) -> jax.Array:
  """[batch, NUM_UNIFORMS] uniforms in [0, 1) per example: a function of (seed, epoch, index)
  only (the key fold_in(fold_in(key(seed), epoch), index))."""
  base = jax.random.key(seed)

  def draws(e, i):
    return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(base, e), i),
                              [NUM_UNIFORMS])
  return jax.vmap(draws)(epoch.astype(jnp.uint32), index.astype(jnp.uint32))


def translate(image: jax.Array, pad: int, fill, u: jax.Array) -> jax.Array:
  """Pads `pad` pixels of `fill` on each side and crops the original size back at an offset
  (y, x) uniform in [0, 2 * pad] (floor of uniforms u [2] times 2 * pad + 1): the paper's random
  shift."""
  height, width, channels = image.shape
  padded = jnp.broadcast_to(jnp.asarray(fill, image.dtype),
                            (height + 2 * pad, width + 2 * pad, channels))
  padded = padded.at[pad:pad + height, pad:pad + width].set(image)
  y, x = jnp.minimum(jnp.floor(u * (2 * pad + 1)).astype(jnp.int32), 2 * pad)
  return jax.lax.dynamic_slice(padded, (y, x, 0), (height, width, channels))


def random_flip(image: jax.Array, u: jax.Array) -> jax.Array:
  """Mirrors the image left-right when the uniform u < 0.5."""
  return jnp.where(u < 0.5, image[:, ::-1], image)


def jitter_params(u: jax.Array):
  """From 6 uniforms: blend factors 1 + U(-JITTER, JITTER) for (brightness, contrast,
  saturation) and a uniformly random order of the three transforms."""
  alphas = 1.0 + JITTER * (2 * u[:3] - 1)
  return alphas, jnp.argsort(u[3:])


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


def lighting_alpha(u: jax.Array) -> jax.Array:
  """N(0, LIGHTING_STD) per component from 3 uniforms (the inverse normal CDF; u is kept off
  0, where it is -inf)."""
  tiny = jnp.finfo(jnp.float32).tiny
  return LIGHTING_STD * jax.scipy.special.ndtri(jnp.clip(u, tiny, 1 - 2**-24))


def lighting(image: jax.Array, alpha: jax.Array) -> jax.Array:
  """AlexNet-style PCA noise: adds eigvec @ (alpha * eigval) to every pixel."""
  return image + jnp.asarray(PCA_EIGVEC) @ (alpha * jnp.asarray(PCA_EIGVAL))


def _augment_one(transform: DeviceTransform, image: jax.Array, u: jax.Array) -> jax.Array:
  if transform.translate:
    image = translate(image, transform.translate, transform.fill, u[SHIFT])
  if transform.flip:
    image = random_flip(image, u[FLIP])
  if transform.photometric:
    jitter = jitter_params(jnp.concatenate([u[ALPHAS], u[ORDER]]))
    image = lighting(color_jitter(image, *jitter), lighting_alpha(u[LIGHTING]))
  return image


def apply(transform: DeviceTransform, images: jax.Array, epoch: Optional[jax.Array] = None,
          index: Optional[jax.Array] = None) -> jax.Array:
  """The model's float32 input from a uint8 batch [B, H, W, C] (or [B, crops, H, W, C] for
  10-crop evaluation); a random transform needs each example's epoch and index."""
  images = images.astype(jnp.float32) / transform.scale
  if transform.is_random:
    if epoch is None or index is None:
      raise ValueError('a random DeviceTransform needs the batch\'s epoch and index')
    uniforms = example_uniforms(transform.seed, epoch, index)
    images = jax.vmap(lambda image, u: _augment_one(transform, image, u))(images, uniforms)
  images = (images - jnp.asarray(transform.mean, jnp.float32)) / jnp.asarray(transform.std,
                                                                             jnp.float32)
  if transform.resize is not None:
    size = (transform.resize, transform.resize)
    images = jax.image.resize(images, (*images.shape[:-3], *size, images.shape[-1]), 'bilinear')
  return images
