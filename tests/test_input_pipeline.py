"""The tf.data pipelines on tiny real tfds datasets built offline in a temporary data_dir.

Images of the CIFAR and SVHN fixtures carry their example id in pixel (0, 0) (see
tiny_tfds), so the tests follow every example through sharding, shuffling and padding.
"""

import dataclasses
import itertools

import jax
import numpy as np
import pytest
import tensorflow as tf
from sklearn import datasets as sklearn_datasets
import tensorflow_datasets as tfds

from densenet_jax import input_pipeline as ip
from densenet_jax import augment, datasets, devices, errors
from densenet_jax.datasets import DataOptions, DatasetInfo, HoldOut
from densenet_jax.devices import Topology
from experiments import tiny_tfds

CIFAR10_TRAIN, CIFAR10_TEST = np.arange(64), np.arange(1000, 1061)  # 61: uneven shards
SVHN_TRAIN, SVHN_EXTRA, SVHN_TEST = np.arange(60), np.arange(100, 140), np.arange(200, 230)
LOCAL_DEVICES = jax.local_device_count()  # 8 (conftest.py)
SMALL_HOLDOUTS = {'cifar10': HoldOut(last=16),
                  'svhn_cropped': HoldOut(per_class=(('train', 2), ('extra', 1)))}
# The per-channel (mean, std) on the 0..255 scale of docs/reference.md.
CIFAR10_STATS = ((125.3, 123.0, 113.9), (63.0, 62.1, 66.7))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds')
  tiny_tfds.store('cifar10', root, {'train': (CIFAR10_TRAIN, CIFAR10_TRAIN % 10),
                                        'test': (CIFAR10_TEST, CIFAR10_TEST % 10)})
  tiny_tfds.store('cifar100', root, {'train': (np.arange(40), np.arange(40) * 2),
                                         'test': (np.arange(40, 60), np.arange(20) * 5)})
  tiny_tfds.store('svhn_cropped', root, {'train': (SVHN_TRAIN, SVHN_TRAIN % 10),
                                             'extra': (SVHN_EXTRA, SVHN_EXTRA % 10),
                                             'test': (SVHN_TEST, SVHN_TEST % 10)})
  tiny_tfds.build_imagenet(root, root / 'manual')
  return str(root)


@pytest.fixture(autouse=True)
def small_holdouts(monkeypatch):
  for name, holdout in SMALL_HOLDOUTS.items():
    monkeypatch.setitem(datasets.SPECS, name,
                        dataclasses.replace(datasets.SPECS[name], holdout=holdout))


def data(name, data_dir=None, **options):
  """The dataset opened as a run would (augmented where the dataset can be)."""
  options.setdefault('augment', name not in datasets.SPECS or datasets.SPECS[name].augmentable)
  return ip.Data(DataOptions(name, data_dir, **options))


def info_of(name, data_dir=None, **options):
  return data(name, data_dir, **options).info


def train_batches(name, *, topology, data_dir=None, start_step=0, **options):
  return data(name, data_dir, **options).train_iterator(topology, start_step)


def eval_batches(name, split, *, topology, data_dir=None, **options):
  return data(name, data_dir, **options).eval_iterator(split, topology)


def ids(batch):
  """Example ids of a batch of uint8 images, flattened over devices."""
  assert batch['image'].dtype == np.uint8
  return tiny_tfds.decode_ids(batch['image'].reshape((-1,) + batch['image'].shape[2:]))


def on_local_devices(global_batch_size):
  """One process's topology over this test process's devices."""
  return Topology(global_batch_size, local_device_count=LOCAL_DEVICES)


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def eval_ids(name, split, process_count, global_batch_size, local_device_count=LOCAL_DEVICES,
             **kwargs):
  """Ids seen (mask 1) by all the processes, and each process's number of steps."""
  seen, steps = [], []
  for process in range(process_count):
    topology = Topology(global_batch_size, process, process_count, local_device_count)
    batches, num_steps = eval_batches(name, split, topology=topology, **kwargs)
    batches = list(batches)
    assert len(batches) == num_steps
    steps.append(num_steps)
    for batch in batches:
      mask = batch['mask'].reshape(-1)
      assert set(np.unique(mask)) <= {0.0, 1.0}
      assert (batch['image'].reshape(len(mask), -1)[mask == 0] == 0).all()
      seen.append(ids(batch)[mask == 1])
  return np.concatenate(seen), steps


def test_dataset_info(data_dir):
  info = info_of('cifar10', data_dir)
  stored_names = tuple(tfds.builder('cifar10', data_dir=data_dir).info.features['label'].names)
  assert info == DatasetInfo('cifar10', 10, (32, 32, 3), 64, {'test': 61}, ('test',),
                                stored_names, (1.0, *CIFAR10_STATS))
  info = info_of('cifar10', data_dir, holdout_validation=True)
  assert (info.num_train, info.num_eval) == (48, {'validation': 16, 'test': 61})
  assert info_of('cifar100', data_dir).num_classes == 100
  info = info_of('svhn_cropped', data_dir)
  assert (info.num_train, info.num_eval) == (70, {'validation': 30, 'test': 30})
  assert info.eval_splits == ('validation', 'test')
  info = info_of('imagenet2012', data_dir)
  assert info == DatasetInfo('imagenet2012', 1000, (224, 224, 3), 12, {'validation': 6},
                                ('validation',), info.class_names,
                                (255.0, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
  assert info.class_names[:2] == ('n01440764', 'n01443537') and len(info.class_names) == 1000


def test_errors_name_what_is_wrong_and_how_to_fix_it(data_dir, tmp_path):
  with pytest.raises(errors.UserError, match="'mnist': allowed datasets are digits, cifar10, "):
    info_of('mnist', data_dir)
  with pytest.raises(ip.NotPrepared) as error:
    info_of('imagenet2012', str(tmp_path))
  message = str(error.value)
  for part in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar',
               str(tmp_path / 'downloads' / 'manual'),
               f'python -m densenet_jax.input_pipeline imagenet2012 --data_dir {tmp_path}'):
    assert part in message
  with pytest.raises(FileNotFoundError, match='python -m densenet_jax.input_pipeline cifar10'):
    info_of('cifar10', str(tmp_path))
  with pytest.raises(ValueError, match='holdout_validation'):
    info_of('imagenet2012', data_dir, holdout_validation=True)
  with pytest.raises(ValueError, match='ten_crop'):
    eval_batches('cifar10', 'test', data_dir=data_dir, topology=on_local_devices(8),
                            ten_crop=True)
  with pytest.raises(ValueError, match='augment=False'):
    train_batches('svhn_cropped', augment=True, data_dir=data_dir, topology=on_local_devices(8),
                             seed=0)
  with pytest.raises(ValueError, match=r'must be a multiple of the device count \(16\)'):
    train_batches('cifar10', data_dir=data_dir, seed=0,
                             topology=Topology(24, process_count=2, local_device_count=8))
  with pytest.raises(ValueError, match="split 'validation'"):
    eval_batches('cifar10', 'validation', data_dir=data_dir,
                            topology=on_local_devices(8))


def test_cifar_train_batches_and_their_device_transform(data_dir):
  batch = next(train_batches('cifar10', data_dir=data_dir,
                                        topology=on_local_devices(16), seed=0))
  assert batch['image'].shape == (8, 2, 32, 32, 3) and batch['image'].dtype == np.uint8
  for key in ('label', 'epoch', 'index'):
    assert batch[key].shape == (8, 2) and batch[key].dtype == np.int32, key
  np.testing.assert_array_equal(ids(batch) % 10, batch['label'].reshape(-1))
  index = batch['index'].reshape(-1)  # positions in tfds's file order
  assert len(set(index)) == 16 and 0 <= index.min() and index.max() < 64
  assert (batch['epoch'] == 0).all()
  cifar = data('cifar10', data_dir)
  transform = cifar.device_transform(train=True)
  assert (transform.translate, transform.flip, transform.photometric) == (4, True, False)
  images = np.asarray(jax.pmap(augment.apply, static_broadcasted_argnums=0)(
      transform, batch['image'], batch['epoch'], batch['index']))
  mean, std = CIFAR10_STATS
  low, high = (0 - np.array(mean)) / std, (255 - np.array(mean)) / std
  assert (images >= low - 1e-5).all() and (images <= high + 1e-5).all()
  assert (images == 0).all(axis=-1).any()  # the padding is the mean pixel: 0 once normalized
  assert data('cifar10', data_dir, augment=False).device_transform(train=True) == (
      cifar.device_transform(train=False)) == augment.DeviceTransform(1.0, *CIFAR10_STATS)


def test_cifar100_pipelines(data_dir):
  batch = next(train_batches('cifar100', data_dir=data_dir,
                                        topology=on_local_devices(16), seed=0, augment=False))
  np.testing.assert_array_equal(ids(batch) * 2, batch['label'].reshape(-1))
  seen, steps = eval_ids('cifar100', 'test', 1, data_dir=data_dir, global_batch_size=16)
  np.testing.assert_array_equal(np.sort(seen), np.arange(40, 60))
  assert steps == [2]


def test_order_is_a_function_of_seed_and_epoch(data_dir):
  def epochs(seed):  # 64 examples, 4 steps of 16 per epoch
    iterator = train_batches('cifar10', data_dir=data_dir,
                                        topology=on_local_devices(16), seed=seed, augment=False)
    return [np.concatenate([ids(b) for b in take(iterator, 4)]) for _ in range(3)]
  first = epochs(seed=1)
  for epoch, again in zip(first, epochs(seed=1)):
    np.testing.assert_array_equal(epoch, again)
    np.testing.assert_array_equal(np.sort(epoch), CIFAR10_TRAIN)  # a permutation per epoch
  assert not np.array_equal(first[0], first[1]) and not np.array_equal(first[1], first[2])
  assert not np.array_equal(first[0], epochs(seed=2)[0])
  for global_seed in (0, 1234):  # TensorFlow's global seed plays no part
    tf.random.set_seed(global_seed)
    try:
      np.testing.assert_array_equal(epochs(seed=1)[1], first[1])
    finally:
      tf.random.set_seed(None)


@pytest.mark.parametrize('name, batch_size, start_steps, kwargs', [
    # 48 examples, 3 steps an epoch: resume inside the first epoch and at the second's start
    ('cifar10', 16, (2, 3), {'holdout_validation': True}),
    # 12 examples, 3 steps an epoch: resume inside the second epoch
    ('imagenet2012', 4, (4,), {'local_devices': 2}),
])
def test_resume_at_start_step_yields_the_uninterrupted_batches(data_dir, name, batch_size,
                                                               start_steps, kwargs):
  topology = Topology(batch_size, local_device_count=kwargs.pop('local_devices', LOCAL_DEVICES))

  def stream(start_step, n):
    return take(train_batches(name, data_dir=data_dir, topology=topology, seed=3,
                                         start_step=start_step, **kwargs), n)
  uninterrupted = stream(0, 5)
  for start_step in start_steps:
    for resumed, expected in zip(stream(start_step, 5 - start_step), uninterrupted[start_step:]):
      assert set(resumed) == {'image', 'label', 'epoch', 'index'}
      for key in resumed:
        np.testing.assert_array_equal(resumed[key], expected[key])


@pytest.mark.parametrize('process_count', [2, 4])
def test_train_shards_of_processes_are_disjoint_and_cover_the_split(data_dir, process_count):
  per_process = []
  for process in range(process_count):
    iterator = train_batches(
        'cifar10', data_dir=data_dir, seed=0, augment=False,
        topology=Topology(16, process, process_count, local_device_count=2))
    per_process.append(np.concatenate([ids(b) for b in take(iterator, 4)]))  # one epoch
  assert all(len(p) == 64 // process_count for p in per_process)
  np.testing.assert_array_equal(np.sort(np.concatenate(per_process)), CIFAR10_TRAIN)


@pytest.mark.parametrize('process_count', [1, 2, 4])
def test_eval_sees_every_example_once_and_processes_run_equal_steps(data_dir, process_count):
  seen, steps = eval_ids('cifar10', 'test', process_count, data_dir=data_dir,
                         global_batch_size=8, local_device_count=2)
  np.testing.assert_array_equal(np.sort(seen), CIFAR10_TEST)
  # ceil(ceil(61 / processes) / (8 / processes)): 8 steps for 61, 31 + 30 or 16 + 3 x 15
  assert steps == [8] * process_count


def test_cifar_holdout_is_the_last_examples_of_train(data_dir):
  builder = tfds.builder('cifar10', data_dir=data_dir)
  last = tfds.as_numpy(builder.as_dataset(split='train[-16:]', batch_size=-1))['image']
  seen, _ = eval_ids('cifar10', 'validation', 2, data_dir=data_dir, global_batch_size=8,
                     holdout_validation=True, local_device_count=2)
  np.testing.assert_array_equal(np.sort(seen), np.sort(tiny_tfds.decode_ids(last)))
  iterator = train_batches('cifar10', data_dir=data_dir, topology=on_local_devices(16),
                                      seed=0, augment=False, holdout_validation=True)
  train = np.concatenate([ids(b) for b in take(iterator, 3)])
  np.testing.assert_array_equal(np.sort(np.concatenate([train, seen])), CIFAR10_TRAIN)


def test_svhn_holds_out_per_class_from_train_and_extra(data_dir):
  validation, _ = eval_ids('svhn_cropped', 'validation', 1, data_dir=data_dir,
                           global_batch_size=8, local_device_count=1)
  from_train, from_extra = validation[validation < 100], validation[validation >= 100]
  assert np.bincount(from_train % 10).tolist() == [2] * 10
  assert np.bincount(from_extra % 10).tolist() == [1] * 10
  sharded, steps = eval_ids('svhn_cropped', 'validation', 2, data_dir=data_dir,
                            global_batch_size=8, local_device_count=1)
  np.testing.assert_array_equal(np.sort(sharded), np.sort(validation))
  assert steps == [4, 4]
  train = []
  for process in range(2):  # 70 training examples: one epoch of 5 steps of 14
    iterator = train_batches(
        'svhn_cropped', data_dir=data_dir, seed=0, augment=False,
        topology=Topology(14, process, process_count=2, local_device_count=1))
    batches = take(iterator, 5)
    train.append(np.concatenate([ids(b) for b in batches]))
  assert len(train[0]) == len(train[1]) == 35
  everything = np.concatenate(train + [validation])
  np.testing.assert_array_equal(np.sort(everything), np.concatenate([SVHN_TRAIN, SVHN_EXTRA]))
  test, _ = eval_ids('svhn_cropped', 'test', 1, data_dir=data_dir, global_batch_size=8,
                     local_device_count=1)
  np.testing.assert_array_equal(np.sort(test), SVHN_TEST)


def test_imagenet_pipelines(data_dir):
  builder = tfds.builder('imagenet2012', data_dir=data_dir)
  expected = np.sort(tfds.as_numpy(builder.as_dataset(split='validation', batch_size=-1))['label'])
  batch = next(train_batches('imagenet2012', data_dir=data_dir, seed=0,
                                        topology=Topology(4, local_device_count=2)))
  assert batch['image'].shape == (2, 2, 224, 224, 3) and batch['image'].dtype == np.uint8
  assert set(batch['label'].reshape(-1)) <= {0, 1, 2}
  kwargs = {'data_dir': data_dir, 'topology': Topology(4, local_device_count=2)}
  batches, steps = eval_batches('imagenet2012', 'validation', **kwargs)
  first, again = list(batches), list(batches)
  assert steps == len(first) == 2 and first[0]['image'].shape == (2, 2, 224, 224, 3)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
  labels = np.concatenate([b['label'][b['mask'] == 1] for b in first])
  np.testing.assert_array_equal(np.sort(labels), expected)
  ten, _ = eval_batches('imagenet2012', 'validation', ten_crop=True, **kwargs)
  ten = list(ten)
  assert ten[0]['image'].shape == (2, 2, 10, 224, 224, 3)
  for single, crops in zip(first, ten):
    np.testing.assert_array_equal(crops['image'][:, :, 0], single['image'])
    np.testing.assert_array_equal(crops['mask'], single['mask'])
  bilinear, _ = eval_batches('imagenet2012', 'validation', eval_resize='bilinear',
                                        **kwargs)
  assert not np.array_equal(next(iter(bilinear))['image'], first[0]['image'])


def test_prefetch_to_device_feeds_pmap(data_dir):
  def batches():
    return train_batches('cifar10', data_dir=data_dir, topology=on_local_devices(16),
                                    seed=0)
  expected = take(batches(), 3)
  device_batches = list(devices.prefetch_to_device(take(batches(), 3), size=2))
  assert len(device_batches) == 3
  total = jax.pmap(lambda b: (b['image'].sum(), b['label'] + 1))
  for host, device in zip(expected, device_batches):
    assert isinstance(device['image'], jax.Array)
    assert len(device['image'].sharding.device_set) == 8
    sums, labels = total(device)
    np.testing.assert_allclose(sums, host['image'].sum(axis=(1, 2, 3, 4)), rtol=1e-5)
    np.testing.assert_array_equal(labels, host['label'] + 1)


def test_digits_prepares_offline_with_a_stratified_split(tmp_path):
  data_dir = str(tmp_path)
  info = info_of('digits', data_dir)
  assert info == DatasetInfo('digits', 10, (8, 8, 1), 1437, {'test': 360}, ('test',),
                                tuple(str(d) for d in range(10)), (16.0, (0.0,), (1.0,)))
  batches, steps = eval_batches('digits', 'test', data_dir=data_dir,
                                           topology=Topology(128, local_device_count=1))
  batches = list(batches)
  assert steps == len(batches) == 3
  mask = np.concatenate([b['mask'].reshape(-1) for b in batches]) == 1
  labels = np.concatenate([b['label'].reshape(-1) for b in batches])[mask]
  images = np.concatenate([b['image'].reshape(-1, 8, 8, 1) for b in batches])[mask]
  all_labels = sklearn_datasets.load_digits().target
  assert np.abs(np.bincount(labels) - 360 * np.bincount(all_labels) / 1797).max() <= 1
  assert images.dtype == np.uint8 and images.min() == 0 and images.max() == 16  # as stored
  # Upscaled on the device: the host's batches stay 8x8, so no 0..16 level is rounded away.
  upscaled = next(train_batches('digits', data_dir=data_dir,
                                           topology=on_local_devices(16), seed=0, image_size=32))
  assert upscaled['image'].shape == (8, 2, 8, 8, 1)
  upscaled = data('digits', data_dir, image_size=32)
  assert upscaled.info.image_shape == (32, 32, 1)
  assert upscaled.device_transform(train=True) == augment.DeviceTransform(
      16.0, (0.0,), (1.0,), resize=32)  # the shifts are the host's
