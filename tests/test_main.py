"""main.py end to end, in subprocesses: train on the bundled digits, checkpoint, resume and
evaluate on 1 and 8 devices; evaluate imported Keras weights like Keras; and what a user who
causes an error sees (one `main.py: error:` line, exit status 1, no traceback) for weights that
cannot be had. (The end-to-end runs of faults, folders and several processes are in
test_faults.py, test_own_images.py and test_multihost.py, beside their other tests.)"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from densenet_jax import augment, input_pipeline
from densenet_jax.datasets import DataOptions
from densenet_jax.devices import Topology
from experiments import tiny_tfds
import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET = '--config=configs/imagenet_densenet121.py'
TINY = ['--config=configs/digits.py', '--config.model.depth=10', '--config.model.growth_rate=6',
        '--config.image_size=8', '--config.batch_size=64', '--config.log_every_steps=10',
        '--config.lr_decay_epochs=(0.5, 0.75)']


def closed_port() -> int:
  """A localhost port nothing listens on (bound, then released)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def main_py(args, tmp_path, **env) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='1',
             DENSENET_JAX_WEIGHTS_DIR=str(tmp_path / 'weights'), **env)
  return subprocess.run([sys.executable, 'main.py', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


def assert_one_error_line(proc, *parts):
  lines = proc.stderr.strip().splitlines()
  errors = [line for line in lines if line.startswith('main.py: error:')]
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  for part in parts:
    assert part in errors[0], errors[0]


@pytest.fixture(scope='module')
def photo(tmp_path_factory):
  path = tmp_path_factory.mktemp('photo') / 'photo.jpg'
  path.write_bytes(tiny_tfds.jpeg(tiny_tfds.sample_photos()[0]))
  return path


@pytest.mark.parametrize('mode', ['train', 'predict'])
def test_unreachable_weights_download_is_one_error_line(tmp_path, photo, mode):
  """No network (a closed port stands in for the publisher): the download's own message, in one
  line, before any data is read or anything compiled; nothing is left in the cache."""
  mirror = f'http://127.0.0.1:{closed_port()}'
  args = [IMAGENET, '--config.init_from=torchvision:densenet121', f'--mode={mode}',
          f'--workdir={tmp_path / "run"}', f'--config.data_dir={tmp_path / "no_data"}']
  if mode == 'predict':
    args.append(f'--images={photo}')
  proc = main_py(args, tmp_path, DENSENET_JAX_WEIGHTS_MIRROR=mirror)
  assert_one_error_line(proc, f'downloading {mirror}/densenet121-a639ec97.pth failed',
                        'download', 'by hand')
  assert not (tmp_path / 'weights').exists() or not os.listdir(tmp_path / 'weights')


def test_a_weights_file_that_is_no_densenet_is_one_error_line(tmp_path, photo):
  """convert's ValueError (here: a file of an extension no publisher uses) leaves as one line
  naming init_from."""
  bad = tmp_path / 'weights.npz'
  np.savez(bad, x=np.zeros(3))
  proc = main_py([IMAGENET, f'--config.init_from={bad}', '--mode=predict', f'--images={photo}'],
                 tmp_path)
  assert_one_error_line(proc, f"init_from='{bad}'", "extension '.npz'", 'allowed: .pth')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.mark.parametrize('num_devices', [1, 8])
def test_train_checkpoint_resume_and_evaluate(tmp_path, data_dir, num_devices):
  workdir = str(tmp_path / 'run')
  log = helpers.run_main([*TINY, f'--workdir={workdir}', '--config.num_epochs=1'], num_devices,
                         data_dir)
  assert f'{num_devices} devices' in log
  results = json.load(open(os.path.join(workdir, 'results.json')))
  steps_per_epoch = 1437 // 64
  assert results['final']['step'] == steps_per_epoch
  assert results['final']['eval']['test']['count'] == 360
  assert results['num_params'] > 0 and results['config']['model']['depth'] == 10
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == [str(steps_per_epoch)]
  assert os.listdir(os.path.join(workdir, 'tensorboard'))

  # Started again with a longer schedule, the run continues from its checkpoint.
  log = helpers.run_main([*TINY, f'--workdir={workdir}', '--config.num_epochs=2'], num_devices,
                         data_dir)
  assert f'Resumed from step {steps_per_epoch}' in log
  results = json.load(open(os.path.join(workdir, 'results.json')))
  assert results['final']['step'] == 2 * steps_per_epoch
  assert [h['step'] for h in [results['best'], results['final']]][1] == 2 * steps_per_epoch
  error = results['final']['eval']['test']['top1_error']
  assert error < 0.9  # two epochs of a tiny DenseNet already beat chance (0.9)

  log = helpers.run_main([*TINY, f'--workdir={workdir}', '--mode=evaluate',
                          '--config.eval_checkpoint=latest'], num_devices, data_dir)
  assert f'test (360 images, step {2 * steps_per_epoch}): top1_error {100 * error:.2f}%' in log


@pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')  # Keras's own
def test_evaluate_mode_scores_imported_keras_weights_like_keras(tmp_path, keras_file):
  path, keras_model = keras_file
  data_dir = tmp_path / 'tfds'
  tiny_tfds.build_imagenet(data_dir, data_dir / 'manual')
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='1')
  proc = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/imagenet_densenet121.py', '--mode=evaluate',
       f'--config.init_from={path}', f'--config.data_dir={data_dir}',
       '--config.eval_batch_size=8', f'--workdir={tmp_path / "run"}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  match = re.search(r'validation \((\d+) images, step 0\): top1_error ([\d.]+)% '
                    r'top5_error ([\d.]+)% loss ([\d.]+)', proc.stdout)
  assert match, proc.stdout[-2000:]

  # Keras itself on the same preprocessed (bicubic resize 256, center crop 224) images.
  data = input_pipeline.Data(DataOptions('imagenet2012', str(data_dir), eval_resize='bicubic'))
  batches, _ = data.eval_iterator('validation', Topology(8))
  transform = data.device_transform(train=False)
  losses, errors, count = [], [], 0
  for batch in batches:
    mask = batch['mask'][0] == 1
    images = np.asarray(augment.apply(transform, batch['image'][0][mask]))
    logits = np.asarray(keras_model(images, training=False), np.float64)
    labels = batch['label'][0][mask]
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
    losses.extend(-log_probs[np.arange(len(labels)), labels])
    errors.extend(np.argmax(logits, -1) != labels)
    count += int(mask.sum())
  assert int(match[1]) == count
  assert float(match[2]) == pytest.approx(100 * np.mean(errors), abs=0.01)
  assert float(match[4]) == pytest.approx(np.mean(losses), abs=2e-4)
