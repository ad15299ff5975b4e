"""folder_listing.py: what an image folder holds (classes, splits, candidate files) and the key
that says whether it changed; TensorFlow-free."""

import os

import pytest

from densenet_jax import folder_listing


def touch(path, data=b'x'):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


def test_scan_lists_classes_splits_and_image_files_only(tmp_path):
  for name in ('train/cat/b.JPG', 'train/cat/a.png', 'train/cat/sub/c.gif', 'train/dog/1.bmp',
               'train/dog/notes.txt', 'train/dog/.hidden.png', 'train/.cache/x.png',
               'test/dog/2.jpeg'):
    touch(tmp_path / name)
  listing = folder_listing.scan(str(tmp_path))
  assert listing.class_names == ('cat', 'dog')
  assert [(f.path, f.label) for f in listing.files['train']] == [
      ('train/cat/a.png', 0), ('train/cat/b.JPG', 0), ('train/cat/sub/c.gif', 0),
      ('train/dog/1.bmp', 1)]
  assert [f.path for f in listing.files['test']] == ['test/dog/2.jpeg']
  assert 'validation' not in listing.files
  assert folder_listing.is_folder(f'folder:{tmp_path}') and not folder_listing.is_folder('cifar10')
  assert folder_listing.folder_path('folder:~/x') == os.path.expanduser('~/x')


def test_the_key_changes_with_a_file_or_the_options(tmp_path):
  touch(tmp_path / 'train/a/1.png')
  touch(tmp_path / 'train/b/1.png')
  key = lambda **options: folder_listing.scan(str(tmp_path)).key(options)
  first = key(max_side=0)
  assert key(max_side=0) == first and key(max_side=64) != first
  touch(tmp_path / 'train/b/1.png', b'xy')  # another size
  assert key(max_side=0) != first


def test_not_a_directory_is_a_folder_error(tmp_path):
  with pytest.raises(folder_listing.FolderError, match=r'/nothing: no such directory$'):
    folder_listing.scan(str(tmp_path / 'nothing'))
