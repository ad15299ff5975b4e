"""A user's image folder (`config.dataset='folder:PATH'`): what it holds, checked without TF.

PATH holds train/<class>/* and optionally val/<class>/* and test/<class>/*. Files whose
extension is an image format's are the candidates (decoding each once, at preparation, decides
which are kept: `folder.UserImageFolder`). The listing's key hashes every candidate's relative path,
size and modification time with the preparation options, so an edited file or a renamed class
prepares the dataset again while an unchanged folder is reused.

TensorFlow- and JAX-free: config validation lists a folder in the time a directory walk takes.
"""

import dataclasses
import hashlib
import json
import os

from densenet_jax import errors

PREFIX = 'folder:'
SPLIT_DIRS = {'train': 'train', 'validation': 'val', 'test': 'test'}  # split -> sub-folder
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')


def is_folder(dataset) -> bool:
  return isinstance(dataset, str) and dataset.startswith(PREFIX)


def folder_path(dataset: str) -> str:
  return os.path.abspath(os.path.expanduser(dataset[len(PREFIX):]))


@dataclasses.dataclass(frozen=True)
class File:
  path: str  # relative to the folder, '/'-separated: 'train/cat/001.jpg'
  label: int
  size: int
  mtime_ns: int


@dataclasses.dataclass(frozen=True)
class Listing:
  root: str
  class_names: tuple  # sorted names of train/'s class folders; label = index
  files: dict  # split ('train', 'validation', 'test') -> tuple of File, sorted by path

  def key(self, preparation: dict) -> str:
    """A hex digest of every file's (path, size, mtime) and the preparation options."""
    digest = hashlib.sha256(json.dumps(preparation, sort_keys=True).encode())
    for split in sorted(self.files):
      for f in self.files[split]:
        digest.update(f'{f.path}\0{f.size}\0{f.mtime_ns}\n'.encode())
    return digest.hexdigest()[:16]


class FolderError(errors.UserError, ValueError):
  """A folder that cannot be a dataset; the message is one line."""


def _class_dirs(directory: str) -> list:
  return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith('.'))


def _images(directory: str, root: str, label: int) -> list:
  files = []
  for parent, dirs, names in os.walk(directory):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    for name in sorted(names):
      if name.startswith('.') or not name.lower().endswith(IMAGE_EXTENSIONS):
        continue
      path = os.path.join(parent, name)
      stat = os.stat(path)
      files.append(File(os.path.relpath(path, root).replace(os.sep, '/'), label, stat.st_size,
                        stat.st_mtime_ns))
  return files


def scan(root: str) -> Listing:
  """The folder's classes and candidate files; FolderError if it cannot be a dataset."""
  if not os.path.isdir(root):
    raise FolderError(f'{root}: no such directory')
  train_dir = os.path.join(root, SPLIT_DIRS['train'])
  if not os.path.isdir(train_dir):
    raise FolderError(f'{root} has no train/ folder (expected train/<class>/*, optionally '
                      'val/<class>/* and test/<class>/*)')
  class_names = tuple(_class_dirs(train_dir))
  if len(class_names) < 2:
    raise FolderError(f'{train_dir} has {len(class_names)} class folder(s); a classifier needs '
                      'at least 2')
  files = {}
  for split, sub in SPLIT_DIRS.items():
    directory = os.path.join(root, sub)
    if not os.path.isdir(directory):
      continue
    unknown = sorted(set(_class_dirs(directory)) - set(class_names))
    if unknown:
      raise FolderError(f'{directory} has class folder {unknown[0]!r}, which train/ does not '
                        f'have (classes: {", ".join(class_names)})')
    found = []
    for label, name in enumerate(class_names):
      class_dir = os.path.join(directory, name)
      images = _images(class_dir, root, label) if os.path.isdir(class_dir) else []
      if split == 'train' and not images:
        raise FolderError(f'{class_dir} holds no images ({", ".join(IMAGE_EXTENSIONS)})')
      found += images
    if not found:
      raise FolderError(f'{directory} holds no images ({", ".join(IMAGE_EXTENSIONS)})')
    files[split] = tuple(found)
  return Listing(root, class_names, files)
