"""Published weights on request: a real HTTP server on 127.0.0.1 (the standard library's) stands
in for the publishers through $DENSENET_JAX_WEIGHTS_MIRROR; nothing here reaches the internet."""

import hashlib
import os
import socket

import pytest

from densenet_jax import config_validation, weights
import helpers

BODY = helpers.WEIGHTS_BODY


def published(name, digest=hashlib.sha256(BODY).hexdigest()[:8], algorithm='sha256'):
  return weights.Published(f'https://publisher.invalid/models/{name}', algorithm, digest,
                           'densenet121')


def test_good_file_is_verified_kept_and_not_fetched_again(server, tmp_path):
  path = weights.download(published('good.bin'), str(tmp_path))
  assert open(path, 'rb').read() == BODY and os.listdir(tmp_path) == ['good.bin']
  assert weights.download(published('good.bin'), str(tmp_path)) == path
  assert helpers.Publisher.requests == ['/good.bin']  # the second call made no request


def test_md5_digests_are_checked_whole(server, tmp_path):
  weights.download(published('good.bin', hashlib.md5(BODY).hexdigest(), 'md5'), str(tmp_path))
  with pytest.raises(weights.DownloadError, match='md5'):
    weights.download(published('good.bin', hashlib.md5(b'other').hexdigest(), 'md5'),
                     str(tmp_path / 'other'))


@pytest.mark.parametrize('name,digest,message', [
    ('good.bin', '00000000', r'sha256 \w+ does not match the published 00000000 .*nothing was '
                             'kept'),
    ('cut.bin', None, r'was cut after 150000 of 300000 bytes; nothing was kept'),
    ('missing.bin', None, r'HTTP 404 .*download http://127\.0\.0\.1:\d+/missing\.bin by hand '
                          r'and put it at .*missing\.bin'),
])
def test_failures_leave_nothing_behind(server, tmp_path, name, digest, message):
  spec = published(name, digest) if digest else published(name)
  with pytest.raises(weights.DownloadError, match=message):
    weights.download(spec, str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_refused_connection_names_the_url_and_where_to_put_the_file(monkeypatch, tmp_path):
  with socket.socket() as s:  # a port that nothing listens on once closed
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  monkeypatch.setenv('DENSENET_JAX_WEIGHTS_MIRROR', f'http://127.0.0.1:{port}')
  with pytest.raises(weights.DownloadError,
                     match=rf'downloading http://127\.0\.0\.1:{port}/good\.bin failed \(.*'
                           r'refused.*\); without a network, download .* by hand'):
    weights.download(published('good.bin'), str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_published_names_are_checked_before_anything_runs():
  config_validation.check_init_from('torchvision:densenet121', 'densenet121')
  with pytest.raises(config_validation.ConfigError,
                     match=r"config.init_from='torchvision:densenet122': published weights are "
                           r'torchvision:densenet121, .*keras:densenet201'):
    config_validation.check_init_from('torchvision:densenet122', 'densenet121')
  with pytest.raises(config_validation.ConfigError,
                     match=r"'keras:densenet169': weights of densenet169, but config.model "
                           'builds densenet121'):
    config_validation.check_init_from('keras:densenet169', 'densenet121')
