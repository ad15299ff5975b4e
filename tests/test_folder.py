"""'folder:PATH' datasets: preparation from real image files (scikit-learn's sample photos in
several formats, with bad files among them), change detection, the checks that run before
anything is written, the hold-out and the transforms."""

import io
import os

import numpy as np
import pytest
from PIL import Image
import tensorflow_datasets as tfds

from configs import common
from densenet_jax import augment, config_validation, datasets, folder, folder_listing
from densenet_jax import input_pipeline
from densenet_jax import preprocessing as pp
from densenet_jax.devices import Topology
from experiments import tiny_tfds


def options(**overrides) -> datasets.FolderOptions:
  fields = common.folder_config().to_dict()
  fields.update(overrides)
  return datasets.FolderOptions(**fields)


def folder_data(root, data_dir, image_size=None, seed=0, **overrides) -> input_pipeline.Data:
  return input_pipeline.Data(datasets.DataOptions(
      f'folder:{root}', str(data_dir), image_size=image_size, seed=seed,
      folder=options(**overrides)))


def encode(image: np.ndarray, fmt: str, mode: str = None) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image, mode).save(buffer, format=fmt)
  return buffer.getvalue()


def write(path, data: bytes):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'wb') as f:
    f.write(data)


@pytest.fixture
def photos(tmp_path):
  """PATH/train/{china,flower}/ in JPEG, PNG (RGB, gray, RGBA), BMP and GIF, two bad files, and
  PATH/test/; returns (root, {relative path: the RGB pixels it must decode to})."""
  root = tmp_path / 'photos'
  variations = tiny_tfds.sample_photos()
  expected = {}
  for i, image in enumerate(variations[:8]):
    label = ('china', 'flower')[i % 2]
    rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, -1)
    fmt, ext = [('PNG', 'png'), ('BMP', 'bmp'), ('GIF', 'gif'), ('PNG', 'png')][i % 4]
    name = f'train/{label}/{i}.{ext}'
    if i == 3:  # RGBA: the alpha channel is dropped
      write(root / name, encode(np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)]), 'PNG'))
    elif fmt == 'GIF':  # palette images: store what the palette gives back
      data = encode(rgb, 'GIF')
      write(root / name, data)
      rgb = np.asarray(Image.open(io.BytesIO(data)).convert('RGB'))
    else:
      write(root / name, encode(rgb, fmt))
    expected[name] = rgb
  gray = variations[9]
  write(root / 'train/flower/gray.png', encode(gray, 'PNG'))
  expected['train/flower/gray.png'] = np.repeat(gray[..., None], 3, -1)
  write(root / 'train/china/notes.jpg', b'not an image at all')
  write(root / 'train/flower/cut.png', encode(variations[1], 'PNG')[:5000])
  write(root / 'train/china/readme.txt', b'ignored: not an image extension')
  for i, label in enumerate(('china', 'flower')):
    write(root / f'test/{label}/t.jpg', tiny_tfds.jpeg(variations[10 + i]))
  return root, expected


def prepared(root, data_dir, image_size=None, **overrides):
  data = folder_data(root, data_dir, image_size, **overrides)
  return data.spec.name, data.info, data.builder


def test_prepares_kept_files_with_their_original_bytes_and_skips_bad_ones(photos, tmp_path,
                                                                          capsys):
  root, expected = photos
  name, info, builder = prepared(root, tmp_path / 'tfds', holdout_fraction=0.0)
  out = capsys.readouterr().out
  assert 'notes.jpg: does not decode as an image' in out and 'cut.png: does not decode' in out
  assert 'train: skipped 2 of 11 files' in out
  assert info.class_names == ('china', 'flower') and info.num_classes == 2
  assert info.num_train == 9 and info.eval_splits == ('test',) and info.num_eval == {'test': 2}
  examples = list(tfds.as_numpy(builder.as_dataset(
      split='train', decoders={'image': tfds.decode.SkipDecoding()})))
  for example in examples:
    path = example['file_name'].decode()
    assert example['image'] == (root / path).read_bytes()  # the original encoded bytes
    assert info.class_names[example['label']] == path.split('/')[1]
    np.testing.assert_array_equal(pp.decode_any(example['image']).numpy(), expected[path])
  assert sorted(e['file_name'].decode() for e in examples) == sorted(expected)


def test_unchanged_folder_is_reused_and_any_change_prepares_again(photos, tmp_path):
  root, _ = photos
  data_dir = tmp_path / 'tfds'
  key = lambda: folder_listing.scan(str(root)).key(dict(max_side=0))
  first = key()
  assert key() == first
  prepared(root, data_dir)
  (built,) = os.listdir(data_dir / 'folders')
  input_pipeline._builder.cache_clear()
  prepared(root, data_dir)
  assert os.listdir(data_dir / 'folders') == [built]  # reused
  image = root / 'train/china/0.png'
  image.write_bytes(image.read_bytes() + b'\0')  # an edited file (size and time)
  assert key() != first
  os.rename(root / 'train/flower', root / 'train/flowers')
  os.rename(root / 'test/flower', root / 'test/flowers')
  input_pipeline._builder.cache_clear()
  _, info, _ = prepared(root, data_dir)
  assert info.class_names == ('china', 'flowers') and len(os.listdir(data_dir / 'folders')) == 2
  assert folder_listing.scan(str(root)).key(dict(max_side=64)) != key()  # options count too


@pytest.mark.parametrize('make,message', [
    (lambda r: None, r'has no train/ folder'),
    (lambda r: write(r / 'train/a/1.png', b''), r'train has 1 class folder\(s\); a classifier'),
    (lambda r: (write(r / 'train/a/1.png', b''), os.makedirs(r / 'train/b')),
     r'train/b holds no images \(.jpg, .jpeg, .png, .bmp, .gif\)'),
    (lambda r: (write(r / 'train/a/1.png', b''), write(r / 'train/b/1.png', b''),
                write(r / 'val/c/1.png', b'')),
     r"val has class folder 'c', which train/ does not have \(classes: a, b\)"),
    (lambda r: (write(r / 'train/a/1.png', b''), write(r / 'train/b/1.png', b'')),
     r'has no val/ or test/ folder: hold out a fraction > 0'),
])
def test_bad_folders_fail_in_one_line_before_anything_is_written(tmp_path, make, message):
  root = tmp_path / 'data'
  root.mkdir()
  make(root)
  config = common.base_config()
  config.folder.holdout_fraction = 0.0
  with pytest.raises(config_validation.ConfigError, match=message) as raised:
    config_validation.check_folder(f'folder:{root}', config.folder)
  assert '\n' not in str(raised.value)
  assert not (tmp_path / 'tfds').exists()


def test_holdout_is_stratified_fixed_and_never_takes_a_whole_class():
  labels = np.repeat([0, 1, 2], [50, 10, 1])
  held = folder.stratified_holdout(labels, 0.2, seed=0)
  assert [held[labels == c].sum() for c in range(3)] == [10, 2, 0]
  np.testing.assert_array_equal(held, folder.stratified_holdout(labels, 0.2, seed=0))
  assert not np.array_equal(held, folder.stratified_holdout(labels, 0.2, seed=1))


def test_holdout_split_and_batches_cover_every_example_once(photos, tmp_path):
  root, _ = photos
  name, info, _ = prepared(root, tmp_path / 'tfds', holdout_fraction=0.3, image_size=32)
  assert info.eval_splits == ('validation', 'test')
  assert info.num_train + info.num_eval['validation'] == 9
  batches, steps = folder_data(root, tmp_path / 'tfds', image_size=32,
                               holdout_fraction=0.3).eval_iterator('validation', Topology(4))
  masks = np.concatenate([b['mask'].ravel() for b in batches])
  assert masks.sum() == info.num_eval['validation']
  assert next(iter(batches))['image'].shape == (1, 4, 32, 32, 3)


def folder_info(normalization, size):
  return datasets.DatasetInfo('folder:/photos', 2, (size, size, 3), 1, {}, (), ('a', 'b'),
                              normalization)


def test_eval_transforms_and_normalizations_by_hand():
  image = np.zeros((40, 80, 3), np.uint8)
  image[:, 20:60] = 200  # a bright center square of 40x40, dark sides
  encoded = encode(image, 'PNG')
  # resize_center_crop at 32 with ratio 0.8: shorter side 40 -> 40 (no scaling), center 32x32
  # crop of the bright square; the device normalizes it by mean 0.5, std 0.25.
  crop = pp.folder_eval(encoded, 32, 'resize_center_crop', 0.8).numpy()
  assert crop.dtype == np.uint8
  np.testing.assert_array_equal(crop, 200)
  transform = input_pipeline.device_transform(
      datasets.folder_spec('folder:/photos', options()),
      folder_info((255.0, (0.5,) * 3, (0.25,) * 3), 32), train=False)
  np.testing.assert_allclose(augment.apply(transform, crop[None]), (200 / 255 - 0.5) / 0.25,
                             rtol=1e-6)
  # resize: the whole image squashed to 32x32 keeps its left and right dark quarters.
  whole = pp.folder_eval(encoded, 32, 'resize', 1.0).numpy()
  np.testing.assert_array_equal(whole[:, 12:20], 200)
  np.testing.assert_array_equal(whole[:, :6], 0)


def test_translation_shifts_the_eval_view_and_flips_only_when_asked():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
  encoded = encode(image, 'PNG')
  view = pp.folder_eval(encoded, 24, 'resize', 1.0).numpy()
  padded = np.pad(view / 255, ((2, 2), (2, 2), (0, 0)))  # black padding
  windows = {(y, x): padded[y:y + 24, x:x + 24] for y in range(5) for x in range(5)}
  info = folder_info((255.0, (0.0,) * 3, (1.0,) * 3), 24)
  seen, mirrored = set(), 0
  for flip in (False, True):
    host = pp.folder_train(encoded, np.array([0, 7]), 24, 'resize', 1.0, 'translate').numpy()
    np.testing.assert_array_equal(host, view)  # the shift and the flip are the device's
    spec = datasets.folder_spec('folder:/photos', options(augmentation='translate',
                                                          translate_pixels=2, flip=flip))
    transform = input_pipeline.device_transform(spec, info, train=True, seed=3)
    outs = np.asarray(augment.apply(transform, np.stack([view] * 200), np.zeros(200, np.int32),
                                    np.arange(200, dtype=np.int32)))
    for out in outs:
      match = [k for k, w in windows.items() if np.allclose(out, w, atol=1e-6)]
      flipped = [k for k, w in windows.items() if np.allclose(out, w[:, ::-1], atol=1e-6)]
      assert len(match + flipped) == 1
      if flip:
        mirrored += bool(flipped)
      else:
        assert match
        seen.add(match[0])
  assert len(seen) == 25  # every offset in [-2, 2]^2 occurs
  assert 70 < mirrored < 130  # about half (binomial 200, 0.5: 5 sigma)


def test_folder_normalization_statistics_are_the_training_pixels(photos, tmp_path):
  root, expected = photos
  _, _, builder = prepared(root, tmp_path / 'tfds', holdout_fraction=0.0)
  mean, std = folder.normalization_statistics(builder)
  pixels = np.concatenate([e.reshape(-1, 3) for e in expected.values()]) / 255
  np.testing.assert_allclose(mean, pixels.mean(0), rtol=1e-9)
  np.testing.assert_allclose(std, pixels.std(0), rtol=1e-9)
  assert folder.normalization_statistics(builder) == (mean, std)  # the kept copy


def test_max_side_stores_scaled_copies_in_their_format(photos, tmp_path):
  root, expected = photos
  _, _, builder = prepared(root, tmp_path / 'tfds', holdout_fraction=0.0, max_side=64)
  for example in tfds.as_numpy(builder.as_dataset(
      split='test', decoders={'image': tfds.decode.SkipDecoding()})):
    assert example['image'][:3] == b'\xff\xd8\xff'  # a JPEG stays a JPEG
    assert max(pp.decode_any(example['image']).shape[:2]) == 64
  for example in tfds.as_numpy(builder.as_dataset(
      split='train', decoders={'image': tfds.decode.SkipDecoding()})):
    name = example['file_name'].decode()
    height, width = expected[name].shape[:2]
    image = pp.decode_any(example['image']).numpy()
    if max(height, width) <= 64:
      assert example['image'] == (root / name).read_bytes()
    else:  # other formats become PNG; the aspect ratio is kept
      assert example['image'][:4] == b'\x89PNG' and max(image.shape[:2]) == 64
      assert abs(image.shape[0] / image.shape[1] - height / width) < 0.05


def test_class_weights_balance_the_classes(photos, tmp_path):
  root, _ = photos
  name, info, _ = prepared(root, tmp_path / 'tfds', holdout_fraction=0.0, image_size=16)
  batch = next(folder_data(root, tmp_path / 'tfds', image_size=16, holdout_fraction=0.0,
                           class_weights=True).train_iterator(Topology(8)))
  # 4 china and 5 flower images kept: weights 9 / (2 * 4) and 9 / (2 * 5)
  np.testing.assert_allclose(batch['weight'], np.where(batch['label'] == 0, 9 / 8, 9 / 10),
                             rtol=1e-6)
  unweighted = next(folder_data(root, tmp_path / 'tfds', image_size=16,
                                holdout_fraction=0.0).train_iterator(Topology(8)))
  assert 'weight' not in unweighted
  np.testing.assert_array_equal(unweighted['image'], batch['image'])
