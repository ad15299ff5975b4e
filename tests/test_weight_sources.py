"""weight_sources.py: init_from dispatched to its source (published name, run directory, file),
published weights downloaded and converted once, errors as one line naming init_from, and the
classifier kept where the number of classes differs."""

import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from densenet_jax import convert, costs, errors, models, weight_sources
import helpers


def serve_load_and_reload(server, monkeypatch, cache, key: str, body: bytes, expected: dict):
  """Serves `body` as the publisher's file of `key` (with its digest), loads `key` twice: the
  second time from the converted copy alone, with no request; both equal `expected`."""
  spec = helpers.serve(server, monkeypatch, key, body)
  assert_trees_equal(weight_sources.published(key, str(cache)), expected)
  assert sorted(os.listdir(cache)) == [spec.file_name, f'{spec.file_name}.converted.npz']
  os.remove(cache / spec.file_name)  # the converted copy alone is enough now
  assert_trees_equal(weight_sources.published(key, str(cache)), expected)
  assert helpers.Publisher.requests == [f'/{spec.file_name}']


def assert_trees_equal(a, b):
  flat_a, flat_b = (traverse_util.flatten_dict(t) for t in (a, b))
  assert sorted(flat_a) == sorted(flat_b)
  for key, value in flat_a.items():
    np.testing.assert_array_equal(value, flat_b[key], err_msg=str(key))


@pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')  # Keras's own
def test_keras_weights_download_convert_once_and_reuse(server, tmp_path, monkeypatch):
  """The Keras branch: a DenseNet-121 weights file in the publisher's (legacy h5) format."""
  body, model = helpers.keras_densenet121_weights(tmp_path)
  serve_load_and_reload(server, monkeypatch, tmp_path / 'cache', 'keras:densenet121', body,
                        convert.from_keras(model))


def test_torchvision_weights_download_convert_once_and_reuse(server, tmp_path, monkeypatch):
  """The torchvision branch: a .pth state_dict with torchvision's legacy key names, as its
  published files have (needs torch only; CI's Python 3.11 set installs a CPU torch)."""
  torch = pytest.importorskip('torch')
  variables = helpers.random_variables('densenet121', np.random.default_rng(0))
  state_dict = helpers.torchvision_state_dict(variables, legacy=True)
  path = tmp_path / 'served.pth'
  torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, path)
  serve_load_and_reload(server, monkeypatch, tmp_path / 'cache', 'torchvision:densenet121',
                        path.read_bytes(), variables)


def small_variables(num_classes=3, width=4):
  rng = np.random.default_rng(num_classes)
  return {'params': {'stem_conv': {'kernel': rng.normal(size=(3, 3, 3, width))},
                     'classifier': {'kernel': rng.normal(size=(width, num_classes)),
                                    'bias': rng.normal(size=num_classes)}},
          'batch_stats': {'head_norm': {'mean': rng.normal(size=width)}}}


def test_fit_keeps_the_models_classifier_when_the_classes_differ():
  loaded, model = small_variables(num_classes=1000), small_variables(num_classes=10)
  fitted = weight_sources.fit('w.pth', loaded, model)
  np.testing.assert_array_equal(fitted['params']['stem_conv']['kernel'],
                                loaded['params']['stem_conv']['kernel'])
  np.testing.assert_array_equal(fitted['params']['classifier']['kernel'],
                                model['params']['classifier']['kernel'])
  np.testing.assert_array_equal(fitted['batch_stats']['head_norm']['mean'],
                                loaded['batch_stats']['head_norm']['mean'])
  same = weight_sources.fit('w.pth', loaded, small_variables(num_classes=1000))
  np.testing.assert_array_equal(same['params']['classifier']['bias'],
                                loaded['params']['classifier']['bias'])
  wider = small_variables(num_classes=10, width=8)
  with pytest.raises(weight_sources.WeightsError, match="init_from='w.pth' holds another "
                     'architecture than the model'):
    weight_sources.fit('w.pth', loaded, wider)


def test_read_errors_are_one_line_user_errors(tmp_path, monkeypatch):
  with pytest.raises(weight_sources.WeightsError, match=r"init_from='.*/none.pth': no such file"):
    weight_sources.read(str(tmp_path / 'none.pth'), {})
  (tmp_path / 'w.npz').write_bytes(b'')
  with pytest.raises(weight_sources.WeightsError, match=r"extension '.npz'; allowed: .pth"):
    weight_sources.read(str(tmp_path / 'w.npz'), {})
  with pytest.raises(weight_sources.WeightsError, match=r'init_from=.*: no checkpoint in'):
    weight_sources.read(str(tmp_path), {})

  def no_torch(path):
    raise ModuleNotFoundError("No module named 'torch'", name='torch')
  monkeypatch.setattr(convert, 'load_pretrained', no_torch)
  (tmp_path / 'w.pth').write_bytes(b'')
  with pytest.raises(errors.UserError, match=r"init_from='.*/w.pth' needs torch installed"):
    weight_sources.read(str(tmp_path / 'w.pth'), {})


@pytest.mark.filterwarnings('ignore::DeprecationWarning')  # Keras's model.save
@pytest.mark.slow
def test_imported_weights_with_other_classes_get_a_new_head(keras_file):
  path, _ = keras_file
  _, imported = convert.load_pretrained(path)
  model = models.create_model('densenet121', num_classes=10)
  rng = np.random.default_rng(0)  # the model's own variables: random, cheaper than its init
  variables = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(s.dtype),
                           costs.init_shapes(model, 32))
  loaded = weight_sources.load_into(path, variables)
  np.testing.assert_array_equal(loaded['params']['classifier']['kernel'],
                                variables['params']['classifier']['kernel'])  # fresh head
  np.testing.assert_array_equal(
      loaded['params']['block4']['layer16']['composite']['conv']['kernel'],
      imported['params']['block4']['layer16']['composite']['conv']['kernel'])
  np.testing.assert_array_equal(loaded['batch_stats']['head_norm']['var'],
                                imported['batch_stats']['head_norm']['var'])


def test_headless_models_take_all_but_the_classifier_and_give_a_new_head():
  """fit into a headless model (num_classes=0) loads every other variable; weights without a
  classifier (a headless model's) load into a model with one, which keeps its own head."""
  with_head = helpers.random_variables('densenet121', np.random.default_rng(0))
  zeros = lambda shapes: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  headless = zeros(costs.init_shapes(models.create_model('densenet121', num_classes=0), 224))
  fitted = weight_sources.fit('run', with_head, headless)
  assert 'classifier' not in fitted['params']
  expected = {'params': {k: v for k, v in with_head['params'].items() if k != 'classifier'},
              'batch_stats': with_head['batch_stats']}
  helpers.assert_bitwise_equal(fitted, expected)
  own = zeros(costs.init_shapes(models.create_model('densenet121', num_classes=10), 224))
  fitted = weight_sources.fit('run', expected, own)
  assert fitted['params']['classifier'] is own['params']['classifier']
  helpers.assert_bitwise_equal(fitted['params']['block4'], with_head['params']['block4'])
