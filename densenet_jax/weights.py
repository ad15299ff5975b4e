"""Published ImageNet weights (torchvision, Keras), downloaded only when a config names them.

`config.init_from='torchvision:densenet121'` (also 161, 169, 201) or `'keras:densenet121'` (169,
201) fetches the publisher's file from the publisher's own URL into a cache directory
(`$DENSENET_JAX_WEIGHTS_DIR`, default ~/.cache/densenet_jax/weights), checks it against the
published hash (torchvision: the sha256 prefix in its file name, which torch.hub checks; Keras:
the md5 that keras.applications passes to get_file), converts it once to this project's variables
(weight_sources.published) and keeps that copy (an .npz), so later runs need neither the network
nor torch nor Keras.

Every file is written under a temporary name in the cache directory and renamed when complete:
a failed or cut download leaves nothing behind, and processes that download at once each rename
a complete file. `$DENSENET_JAX_WEIGHTS_MIRROR` (a URL prefix) replaces the publisher's host, for
mirrors and for the tests, which serve files from 127.0.0.1.

This module imports neither JAX nor TensorFlow at import time (config validation reads PUBLISHED).
"""

import dataclasses
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request

from densenet_jax import errors

_TORCHVISION = 'https://download.pytorch.org/models/'
_KERAS = 'https://storage.googleapis.com/tensorflow/keras-applications/densenet/'


@dataclasses.dataclass(frozen=True)
class Published:
  """One publisher's file: where it is, and the digest (or digest prefix) it must have."""
  url: str
  algorithm: str  # 'sha256' or 'md5'
  digest: str  # the hex digest, or its prefix (torchvision publishes 8 characters of sha256)
  model: str  # the name in architectures.NAMED it converts to
  # The ImageNet eval resize its publisher's accuracies were measured with (antialiased
  # bilinear to 256, center crop 224: docs/reference.md), used unless config.eval_resize is set.
  eval_resize: str = 'bilinear'

  @property
  def file_name(self) -> str:
    return self.url.rsplit('/', 1)[-1]


def _keras(name: str, md5: str) -> Published:
  return Published(f'{_KERAS}{name}_weights_tf_dim_ordering_tf_kernels.h5', 'md5', md5, name)


def _torchvision(name: str, sha256_prefix: str) -> Published:
  return Published(f'{_TORCHVISION}{name}-{sha256_prefix}.pth', 'sha256', sha256_prefix, name)


# From torchvision.models.densenet (weights URLs) and keras.applications.densenet (file_hash of
# the include_top files).
PUBLISHED = {
    'torchvision:densenet121': _torchvision('densenet121', 'a639ec97'),
    'torchvision:densenet161': _torchvision('densenet161', '8d451a50'),
    'torchvision:densenet169': _torchvision('densenet169', 'b2777c0a'),
    'torchvision:densenet201': _torchvision('densenet201', 'c1103571'),
    'keras:densenet121': _keras('densenet121', '9d60b8095a5708f2dcce2bca79d332c7'),
    'keras:densenet169': _keras('densenet169', 'd699b8f76981ab1b30698df4c175e90b'),
    'keras:densenet201': _keras('densenet201', '1ceb130c1ea1b78c3bf6114dbdfd8807'),
}


class DownloadError(errors.UserError, RuntimeError):
  """A published file could not be fetched or verified; nothing was written."""


def is_published_name(init_from: str) -> bool:
  """Whether init_from names published weights ('source:model') rather than a path."""
  return isinstance(init_from, str) and init_from.split(':', 1)[0] in ('torchvision', 'keras')


def cache_dir() -> str:
  return os.environ.get('DENSENET_JAX_WEIGHTS_DIR',
                        os.path.expanduser('~/.cache/densenet_jax/weights'))


def _url(published: Published) -> str:
  mirror = os.environ.get('DENSENET_JAX_WEIGHTS_MIRROR')
  return f'{mirror.rstrip("/")}/{published.file_name}' if mirror else published.url


def write_atomically(path: str, write):
  """Calls write(file object) on a temporary file next to path, then renames it to path; on any
  error the temporary file is removed and path is left as it was."""
  directory = os.path.dirname(path)
  os.makedirs(directory, exist_ok=True)
  fd, partial = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.',
                                 suffix='.partial')
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
    os.replace(partial, path)
  except BaseException:
    os.remove(partial)
    raise


def download(published: Published, directory: str, timeout: float = 60) -> str:
  """The verified file of `published` in `directory`, fetched unless it is there already."""
  path = os.path.join(directory, published.file_name)
  if os.path.exists(path):
    return path
  url = _url(published)
  by_hand = f'without a network, download {url} by hand and put it at {path}'

  def fetch(f):
    digest, size = hashlib.new(published.algorithm), 0
    try:
      with urllib.request.urlopen(url, timeout=timeout) as response:
        expected_size = response.headers.get('Content-Length')
        while chunk := response.read(1 << 20):
          f.write(chunk)
          digest.update(chunk)
          size += len(chunk)
    except urllib.error.HTTPError as e:
      raise DownloadError(f'downloading {url} failed: HTTP {e.code} {e.reason}; {by_hand}') from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
      reason = getattr(e, 'reason', None) or e.__class__.__name__
      raise DownloadError(f'downloading {url} failed ({reason}); {by_hand}') from None
    if expected_size is not None and size != int(expected_size):
      raise DownloadError(f'the download of {url} was cut after {size} of {expected_size} bytes; '
                          'nothing was kept, try again')
    if not digest.hexdigest().startswith(published.digest):
      raise DownloadError(f'{url}: {published.algorithm} {digest.hexdigest()} does not match the '
                          f'published {published.digest} (a corrupt or different file); nothing '
                          'was kept')

  write_atomically(path, fetch)
  return path
