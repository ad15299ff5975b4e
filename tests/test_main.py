"""main.py end to end, in subprocesses: what a user who causes an error sees (one
`main.py: error:` line, exit status 1, no traceback) for weights that cannot be had."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from experiments import tiny_tfds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET = '--config=configs/imagenet_densenet121.py'


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
